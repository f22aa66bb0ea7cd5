"""Where bit_jax's compiled training step spends its time, by kind of XLA
operation: the step runs under jax.profiler, and the time of each executed
operation (a thunk of XLA's CPU runtime, a kernel on a GPU) is summed by its
name without the numeric suffix ('transpose_copy_fusion.86' counts as
'transpose_copy_fusion').

  python -m benchmarks.jax_profile --arch R50x1 --resolution 128 --batch 16 \\
      --precision fp32 --steps 3 --top 20

The kinds are XLA's fusion names, which name the fusion's leading
operations; the compiled program (`--hlo FILE`) tells what each one
computes. Operations of one step may run at once on several threads, and
XLA may run a convolution or a product in its own library's threads, which
the trace doesn't attribute to the operation, so the sum of the kinds is not
the step's time: compare a kind across versions of the code, not with the
step.
"""
import argparse
import collections
import glob
import gzip
import json
import re
import tempfile

import jax

from benchmarks.bench_jax import compiled_steps
from benchmarks.timing import median_seconds
from bit_jax import train


def kind(name):
  """An operation's kind: its name without the numeric suffix."""
  return re.sub(r'\.\d+$', '', name)


def instructions(program):
  """The instruction names of the entry computation of an HLO `program`."""
  entry = program[program.index('\nENTRY '):]
  return re.findall(r'^\s*(?:ROOT )?%([\w.-]+) = ', entry, re.M)


def kinds(trace_dir, steps, names):
  """{kind: [ms per step, operations per step]} of the operations named in
  `names` in the perfetto trace in `trace_dir` of `steps` steps."""
  path, = glob.glob(f'{trace_dir}/**/perfetto_trace.json.gz', recursive=True)
  with gzip.open(path) as f:
    events = json.load(f)
  events = events['traceEvents'] if isinstance(events, dict) else events
  names = set(names)
  out = collections.defaultdict(lambda: [0.0, 0])
  for e in events:
    if e.get('ph') == 'X' and e.get('name') in names:  # complete events
      k = out[kind(e['name'])]
      k[0] += e.get('dur', 0) / 1e3 / steps
      k[1] += 1
  return {k: [ms, n / steps] for k, (ms, n) in out.items()}


def profile(arch, resolution, batch, precision, steps, hlo=None):
  """{'step_s': median seconds of a step, 'kinds': {kind: [ms, count]}}."""
  made = compiled_steps(arch, resolution, batch, precision)
  step, state = made['train'], made['state']
  program = step.as_text()
  if hlo:
    with open(hlo, 'w') as f:
      f.write(program)

  def run():
    nonlocal state
    *state, loss = step(*state, made['data'], made['lr'])
    loss.block_until_ready()
  step_s = median_seconds(run, steps, 2)
  with tempfile.TemporaryDirectory(prefix='bit_jax_profile_') as tmp:
    jax.profiler.start_trace(tmp, create_perfetto_trace=True)
    for _ in range(steps):
      run()
    jax.profiler.stop_trace()
    found = kinds(tmp, steps, instructions(program))
  return {'step_s': step_s, 'kinds': dict(sorted(
      found.items(), key=lambda kv: -kv[1][0]))}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--arch', default='R50x1')
  parser.add_argument('--resolution', type=int, default=128)
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--precision', default='fp32',
                      choices=sorted(train.DTYPES))
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--top', type=int, default=20)
  parser.add_argument('--hlo', default=None,
                      help='also write the compiled program here')
  parser.add_argument('--json', default=None, help='also write results here')
  args = parser.parse_args(argv)
  res = profile(args.arch, args.resolution, args.batch, args.precision,
                args.steps, args.hlo)
  print(f'{args.arch} {args.resolution} px, batch {args.batch}, '
        f'{args.precision}, on {jax.devices()[0].platform}: a step takes '
        f'{res["step_s"] * 1e3:.0f} ms (median of {args.steps}); by kind of '
        'operation, per step:')
  for name, (ms, count) in list(res['kinds'].items())[:args.top]:
    print(f'{ms:9.1f} ms  {count:6.1f} x  {name}')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(dict(vars(args), **res), f, indent=2)
  return res


if __name__ == '__main__':
  main()
