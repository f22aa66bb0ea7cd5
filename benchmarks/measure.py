"""What the benchmark commands share: the frameworks measured (a module
benchmarks/bench_<name>.py each, timm's peer among them) and the measuring
of one of them in a process of its own, run from the repository root.
"""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Framework name -> module in this folder.
FRAMEWORKS = {
    'timm': 'bench_timm',
    'pytorch': 'bench_pytorch',
    'jax': 'bench_jax',
    'tf2': 'bench_tf2',
}
PEER = 'timm'
KEYS = ('train_img_s', 'eval_img_s')


def chosen(parser, text, known, what='framework'):
  """The comma-separated names of `text`; a parser error names any not in
  `known` (each a `what`)."""
  names = [f for f in text.split(',') if f]
  unknown = set(names) - set(known)
  if unknown:
    parser.error(f'unknown {what}(s) {sorted(unknown)}; known: '
                 f'{", ".join(known)}')
  return names


def measure_in_subprocess(framework, arch, resolution, batch, precision,
                          steps, warmup, timeout=None, env=None, **options):
  """Runs bench_<framework>.measure(...) in a fresh Python (environment
  `env` added to this one's, at most `timeout` seconds); returns its dict,
  or {'error': the last line of its output}."""
  return call_in_subprocess(framework, 'measure', (arch, resolution, batch,
                                                   precision, steps, warmup),
                            options, timeout=timeout, env=env)


def call_in_subprocess(framework, function, args, options=None, timeout=None,
                       env=None):
  """bench_<framework>.<function>(*args, **options), whose arguments and
  result are JSON values, run in a fresh Python as measure_in_subprocess
  runs it."""
  return run_in_subprocess(FRAMEWORKS[framework], function, args, options,
                           timeout=timeout, env=env)


def run_in_subprocess(module, function, args, options=None, timeout=None,
                      env=None):
  """benchmarks.<module>.<function>(*args, **options), whose arguments and
  result are JSON values, in a fresh Python (environment `env` added to
  this one's, at most `timeout` seconds); returns its result, or {'error':
  the last line of its output}."""
  code = ('import json; from benchmarks import {module} as m; '
          'print("RESULT " + json.dumps(m.{function}(*{args!r}, '
          '**{options!r})))'
          ).format(module=module, function=function, args=tuple(args),
                   options=options or {})
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', **(env or {}))
  try:
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True,
                          text=True, env=env, cwd=REPO, check=False,
                          timeout=timeout)
  except subprocess.TimeoutExpired:
    return {'error': f'did not finish in {timeout:.0f} s'}
  lines = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')]
  if proc.returncode or not lines:
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ['?']
    return {'error': tail[0]}
  return json.loads(lines[-1][len('RESULT '):])
