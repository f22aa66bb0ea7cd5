"""The command-line flags, defined once, in groups that every command
composes (argparse `parents=`): a flag has the same name, meaning and help in
every command that takes it.

  parser = flags.parser('Fine-tune a BiT model.', flags.run(),
                        flags.model(), flags.dataset(), flags.loading())

Each group function returns a new parent parser, so a command may change a
default with `parser.set_defaults(...)` without touching the others.
"""
import argparse
import os
import sys

from big_transfer import datasets, hardware, vtab
from big_transfer.errors import BadInput


class _Help(argparse.ArgumentDefaultsHelpFormatter):
  """--help with each flag's default, but for switches (a default of True
  beside --no-save reads as if saving were off), for flags without one (a
  required flag, or None that the help already explains) and where the help
  names its default itself."""

  def _get_help_string(self, action):
    if (action.nargs == 0 or action.default in (None, [])
        or 'default' in (action.help or '').lower()):
      return action.help
    return super()._get_help_string(action)


def parser(description, *groups, prog=None, conflict_handler='error'):
  """A command's parser made of `groups` (parent parsers), showing defaults
  in --help; its usage line names the command as it was started (`python
  -m bit_jax.train`, where argparse would say train.py)."""
  return argparse.ArgumentParser(
      prog=prog or _started_as(), description=description, parents=groups,
      formatter_class=_Help, conflict_handler=conflict_handler)


def _started_as():
  """`python -m MODULE` for a program started with -m, else None (argparse's
  own: the script's file name)."""
  spec = getattr(sys.modules.get('__main__'), '__spec__', None)
  if spec is None:
    return None
  return f'python -m {spec.name.removesuffix(".__main__")}'


def group(title):
  """(parent parser, its titled argument group)."""
  parent = argparse.ArgumentParser(add_help=False)
  return parent, parent.add_argument_group(title)


SEED_MAX = 2**32 - 1  # The largest seed TF2 takes (PyTorch and JAX take more).


def seed(value):
  """argparse type of a seed: an integer that every backend's generators
  take, 0 to SEED_MAX."""
  number = int(value)
  if not 0 <= number <= SEED_MAX:
    raise argparse.ArgumentTypeError(
        f'{value} is not a seed; give an integer from 0 to {SEED_MAX}.')
  return number


def run_name(value):
  """argparse type of --name: a folder under --logdir (nested names such as
  cifar10/run0 too), never --logdir itself or a folder outside it."""
  if (os.path.isabs(value) or os.path.normpath(value or '.') == '.' or
      os.pardir in value.split(os.sep)):
    raise argparse.ArgumentTypeError(
        f'{value!r} is not a run name; give a folder name under --logdir '
        '(not empty, not absolute, without "..").')
  return value


def run():
  """Where a run writes, how it saves, its seed."""
  parent, g = group('run')
  g.add_argument('--name', required=True, type=run_name,
                 help='Name of this run; outputs go to LOGDIR/NAME, and a run '
                 'started again with the same name resumes.')
  g.add_argument('--logdir', required=True,
                 help='Where the log, metrics and checkpoints go.')
  g.add_argument('--seed', type=seed, default=0,
                 help='Seed of every random choice of the run: initialisation '
                 'of anything new, data order, augmentation, mixup.')
  g.add_argument('--save_every', type=int, default=None,
                 help='Also checkpoint every N steps (besides every '
                 'evaluation, every 10 minutes and SIGINT/SIGTERM).')
  g.add_argument('--no-save', dest='save', action='store_false',
                 help='Write no checkpoint and no exported model.')
  return parent


EXAMPLE_MODELS = ('BiT-M-R50x1', 'BiT-S-R101x3', 'BiT-M-R50x1-ILSVRC2012',
                  'BiT-M-R50x1-run0-dtd')


def model(default='BiT-M-R50x1', required=False, examples=EXAMPLE_MODELS,
          forms='a weights file (.npz, .h5, .safetensors), a run folder '
          'holding model.npz'):
  """The weights a command starts from, and where registered ones live;
  `examples`: registered names the help shows; `forms`: the other forms the
  command takes."""
  parent, g = group('model')
  g.add_argument('--model', default=None if required else default,
                 required=required,
                 help=f'A registered model (e.g. {", ".join(examples)}), '
                 f'{forms}, or hf-hub:ORG/NAME.')
  _pretrained_dir(g)
  return parent


