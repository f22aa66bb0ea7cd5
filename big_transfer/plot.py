"""Curves of one or several runs, side by side, from their metrics.jsonl:

  python -m big_transfer.plot RUN_DIR [RUN_DIR...] --out runs.png

Three panels: loss (training solid, validation dashed with markers), learning
rate, and validation accuracy (top-1 solid, top-5 dotted); one colour per
run, named by its folder.
"""
import json
import os
import sys

from big_transfer import flags, runfiles
from big_transfer.errors import BadInput, run_cli

PANELS = (('loss', 'loss'), ('lr', 'learning rate'),
          ('accuracy', 'validation accuracy'))


def read_run(run_dir):
  """{split: {name: ([steps], [values])}} from RUN_DIR/metrics.jsonl."""
  path = os.path.join(run_dir, runfiles.METRICS)
  if not os.path.isfile(path):
    raise BadInput(f'{run_dir} has no metrics.jsonl; give run folders '
                   '(LOGDIR/NAME).')
  series = {}
  with open(path) as f:
    for n, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
        step, split = int(row['step']), row['split']
      except (ValueError, KeyError, TypeError) as e:
        raise BadInput(f'{path}, line {n}: not a metrics row ({e}).') from e
      for name, value in row.items():
        if name in ('step', 'split') or isinstance(value, bool) or \
            not isinstance(value, (int, float)):
          continue
        steps, values = series.setdefault(split, {}).setdefault(name,
                                                                ([], []))
        steps.append(step)
        values.append(value)
  if not series:
    raise BadInput(f'{path} is empty: the run has not logged yet.')
  return series


def plot(run_dirs, out, title=None):
  """Draws the runs' curves into `out` (a PNG); returns `out`."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  runs = [(os.path.basename(os.path.normpath(d)) or d, read_run(d))
          for d in run_dirs]
  fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 4))
  for i, (label, series) in enumerate(runs):
    colour = f'C{i % 10}'
    train, val = series.get('train', {}), series.get('val', {})
    ax = axes[0]
    if 'loss' in train:
      ax.plot(*train['loss'], color=colour, label=f'{label} train')
    if 'loss' in val:
      ax.plot(*val['loss'], color=colour, ls='--', marker='o', ms=3,
              label=f'{label} val')
    if 'lr' in train:
      axes[1].plot(*train['lr'], color=colour, label=label)
    ax = axes[2]
    if 'top1' in val:
      ax.plot(*val['top1'], color=colour, marker='o', ms=3,
              label=f'{label} top-1')
    if 'top5' in val:
      ax.plot(*val['top5'], color=colour, ls=':', label=f'{label} top-5')
  for ax, (_, name) in zip(axes, PANELS):
    ax.set_title(name)
    ax.set_xlabel('step')
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize='small')
    else:
      ax.text(0.5, 0.5, 'not logged', ha='center', va='center',
              transform=ax.transAxes, color='grey')
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  with runfiles.replaced(out, 'wb') as f:
    fig.savefig(f, format='png', dpi=100)
  plt.close(fig)
  return out


def main(argv=None):
  parser = flags.parser(
      'Plot loss, learning rate and accuracy of runs from their '
      'metrics.jsonl.')
  parser.add_argument('run_dirs', nargs='+', metavar='RUN_DIR',
                      help='Run folders (LOGDIR/NAME), each with a '
                      'metrics.jsonl.')
  parser.add_argument('--out', default='runs.png',
                      help='The PNG to write.')
  parser.add_argument('--title', default=None,
                      help='A title above the plots.')
  args = parser.parse_args(argv)
  if not args.out.lower().endswith('.png'):
    raise BadInput(f'--out {args.out}: give a .png file name.')
  runfiles.check_out(args.out)
  print(plot(args.run_dirs, args.out, args.title))


if __name__ == '__main__':
  run_cli(main, sys.argv[1:])
