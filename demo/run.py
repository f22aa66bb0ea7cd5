"""BiT's claim, offline, in minutes: a model pre-trained upstream learns a new
task from a handful of examples far better than the same network trained
from scratch.

  python -m demo.run            (what `make demo` runs)

Fine-tunes the bundled upstream model (big_transfer/assets/, pre-trained on
Fashion-MNIST) and the same architecture from random initialisation on
scikit-learn's handwritten digits, with 1, 5 and all examples per class,
over several seeds, through bit_pytorch.train and the BiT-HyperRule (its
schedule compressed to --steps, resolution set to 36 -> 32 px). Prints a
table (median, min, max top-1) and writes a plot of learning curves and of
accuracy vs examples per class to LOGDIR. Beside it, the few-shot linear
evaluation (bit_pytorch.fewshot: a least-squares classifier on frozen
pre-logit features) of the upstream model and of the same network at random
initialisation, at --linear_shots examples per class.
"""
import concurrent.futures
import json
import multiprocessing
import os
import sys
import time

import numpy as np

import bit_common
from big_transfer import errors, fewshot, flags, runfiles, zoo

MODEL = 'BiT-R14x0.5-FashionMNIST'
DATASET = 'digits'
INITS = ('upstream', 'scratch')


def argparser():
  parser = flags.parser(__doc__.split('\n\n')[0])
  parser.add_argument('--logdir', default=os.path.join('runs', 'demo'),
                      help='Where the runs, table and plot go.')
  parser.add_argument('--model', default=MODEL,
                      help='The pre-trained model (registered name or .npz).')
  parser.add_argument('--shots', default='1,5,all',
                      help='Examples per class, comma-separated ("all": the '
                      'whole training set).')
  parser.add_argument('--seeds', type=int, default=3,
                      help='Seeds per setting (few-shot draw and training).')
  parser.add_argument('--steps', type=int, default=100,
                      help='HyperRule schedule compressed to this many steps.')
  parser.add_argument('--batch', type=int, default=64, help='Batch size.')
  parser.add_argument('--eval_every', type=int, default=20,
                      help='Evaluate every N steps (the learning curves).')
  parser.add_argument('--resize_size', type=int, default=36)
  parser.add_argument('--crop_size', type=int, default=32)
  parser.add_argument('--linear_shots', default='1,5,10,25',
                      help='Examples per class of the few-shot linear '
                      'evaluation ("none": skip it).')
  parser.add_argument('--processes', type=int, default=os.cpu_count(),
                      help='Runs at a time, one CPU thread each (small '
                      'models use cores better this way, and a busy machine '
                      'slows them less).')
  return parser


def parse_shots(text):
  try:
    return [None if s.strip() == 'all' else int(s) for s in text.split(',')]
  except ValueError:
    raise errors.BadInput(f'--shots {text!r}: give numbers or "all", '
                              'comma-separated, e.g. 1,5,all.') from None


def shot_name(shots):
  return 'all' if shots is None else str(shots)


def scratch_weights(model, logdir, seed):
  """The same architecture as `model`, randomly initialised, as an .npz."""
  import torch
  from bit_pytorch import models
  weights = zoo.load_npz(zoo.weights_path(model))
  arch, head = zoo.infer_arch(weights)
  path = os.path.join(logdir, f'scratch-{arch.name}-seed{seed}.npz')
  torch.manual_seed(seed)
  return models.ResNetV2(arch.units, arch.width, head).save_npz(path)