def pretrained_dir():
  """Where registered weights live (for commands that name weights with
  flags of their own)."""
  parent, g = group('model')
  _pretrained_dir(g)
  return parent


def _pretrained_dir(g):
  g.add_argument('--bit_pretrained_dir', default='.',
                 help='Where registered weights (and label files) are looked '
                 'for, and downloaded to when missing.')


def dataset():
  """Which dataset, where it is, and its splits."""
  parent, g = group('dataset')
  g.add_argument('--dataset', default='cifar10', type=datasets.dataset_name,
                 help='One of ' + datasets.dataset_forms() + '; imagefolder '
                 'reads DATADIR/train/<class>/* and DATADIR/val (or '
                 'test)/<class>/*.')
  g.add_argument('--datadir', default=None,
                 help='Dataset folder: the image folder, the ImageNet root, '
                 'the TFDS data_dir, or where a downloadable dataset is '
                 'stored.')
  g.add_argument('--tfds_manual_dir', default=None,
                 help='TFDS manual_dir, for datasets TFDS cannot download '
                 'itself.')
  g.add_argument('--train_split', default=None,
                 help='tfds:/vtab: datasets: the training split (TFDS split '
                 'syntax, e.g. train[:800]; for vtab: one of '
                 f'{", ".join(vtab.SPLITS)}). Default: train; '
                 'train800val200 for vtab:.')
  g.add_argument('--eval_split', default=None,
                 help='tfds:/vtab: datasets: the split evaluated (e.g. '
                 'validation or train[800:1000]+validation). Default: '
                 'validation where it exists, else test; test for vtab:.')
  return parent


def loading():
  """How images are read."""
  parent, g = group('loading')
  g.add_argument('--workers', type=int, default=hardware.default_workers(),
                 help='Data-loading workers (processes for training; '
                 'threads for evaluation in JAX and TF2, and for '
                 'prediction). Default: the '
                 'cores this process may use, less one, shared among the '
                 'training processes of this machine: here %(default)s.')
  g.add_argument('--skip_bad_images', action='store_true',
                 help='Check every image file whole before starting and leave '
                 'out those that cannot be read, instead of stopping.')
  return parent


def holding():
  """Fine-tuning's training images decoded once (big_transfer.held)."""
  parent, g = group('holding')
  g.add_argument('--hold_images', action=argparse.BooleanOptionalAction,
                 default=None,
                 help='Decode each training image once and keep it resized, '
                 'in the run folder, while the run lasts: the same pixels, '
                 'for a fraction of the host\'s work. Default: when the '
                 'images are decoded (files or encoded bytes), in one '
                 'training process, each read at least twice, and fit in '
                 'a quarter of the memory.')
  return parent


def fewshot():
  """The few-shot subset of the training split."""
  parent, g = group('few-shot')
  g.add_argument('--examples_per_class', type=int, default=None,
                 help='Few-shot: draw this many training examples from each '
                 'class.')
  g.add_argument('--examples_per_class_seed', type=seed, default=0,
                 help='Seed of the few-shot draw.')
  return parent


def count_or_auto(value):
  """--batch_split's value: a number, or 'auto' (None: the run chooses)."""
  return None if value == 'auto' else int(value)


def batch_split():
  """Gradient accumulation; 'auto': the run chooses (big_transfer.memory)."""
  parent, g = group('batch split')
  g.add_argument('--batch_split', type=count_or_auto, default=1,
                 metavar='N|auto',
                 help='Split each batch into this many micro-batches and '
                 'accumulate their gradients (saves memory); auto: the '
                 'fewest whose step fits in memory, by an estimate.')
  return parent


