"""End-to-end training throughput of each backend's real trainer, next to
the pure training step of the same settings.

  python -m benchmarks.end_to_end --arch R50x1 --resolution 128 --batch 16 \\
      --frameworks pytorch,jax,tf2 --precisions fp32 --steps 30 --json out.json

For every framework and precision this runs `python -m bit_<framework>.train`
as a user would, on a generated image folder (JPEG files larger than the
crop, so the HyperRule resizes and crops them), from a generated BiT
checkpoint of the architecture (no network), with mixup on (alpha 0.1),
checkpoints every --save_every steps and an evaluation at the end; then it
times the training step alone (benchmarks.measure, random data, in
its own process) and prints both rates and their ratio, end to end / step.

What the end-to-end rate counts. The trainers' harness (harness.Run.fit)
reads the losses back in windows (every 10 steps, and at every checkpoint
and evaluation) and writes each window's images/s into every metrics.jsonl
row of the window; a window's time is its rows x batch / images/s. The
rate is the training images of the windows that start after step --skip
over their summed time. So it counts everything the loop does between two
steps: reading and decoding the JPEG files, resizing, cropping, flipping,
mixup, moving the batch to the device, the step, the read-backs, the
metrics and log lines, and the periodic checkpoints (a checkpoint written
after step s is timed in the window that starts at s + 1). It leaves out
start-up (imports, scanning the folder, building the model, loading the
weights), the first --skip steps (compilation, the data workers' start),
evaluations (the harness restarts its clock after one) and what follows
the last step (the final evaluation and checkpoint, model.npz,
results.json). Those are reported apart: `wall_s` is the whole command,
`other_s` what of it lies outside the training windows.

The step's rate is bench_<framework>.measure's: the median time of single
steps, each waited for, on random data already on the device, with a
1000-class head and no mixup; the end-to-end rate is a mean over a stretch
of steps. Both run one after the other in fresh processes; on a shared
machine, repeat (--repeat) and read the spread.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

from benchmarks.measure import REPO, chosen, measure_in_subprocess
from big_transfer import hardware, zoo

FRAMEWORKS = ('pytorch', 'jax', 'tf2')
MIXUP_ALPHA = 0.1   # the HyperRule's alpha for large datasets
SUMMARY = ('e2e_img_s', 'step_img_s', 'ratio', 'ratio_between_checkpoints')


# --------------------------------------------------------------------------
# Inputs: an image folder and a BiT checkpoint, made here.

def image_size(resolution):
  """(height, width) of the generated images for a `resolution` px crop:
  5/4 and 25/16 of it (160 x 200 for 128 px), a landscape photo a little
  larger than the crop."""
  return (-(-resolution * 5 // 4), -(-resolution * 25 // 16))


def make_folder(root, classes=10, per_class=32, size=(160, 200), seed=0,
                val_per_class=None, quality=90):
  """Writes root/train/<class>/*.jpg and root/val/<class>/*.jpg (the layout
  datasets.scan_imagefolder reads) and returns root.

  `classes` folders class_00, class_01, ... with `per_class` training and
  `val_per_class` (default per_class // 4, at least 2) validation JPEG files
  of `size` (height, width) pixels, at JPEG `quality`. Each class has its own
  colour and the direction of a gradient across the image, under noise, so
  the task can be learnt and the files compress like photographs rather
  than like noise or flat colour.
  """
  height, width = (size, size) if isinstance(size, int) else size
  val_per_class = val_per_class or max(2, per_class // 4)
  rng = np.random.default_rng(seed)
  colours = rng.uniform(40, 215, (classes, 3))
  angles = rng.uniform(0, 2 * np.pi, classes)
  yy, xx = np.mgrid[0:height, 0:width]
  yy, xx = yy / height - 0.5, xx / width - 0.5
  for split, n in (('train', per_class), ('val', val_per_class)):
    for c in range(classes):
      folder = os.path.join(root, split, f'class_{c:02d}')
      os.makedirs(folder, exist_ok=True)
      ramp = np.cos(angles[c]) * xx + np.sin(angles[c]) * yy
      for i in range(n):
        coarse = rng.normal(0, 25, (height // 8 + 1, width // 8 + 1, 3))
        coarse = coarse.repeat(8, 0).repeat(8, 1)[:height, :width]
        fine = rng.normal(0, 8, (height, width, 3))
        img = colours[c] + 80 * ramp[..., None] + coarse + fine
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
            os.path.join(folder, f'{i:04d}.jpg'), quality=quality)
  return root


def make_weights(path, arch, head_size=10, seed=0):
  """Writes a BiT checkpoint (.npz, the published layout) of `arch` drawn at
  random (He-scaled kernels, unit GroupNorm, zero head) and returns `path`.
  Its speed is that of real weights; the trainers read the architecture
  from the file."""
  rng = np.random.default_rng(seed)
  weights = {}
  for key, shape in zoo.expected_shapes(zoo.parse_arch(arch),
                                            head_size).items():
    if key.endswith('gamma'):
      value = np.ones(shape)
    elif key.endswith(('beta', 'bias')) or 'head' in key:
      value = np.zeros(shape)
    else:
      value = rng.standard_normal(shape) * np.sqrt(2 / np.prod(shape[:-1]))
    weights[key] = value.astype(np.float32)
  return zoo.save_npz(path, weights)


# --------------------------------------------------------------------------
# One end-to-end run.

def measure_end_to_end(framework, arch, resolution, batch, precision, steps,
                       folder, workdir, save_every=None, eval_every=None,
                       skip=10, mixup_alpha=MIXUP_ALPHA, workers=None,
                       weights=None, timeout=None, env=None, flags=()):
  """Runs `python -m bit_<framework>.train` on the image `folder` and
  returns what its outputs say about its speed (see the module doc), or
  {'error': why}.

  The run: `arch` from `weights` (a BiT .npz; by default one made by
  make_weights in `workdir`), a `resolution` px crop (--crop_size; the
  HyperRule sets the resize from the images' size), --batch `batch`,
  --precision `precision`, --total_steps `steps`, --mixup_alpha
  `mixup_alpha`, a checkpoint every `save_every` steps (default steps // 3:
  three, the last at the end), an evaluation every `eval_every` steps (default:
  at the end only), --workers `workers` (default: the trainer's), and the
  trainer's `flags` (e.g. ['--compile']). Its
  outputs go to workdir/runs/<a new name>, and stay there. `env` is added
  to this process's environment; `timeout` bounds the command in seconds.
  Each run compiles afresh, as a first run on a machine does: JAX and
  torch.compile get empty caches of their own in workdir (unless `env`
  names them), so first_step_s holds the whole compilation.

  Returns {e2e_img_s, between_checkpoints_img_s (the rate of the timed
  windows that hold no checkpoint: data, step and read-backs; None if every
  one holds one), timed_steps [first, last], timed_s, checkpoints_timed,
  checkpoint_s (a checkpoint's cost, estimated from windows with and
  without one; None unless both kinds are timed), windows [{steps, img_s,
  after_checkpoint}] (whether a --save_every or evaluation checkpoint is
  timed in it; the harness's 10-minute ones are not foreseen), wall_s,
  train_s, other_s, checkpoint_steps_kept (the steps of the checkpoints
  left in the run folder, newest two), resolution [resize, crop], mixup,
  image_size, device, compiled (whether PyTorch's trainer ran
  torch.compile; None for the others), hold_images (whether the run held
  its training images, big_transfer.held), top1, first_loss and last_loss
  (training), run_dir, command, first_step_s (the first step's time as the
  trainer logs it: its compilation and first batch) and held_s (holding's
  time as the trainer logs it, part of other_s; where it held)}.
  """
  save_every = save_every or max(1, steps // 3)
  if steps <= skip:
    return {'error': f'--steps {steps} leaves nothing after --skip {skip}'}
  weights = weights or make_weights(
      os.path.join(workdir, f'{arch}-synthetic.npz'), arch)
  logdir = os.path.join(workdir, 'runs')
  name = _new_name(logdir, f'{framework}-{precision}-{arch}-{resolution}px')
  command = [sys.executable, '-m', f'bit_{framework}.train', '--name', name,
             '--logdir', logdir, '--model', weights,
             '--dataset', 'imagefolder', '--datadir', folder,
             '--batch', str(batch), '--total_steps', str(steps),
             '--crop_size', str(resolution), '--precision', precision,
             '--mixup_alpha', str(mixup_alpha),
             '--save_every', str(save_every)]
  command += ['--eval_every', str(eval_every)] if eval_every else []
  command += ['--workers', str(workers)] if workers is not None else []
  command += list(flags)
  caches = os.path.join(workdir, 'compilation_caches', name)
  env = {**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '2',
         'JAX_COMPILATION_CACHE_DIR': os.path.join(caches, 'jax'),
         'TORCHINDUCTOR_CACHE_DIR': os.path.join(caches, 'torchinductor'),
         **(env or {})}
  run_dir = os.path.join(logdir, name)
  t0 = time.perf_counter()
  try:
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True,
                          text=True, check=False, timeout=timeout)
  except subprocess.TimeoutExpired:
    return {'error': f'did not finish in {timeout:.0f} s', 'run_dir': run_dir}
  wall = time.perf_counter() - t0
  if proc.returncode:
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ['?']
    return {'error': f'exit status {proc.returncode}: {tail[0]}',
            'run_dir': run_dir}
  out = read_run(run_dir, framework, batch, skip, save_every, eval_every)
  if 'error' not in out:
    out.update(wall_s=wall, other_s=wall - out['train_s'],
               image_size=first_image_size(folder), command=command[1:])
    for key, pattern in (('first_step_s', r'the first step took ([\d.]+) s'),
                         ('held_s', r'held \d+ images in ([\d.]+) s')):
      logged = re.search(pattern, proc.stderr)
      if logged:
        out[key] = float(logged[1])
  return out


def first_image_size(folder):
  """[height, width] of the first training image of an image folder."""
  train = os.path.join(folder, 'train')
  first = os.path.join(train, sorted(os.listdir(train))[0])
  with Image.open(os.path.join(first, sorted(os.listdir(first))[0])) as im:
    return [im.height, im.width]


def _new_name(logdir, stem):
  """A run name under `logdir` that no run uses yet (a used one would
  resume)."""
  name, k = stem, 1
  while os.path.exists(os.path.join(logdir, name)):
    k += 1
    name = f'{stem}-{k}'
  return name


def read_run(run_dir, framework, batch, skip=10, save_every=None,
             eval_every=None):
  """The end-to-end figures of a finished run folder (see
  measure_end_to_end), from its metrics.jsonl, config.json and
  results.json."""
  with open(os.path.join(run_dir, 'config.json')) as f:
    config = json.load(f)
  with open(os.path.join(run_dir, 'results.json')) as f:
    results = json.load(f)
  with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
    rows = [r for r in map(json.loads, f) if r['split'] == 'train']
  total = config['schedule'][-1]
  saved = {s for s in range(1, total + 1)
           if (save_every and s % save_every == 0) or
           (eval_every and s % eval_every == 0)}
  wins = windows(rows)
  for w in wins:
    w['seconds'] = (w['steps'][1] - w['steps'][0] + 1) * batch / w['img_s']
    w['after_checkpoint'] = w['steps'][0] - 1 in saved
  timed = [w for w in wins if w['steps'][0] > skip]
  if not timed:
    return {'error': f'no read-back window starts after step {skip}: '
            'raise the steps', 'run_dir': run_dir}
  return {
      'e2e_img_s': _rate(timed, batch),
      'between_checkpoints_img_s': _rate(
          [w for w in timed if not w['after_checkpoint']], batch),
      'timed_steps': [timed[0]['steps'][0], timed[-1]['steps'][1]],
      'timed_s': sum(w['seconds'] for w in timed),
      'checkpoints_timed': sum(w['after_checkpoint'] for w in timed),
      'checkpoint_s': _checkpoint_cost(timed),
      'windows': [{'steps': w['steps'], 'img_s': w['img_s'],
                   'after_checkpoint': w['after_checkpoint']} for w in wins],
      'train_s': sum(w['seconds'] for w in wins),
      'checkpoint_steps_kept': kept_checkpoint_steps(framework, run_dir),
      'resolution': config['resolution'], 'mixup': config['mixup'],
      'mixup_alpha': config.get('mixup_alpha'),
      'device': str(config.get('device') or config.get('device_kind')),
      'compiled': config.get('compiled'),   # PyTorch's torch.compile
      'hold_images': config.get('hold_images'),  # big_transfer.held
      'top1': results.get('top1'), 'first_loss': rows[0]['loss'],
      'last_loss': rows[-1]['loss'], 'total_steps': total, 'run_dir': run_dir,
  }


def windows(rows):
  """The harness's read-back windows in metrics.jsonl's training rows:
  [{steps: [first, last], img_s}], runs of consecutive steps that share
  one images/s figure (each window's rows carry the same one)."""
  out = []
  for r in rows:
    if (out and out[-1]['img_s'] == r['images_per_sec'] and
        out[-1]['steps'][1] == r['step'] - 1):
      out[-1]['steps'][1] = r['step']
    else:
      out.append({'steps': [r['step'], r['step']],
                  'img_s': r['images_per_sec']})
  return out


def _rate(wins, batch):
  """Images/s over the windows `wins` together; None if there are none."""
  if not wins:
    return None
  return (sum(w['steps'][1] - w['steps'][0] + 1 for w in wins) * batch
          / sum(w['seconds'] for w in wins))


def _checkpoint_cost(timed):
  """Seconds a checkpoint adds, estimated as the mean extra time of the
  windows holding one over their steps at the median step time of the
  windows without one; None unless both kinds are there."""
  def per_step(w):
    return w['seconds'] / (w['steps'][1] - w['steps'][0] + 1)
  without = [per_step(w) for w in timed if not w['after_checkpoint']]
  holding = [w for w in timed if w['after_checkpoint']]
  if not without or not holding:
    return None
  step_s = statistics.median(without)
  return statistics.mean(
      w['seconds'] - (w['steps'][1] - w['steps'][0] + 1) * step_s
      for w in holding)


def kept_checkpoint_steps(framework, run_dir):
  """Sorted steps of the checkpoints in `run_dir` (each trainer keeps its
  newest two): PyTorch's bit.pth.tar and bit.prev.pth.tar, TF2's
  checkpoints/ckpt-<step>.index, JAX's (Orbax) checkpoints/<step>/."""
  folder = os.path.join(run_dir, 'checkpoints')
  if framework == 'pytorch':
    # Imported here only: this module (and the GPU check, which imports
    # it) also runs where PyTorch is not installed.
    import torch  # pylint: disable=import-outside-toplevel
    steps = []
    for f in ('bit.pth.tar', 'bit.prev.pth.tar'):
      path = os.path.join(run_dir, f)
      if os.path.exists(path):
        steps.append(int(torch.load(path, map_location='cpu', mmap=True,
                                    weights_only=True)['step']))
    return sorted(steps)
  if not os.path.isdir(folder):
    return []
  if framework == 'tf2':
    return sorted(int(f[len('ckpt-'):-len('.index')])
                  for f in os.listdir(folder)
                  if f.startswith('ckpt-') and f.endswith('.index'))
  return sorted(int(f) for f in os.listdir(folder) if f.isdigit())


# --------------------------------------------------------------------------
# The end-to-end run next to the pure step.

def measure(framework, arch, resolution, batch, precision, steps, folder,
            workdir, step_steps=10, step_warmup=3, timeout=None, env=None,
            **options):
  """measure_end_to_end(...) (its keys, or 'e2e_error') with the pure
  step's rate of the same framework, architecture, crop, batch and
  precision (`step_img_s`: measure.measure_in_subprocess, `step_steps`
  timed after `step_warmup`; or 'step_error') and `ratio` = e2e_img_s /
  step_img_s (add_ratios). `options` go to measure_end_to_end."""
  e2e = measure_end_to_end(framework, arch, resolution, batch, precision,
                           steps, folder, workdir, timeout=timeout, env=env,
                           **options)
  # PyTorch's pure step as the trainer ran it: through torch.compile where
  # it compiled (--compile, or its default on a GPU for long runs).
  compiled = {'compile': True} if e2e.get('compiled') else {}
  step = measure_in_subprocess(
      framework, arch, resolution, batch, precision, step_steps, step_warmup,
      timeout=timeout, env=env, evaluate=False, **compiled)
  out = {k: v for k, v in e2e.items() if k != 'error'}
  if 'error' in e2e:
    out['e2e_error'] = e2e['error']
  if 'error' in step:
    out['step_error'] = step['error']
  else:
    out['step_img_s'] = step['train_img_s']
    out['step'] = step
  if 'step_img_s' in out:
    add_ratios(out, out['step_img_s'])
  return out


def add_ratios(run, step_img_s):
  """Adds to a measure_end_to_end result `run` its rates over the pure
  step's `step_img_s`: `ratio` (end to end) and `ratio_between_checkpoints`
  (the windows without a checkpoint), where `run` has them."""
  for rate, ratio in (('e2e_img_s', 'ratio'), ('between_checkpoints_img_s',
                                              'ratio_between_checkpoints')):
    if run.get(rate) and step_img_s:
      run[ratio] = run[rate] / step_img_s


def describe(res):
  """One line of figures for a measure() result."""
  parts = []
  if 'e2e_img_s' in res:
    parts.append(f'e2e {res["e2e_img_s"]:.1f} img/s')
  else:
    parts.append(f'e2e failed: {res.get("e2e_error")}')
  if 'step_img_s' in res:
    parts.append(f'step {res["step_img_s"]:.1f} img/s')
  else:
    parts.append(f'step failed: {res.get("step_error")}')
  if 'ratio' in res:
    parts.append(f'x{res["ratio"]:.2f}')
  if 'ratio_between_checkpoints' in res:
    parts.append(f'(x{res["ratio_between_checkpoints"]:.2f} between '
                 'checkpoints)')
  if 'e2e_img_s' in res:
    first, last = res['timed_steps']
    cost = res['checkpoint_s']
    parts.append(
        f'(steps {first}-{last}, {res["checkpoints_timed"]} checkpoint(s) '
        'timed' + (f', ~{cost:.2f} s each' if cost is not None else '') +
        f'; {res["resolution"][0]} -> {res["resolution"][1]} px, mixup '
        f'{res["mixup"]:g}; whole command {res["wall_s"]:.0f} s)')
  return '  '.join(parts)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--arch', default='R50x1')
  parser.add_argument('--resolution', type=int, default=128,
                      help='the training crop (--crop_size)')
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--frameworks', default=','.join(FRAMEWORKS),
                      help='comma-separated, from: ' + ', '.join(FRAMEWORKS))
  parser.add_argument('--precisions', default='fp32')
  parser.add_argument('--steps', type=int, default=30,
                      help='training steps of each end-to-end run')
  parser.add_argument('--skip', type=int, default=10,
                      help='untimed first steps (the first read-back window '
                      'of 10 steps holds the compilation)')
  parser.add_argument('--save_every', type=int, default=None,
                      help='checkpoint every N steps (default: steps // 3)')
  parser.add_argument('--eval_every', type=int, default=None,
                      help='also evaluate every N steps (default: at the '
                      'end only)')
  parser.add_argument('--workers', type=int, default=None,
                      help='the trainers\' --workers (default: theirs)')
  parser.add_argument('--step_steps', type=int, default=10,
                      help='timed steps of the pure-step measurement')
  parser.add_argument('--step_warmup', type=int, default=3)
  parser.add_argument('--classes', type=int, default=10)
  parser.add_argument('--per_class', type=int, default=32,
                      help='training images per class (val: a quarter)')
  parser.add_argument('--image_size', default=None,
                      help='HEIGHTxWIDTH of the generated JPEG files '
                      '(default: 5/4 x 25/16 of the resolution)')
  parser.add_argument('--repeat', type=int, default=1,
                      help='rounds; the summary gives medians')
  parser.add_argument('--timeout', type=float, default=None,
                      help='seconds each command may take')
  parser.add_argument('--workdir', default=None,
                      help='keep the folder, checkpoint and runs here '
                      '(default: a temporary folder, removed at the end)')
  parser.add_argument('--json', default=None, help='also write results here')
  args = parser.parse_args(argv)
  frameworks = chosen(parser, args.frameworks, FRAMEWORKS)
  size = (tuple(int(v) for v in args.image_size.lower().split('x'))
          if args.image_size else image_size(args.resolution))
  if min(size) <= args.resolution:
    parser.error(f'images of {size[0]}x{size[1]} are not larger than the '
                 f'{args.resolution} px crop')
  runs = [(f, p) for f in frameworks for p in args.precisions.split(',') if p]
  cpu = hardware.cpu_description()
  print(f'CPU: {cpu["model"]} ({cpu["machine"]}; '
        f'{" ".join(cpu["simd_flags"]) or "no SIMD flags read"})')
  if 'bf16' in args.precisions.split(',') and cpu['bf16_emulated']:
    print('warning: ' + hardware.BF16_EMULATED_WARNING, flush=True)

  with tempfile.TemporaryDirectory(prefix='bit_e2e_') as tmp:
    workdir = args.workdir or tmp
    os.makedirs(workdir, exist_ok=True)
    folder = make_folder(os.path.join(workdir, 'images'), args.classes,
                         args.per_class, size)
    weights = make_weights(os.path.join(workdir, f'{args.arch}-synthetic.npz'),
                           args.arch)
    print(f'{args.arch} at {args.resolution} px, batch {args.batch}, '
          f'{args.steps} steps ({args.skip} untimed) on {args.classes} x '
          f'{args.per_class} JPEG files of {size[0]}x{size[1]}, mixup '
          f'{MIXUP_ALPHA:g}; ratio = end to end / pure step.', flush=True)
    table = {run: [] for run in runs}
    for r in range(args.repeat):
      for fw, prec in runs:
        res = measure(fw, args.arch, args.resolution, args.batch, prec,
                      args.steps, folder, workdir, args.step_steps,
                      args.step_warmup, args.timeout,
                      save_every=args.save_every, eval_every=args.eval_every,
                      skip=args.skip, workers=args.workers, weights=weights)
        table[(fw, prec)].append(res)
        print(f'round {r + 1}: {fw:>7} {prec:<5} ' + describe(res),
              flush=True)
  summary = []
  print('median over rounds:' if args.repeat > 1 else 'summary:')
  for (fw, prec), results in table.items():
    row = {'framework': fw, 'precision': prec}
    for k in SUMMARY:
      values = [x[k] for x in results if k in x]
      row[k] = statistics.median(values) if values else None
    summary.append(row)
    print(f'  {fw:>7} {prec:<5} ' + '  '.join(
        f'{k}=' + (f'{row[k]:.2f}' if row[k] is not None else 'n/a')
        for k in SUMMARY), flush=True)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'args': vars(args), 'cpu': cpu, 'image_size': size,
                 'summary': summary,
                 'rounds': {f'{fw}/{p}': v for (fw, p), v in table.items()}},
                f, indent=2)
  return summary


if __name__ == '__main__':
  main()