def fine_tune(args, init, shots, seed, extra=()):
  """One bit_pytorch.train run (with `extra` flags), in a worker process
  with one thread and its log in LOGDIR/NAME/train.log only; returns
  (top-1, [(step, top-1)])."""
  import torch
  from bit_pytorch import train
  torch.set_num_threads(1)
  sys.stderr = open(os.devnull, 'w')
  name = f'{init}-{shot_name(shots)}shot-seed{seed}'
  model = (args.model if init == 'upstream' else
           scratch_weights(args.model, args.logdir, seed))
  flags = ['--name', name, '--logdir', args.logdir, '--model', model,
           '--dataset', DATASET, '--seed', str(seed),
           '--examples_per_class_seed', str(seed),
           '--batch', str(args.batch), '--total_steps', str(args.steps),
           '--eval_every', str(args.eval_every), '--batch_eval', '800',
           '--resize_size', str(args.resize_size),
           '--crop_size', str(args.crop_size), '--workers', '0', '--no-save']
  if shots is not None:
    flags += ['--examples_per_class', str(shots)]
  flags += list(extra)
  result = train.main(bit_common.argparser().parse_args(flags))
  with open(os.path.join(args.logdir, name, runfiles.METRICS)) as f:
    curve = [(r['step'], r['top1']) for r in map(json.loads, f)
             if r['split'] == 'val']
  return result['top1'], curve


def linear_probe(args, init):
  """bit_pytorch.fewshot of the upstream model or of the same network at
  random initialisation (seed 0: scratch's first network), in a worker
  process with one thread; returns {shots: [top-1 per seed]}."""
  import torch
  from bit_pytorch import fewshot as torch_fewshot
  torch.set_num_threads(1)
  sys.stderr = open(os.devnull, 'w')
  model = (args.model if init == 'upstream' else
           scratch_weights(args.model, args.logdir, 0))
  result = torch_fewshot.main(torch_fewshot.argparser().parse_args(
      ['--model', model, '--dataset', DATASET, '--resolution',
       str(args.crop_size), '--shots', args.linear_shots, '--seeds',
       str(args.seeds), '--workers', '0', '--batch', '200',
       '--out', os.path.join(args.logdir, f'linear-{init}.json')]))
  return result['shots']


def linear_table(linear, model):
  """Markdown: median (min-max) few-shot linear top-1 per shots."""
  lines = [f'| examples per class | {model} (upstream), linear | random '
           'initialisation, linear |', '| --- | --- | --- |']
  for shots in linear['upstream']:
    cells = []
    for init in INITS:
      acc = 100 * np.array(linear[init][shots])
      cells.append(f'{np.median(acc):.1f} ({acc.min():.1f}-{acc.max():.1f})')
    lines.append(f'| {shots} | {cells[0]} | {cells[1]} |')
  return '\n'.join(lines)


def table(results, shots_list, model):
  """Markdown: median (min-max) top-1 per setting."""
  lines = [f'| examples per class | {model} (upstream) | from scratch |',
           '| --- | --- | --- |']
  for shots in shots_list:
    cells = []
    for init in INITS:
      acc = 100 * np.array([r['top1'] for r in results
                            if r['init'] == init and r['shots'] == shots])
      cells.append(f'{np.median(acc):.1f} ({acc.min():.1f}-{acc.max():.1f})')
    lines.append(f'| {shot_name(shots)} | {cells[0]} | {cells[1]} |')
  return '\n'.join(lines)


def plot(results, shots_list, path, title):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, (curves, sizes) = plt.subplots(1, 2, figsize=(10, 3.8))
  colours = plt.rcParams['axes.prop_cycle'].by_key()['color']
  for i, shots in enumerate(shots_list):
    for init, style in zip(INITS, ('-', '--')):
      runs = [r['curve'] for r in results
              if r['init'] == init and r['shots'] == shots]
      steps = [s for s, _ in runs[0]]
      median = np.median([[a for _, a in c] for c in runs], axis=0)
      curves.plot(steps, 100 * median, style, color=colours[i],
                  label=f'{init}, {shot_name(shots)}/class')
  curves.set(xlabel='fine-tuning step', ylabel='validation top-1 (%)',
             title='learning curves (median over seeds)')
  curves.legend(fontsize=7)
  per_class = {None: 100}  # digits: 1000 training images, ~100 per class
  for init, marker in zip(INITS, ('o', 's')):
    xs, med, lo, hi = [], [], [], []
    for shots in shots_list:
      acc = 100 * np.array([r['top1'] for r in results
                            if r['init'] == init and r['shots'] == shots])
      xs.append(per_class.get(shots, shots))
      med.append(np.median(acc))
      lo.append(np.median(acc) - acc.min())
      hi.append(acc.max() - np.median(acc))
    sizes.errorbar(xs, med, yerr=[lo, hi], marker=marker, capsize=3,
                   label=init)
  sizes.set(xscale='log', xlabel='examples per class (log; "all" ~ 100)',
            ylabel='validation top-1 (%)',
            title='median, min and max over seeds')
  sizes.legend()
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  with runfiles.replaced(path, 'wb') as f:
    fig.savefig(f, format='png', dpi=80)
  plt.close(fig)