def round_up(n, multiple):
  """The smallest multiple of `multiple` from `n` on."""
  return -(-n // multiple) * multiple


def eval_batch(batch_eval, batch, devices):
  """The global evaluation batch: `batch_eval` (--batch_eval, or a distill
  recipe's), else `batch` (what one training micro-batch holds), rounded up
  to a multiple of the `devices` so that each gets as many rows."""
  return round_up(batch_eval or batch, devices)


def check_at_least(args, names, low=1):
  """Refuses a flag of `names` (unset, None, allowed) whose value in `args`
  is below `low`: 1 for a count, 0 for one where 0 means none."""
  for name in names:
    value = getattr(args, name, None)
    if value is not None and value < low:
      need = 'a positive number' if low == 1 else f'{low} or more'
      raise BadInput(f'--{name} must be {need}, got {value}.')


def check_batch_split(batch, split, devices, batch_name='batch'):
  """Refuses a --batch_split below 1, and a batch that does not divide over
  it (where given) times the devices."""
  if split is not None and split < 1:
    raise BadInput(f'--batch_split must be a positive number, got {split}.')
  if batch % ((split or 1) * devices):
    raise BadInput(f'{batch_name} {batch} is not divisible by '
                   + (f'--batch_split {split} times ' if split else '')
                   + f'{devices} device(s); choose a multiple of '
                   + ('their product.' if split else 'it.'))


def batches():
  """Fine-tuning's batch sizes."""
  parent, g = group('batches')
  g.add_argument('--batch', type=int, default=512, help='Global batch size.')
  g.add_argument('--batch_eval', type=int, default=None,
                 help='Evaluation batch size (default: BATCH / BATCH_SPLIT).')
  return parent


def schedule():
  """The BiT-HyperRule and what overrides it."""
  parent, g = group('BiT-HyperRule')
  g.add_argument('--base_lr', type=float, default=0.003,
                 help='Base learning rate of the HyperRule schedule.')
  g.add_argument('--total_steps', type=int, default=None,
                 help='Stretch or compress the HyperRule schedule to this '
                 'many steps, keeping its shape.')
  g.add_argument('--eval_every', type=int, default=None,
                 help='Evaluate every N steps (and always at the end).')
  g.add_argument('--resize_size', type=int, default=None,
                 help='Override the HyperRule resize resolution.')
  g.add_argument('--crop_size', type=int, default=None,
                 help='Override the HyperRule crop resolution.')
  g.add_argument('--mixup_alpha', type=float, default=None,
                 help='Override the HyperRule\'s mixup alpha (0: no mixup).')
  return parent


def precision(choices=('fp32', 'bf16', 'fp16'), training=False):
  """Compute precision; `choices`: those the command supports. Training
  commands default to bf16 where the accelerator computes it natively and
  to fp32 elsewhere (resolve_precision); the others to fp32."""
  parent, g = group('precision')
  g.add_argument('--precision', default=None if training else 'fp32',
                 choices=choices,
                 help='Compute precision (weights, loss and optimiser stay '
                 'float32).' + (' Default: bf16 on TPUs and on GPUs with '
                                'bf16 (compute capability 8.0 and later), '
                                'fp32 elsewhere.' if training else ''))
  return parent


# bf16 autocast fine-tuned to the accuracy of fp32 (python -m
# benchmarks.precision: docs/gpu.md) at twice the rate or more on GPUs.
def resolve_precision(args, native_bf16):
  """args.precision, set first where the command line left it to the
  machine: bf16 where `native_bf16` (the accelerator computes bf16
  natively), else fp32."""
  if args.precision is None:
    args.precision = 'bf16' if native_bf16 else 'fp32'
  return args.precision


def add_compile(g, backend, what, default):
  """A backend's --compile/--no-compile into its group `g`: None unless
  given, and the backend then decides as `default` says."""
  g.add_argument('--compile', action=argparse.BooleanOptionalAction,
                 default=None,
                 help=f'{backend} only: {what}. Default: {default}.')


def recipe(what):
  """A run described by a YAML recipe (pre-training, distillation); `what`
  says what the recipe holds."""
  parent, g = group('recipe')
  g.add_argument('--recipe', required=True,
                 help=f'A shipped recipe by name (big_transfer/recipes/) or a '
                 f'YAML file: {what}.')
  g.add_argument('--set', dest='overrides', action='append', default=[],
                 metavar='KEY=VALUE',
                 help='Override a recipe value, e.g. --set steps=100.')
  g.add_argument('--datadir', default=None,
                 help='Dataset folder (overrides the recipe\'s).')
  g.add_argument('--export', default=None,
                 help='Where to write the trained .npz (default '
                 'LOGDIR/NAME/model.npz).')
  return parent


def images(batch, resolution_help):
  """Inference over images: the resolution and the forward batch."""
  parent, g = group('images')
  g.add_argument('--resolution', type=int, default=None, help=resolution_help)
  g.add_argument('--batch', type=int, default=batch,
                 help='Images per forward pass, over all local devices.')
  return parent