def main(args):
  shots_list = parse_shots(args.shots)
  linear_shots = args.linear_shots.strip().lower() not in ('', 'none')
  if linear_shots:
    fewshot.parse_list(args.linear_shots, 'linear_shots', int)
  for flag in ('seeds', 'steps', 'batch', 'eval_every', 'processes'):
    if getattr(args, flag) < 1:
      raise errors.BadInput(f'--{flag} must be positive.')
  zoo.weights_path(args.model)  # the bundled file: no download
  os.makedirs(args.logdir, exist_ok=True)
  t0 = time.time()
  results = []
  settings = [(shots, init, seed) for shots in shots_list for init in INITS
              for seed in range(args.seeds)]
  print(f'{len(settings)} fine-tuning runs of {args.steps} steps, '
        f'{args.processes} at a time; logs in {args.logdir}/*/train.log',
        flush=True)
  with concurrent.futures.ProcessPoolExecutor(
      args.processes, mp_context=multiprocessing.get_context('spawn')) as pool:
    probes = {init: pool.submit(linear_probe, args, init)
              for init in (INITS if linear_shots else ())}
    futures = {pool.submit(fine_tune, args, init, shots, seed):
               (shots, init, seed) for shots, init, seed in settings}
    linear = {init: probe.result() for init, probe in probes.items()}
    if linear:
      print(f'few-shot linear evaluation done ({time.time() - t0:.0f}s)',
            flush=True)
    for i, future in enumerate(concurrent.futures.as_completed(futures), 1):
      shots, init, seed = futures[future]
      top1, curve = future.result()
      results.append(dict(init=init, shots=shots, seed=seed, top1=top1,
                          curve=curve))
      print(f'[{i}/{len(settings)}] {init:8s} {shot_name(shots):>3s} per '
            f'class, seed {seed}: top-1 {top1:.1%}  '
            f'({time.time() - t0:.0f}s)', flush=True)
  results.sort(key=lambda r: settings.index((r['shots'], r['init'],
                                             r['seed'])))
  text = table(results, shots_list, args.model)
  png = os.path.join(args.logdir, 'demo.png')
  title = (f'{args.model} vs from scratch on {DATASET}; HyperRule, '
           f'{args.steps} steps, batch {args.batch}, '
           f'{args.resize_size}->{args.crop_size} px, {args.seeds} seeds')
  plot(results, shots_list, png, title)
  minutes = (time.time() - t0) / 60
  linear_text = linear and linear_table(linear, args.model)
  runfiles.write_json(os.path.join(args.logdir, 'demo.json'), dict(
      vars(args), results=results, table=text, minutes=minutes,
      linear=linear, linear_table=linear_text))
  print(f'\nTop-1 on {DATASET} validation (797 images), %: median (min-max) '
        f'over {args.seeds} seeds\n\nFine-tuned ({args.steps} steps):\n\n'
        f'{text}\n')
  if linear:
    print(f'Few-shot linear evaluation (frozen pre-logit features, '
          f'least squares, l2 {fewshot.DEFAULT_L2}; '
          f'{args.crop_size} px):\n\n{linear_text}\n')
  print(f'plot: {png}  ({minutes:.1f} min)')
  return results


if __name__ == '__main__':
  errors.run_cli(lambda: main(argparser().parse_args()))
