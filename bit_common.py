"""The command line every trainer shares, its checks, and the run's logger,
as in the original repository (`argparser`, `setup_logger`). The rest of the
shared layer is the `big_transfer` package.
"""
import argparse
import logging
import os
import sys
import tempfile

from big_transfer import datasets, zoo
from big_transfer.errors import BadInput


# --------------------------------------------------------------------------
# Command line.



def argparser(known_models=None):
  """The CLI every `bit_*.train` shares (the original flags, then ours)."""
  known_models = list(known_models or zoo.MODELS)
  parser = argparse.ArgumentParser(
      description='Fine-tune a BiT model with the BiT-HyperRule.',
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument('--name', required=True,
                      help='Name of this run; outputs go to LOGDIR/NAME, and '
                      'a run started again with the same name resumes.')
  parser.add_argument('--model', default='BiT-M-R50x1',
                      help='A registered model (e.g. ' +
                      ', '.join(known_models[:4]) + ', ...; the full list is '
                      'in the README), a weights file (.npz, .h5, '
                      '.safetensors), a run folder, or hf-hub:ORG/NAME.')
  parser.add_argument('--logdir', required=True,
                      help='Where the log, metrics and checkpoints go.')
  parser.add_argument('--bit_pretrained_dir', default='.',
                      help='Where pre-trained weights are looked for, and '
                      'downloaded to when missing.')
  parser.add_argument('--dataset', default='cifar10',
                      type=datasets.dataset_name,
                      help='One of ' + datasets.dataset_forms() + '; '
                      'imagefolder reads DATADIR/train/<class>/* and '
                      'DATADIR/val (or test)/<class>/*.')
  parser.add_argument('--datadir', default=None,
                      help='Dataset folder: the image folder, the ImageNet '
                      'root, or where a downloadable dataset is stored.')
  parser.add_argument('--tfds_manual_dir', default=None,
                      help='TFDS manual_dir, for datasets TFDS cannot '
                      'download itself.')
  parser.add_argument('--train_split', default=None,
                      help='tfds:/vtab: datasets: the training split (TFDS '
                      'split syntax, e.g. train[:800]; VTAB split names '
                      'for vtab:). Default: train; train800val200 for vtab:.')
  parser.add_argument('--eval_split', default=None,
                      help='tfds:/vtab: datasets: the split evaluated (e.g. '
                      'validation or train[800:1000]+validation). Default: '
                      'validation where it exists, else test; test for '
                      'vtab:.')
  parser.add_argument('--examples_per_class', type=int, default=None,
                      help='Few-shot: draw this many training examples from '
                      'each class.')
  parser.add_argument('--examples_per_class_seed', type=int, default=0,
                      help='Seed of the few-shot draw.')
  parser.add_argument('--batch', type=int, default=512,
                      help='Global batch size.')
  parser.add_argument('--batch_split', type=int, default=1,
                      help='Split each batch into this many micro-batches and '
                      'accumulate their gradients (saves memory).')
  parser.add_argument('--batch_eval', type=int, default=None,
                      help='Evaluation batch size (default: BATCH / '
                      'BATCH_SPLIT).')
  parser.add_argument('--base_lr', type=float, default=0.003,
                      help='Base learning rate of the HyperRule schedule.')
  parser.add_argument('--eval_every', type=int, default=None,
                      help='Evaluate every N steps (and always at the end).')
  parser.add_argument('--workers', type=int, default=min(8, os.cpu_count()),
                      help='Data-loading workers.')
  parser.add_argument('--no-save', dest='save', action='store_false',
                      help='Write no checkpoint.')
  parser.add_argument('--total_steps', type=int, default=None,
                      help='Stretch or compress the HyperRule schedule to this '
                      'many steps, keeping its shape.')
  parser.add_argument('--resize_size', type=int, default=None,
                      help='Override the HyperRule resize resolution.')
  parser.add_argument('--crop_size', type=int, default=None,
                      help='Override the HyperRule crop resolution.')
  parser.add_argument('--seed', type=int, default=0,
                      help='Seed of every random choice of the run.')
  parser.add_argument('--precision', default='fp32',
                      choices=('fp32', 'bf16', 'fp16'),
                      help='Compute precision.')
  parser.add_argument('--skip_bad_images', action='store_true',
                      help='Check every image file whole before training and '
                      'leave out those that cannot be read, instead of '
                      'stopping.')
  parser.add_argument('--mixup_alpha', type=float, default=None,
                      help='Override the HyperRule\'s mixup alpha (0: no '
                      'mixup).')
  parser.add_argument('--save_every', type=int, default=None,
                      help='Also checkpoint every N steps (besides every '
                      'evaluation, every 10 minutes and SIGINT/SIGTERM).')
  return parser


def check_args(args, devices=1):
  """Refuses flag values that cannot work, before any long work starts."""
  for flag in ('batch', 'batch_split', 'total_steps', 'resize_size',
               'crop_size', 'eval_every', 'batch_eval', 'examples_per_class',
               'save_every'):
    value = getattr(args, flag, None)
    if value is not None and value < 1:
      raise BadInput(f'--{flag} must be a positive number, got {value}.')
  mixup = getattr(args, 'mixup_alpha', None)
  if mixup is not None and not 0 <= mixup < float('inf'):
    raise BadInput(f'--mixup_alpha must be 0 (off) or positive, got {mixup}.')
  if not 0 < args.base_lr < float('inf'):
    raise BadInput(f'--base_lr must be a positive number, got '
                   f'{args.base_lr}.')
  if getattr(args, 'workers', 0) < 0:
    raise BadInput(f'--workers must be 0 or more, got {args.workers}.')
  if args.batch % (args.batch_split * devices):
    raise BadInput(f'--batch {args.batch} is not divisible by --batch_split '
                   f'{args.batch_split} times {devices} device(s); choose a '
                   'multiple of their product.')
  if args.dataset in ('imagefolder', 'imagenet2012') and not args.datadir:
    raise BadInput(f'--dataset {args.dataset} needs --datadir.')
  if args.datadir and args.dataset == 'imagefolder' and not os.path.isdir(
      args.datadir):
    raise BadInput(f'--datadir {args.datadir} is not a folder.')
  if (args.resize_size and args.crop_size and
      args.crop_size > args.resize_size):
    raise BadInput(f'--crop_size {args.crop_size} is larger than '
                   f'--resize_size {args.resize_size}.')
  zoo.check_model(args.model)
  check_writable(args)


def check_writable(args, keep=False):
  """Refuses a --logdir where the run folder cannot be made or written;
  folders made for the check are removed again unless `keep`."""
  folder = os.path.abspath(run_dir(args))
  missing, parent = [], folder
  while not os.path.exists(parent):
    missing.append(parent)
    parent = os.path.dirname(parent)
  try:
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryFile(dir=folder):
      pass
  except OSError as e:
    raise BadInput(f'cannot write to {folder} ({e.strerror or e}); give a '
                   '--logdir you can write to.') from None
  finally:
    for made in [] if keep else missing:
      try:
        os.rmdir(made)  # only if still empty
      except OSError:
        pass  # another process of the run uses it, or removed it already


def backend_argparser(add_flags):
  """The shared parser plus a backend's own flags (`add_flags(parser)`)."""
  return add_flags(argparser())


def with_backend_defaults(args, add_flags):
  """`args` from the shared parser, completed with the defaults of the
  backend's own flags (for in-process use)."""
  defaults = add_flags(argparse.ArgumentParser()).parse_args([])
  return argparse.Namespace(**{**vars(defaults), **vars(args)})



# --------------------------------------------------------------------------
# Logging and run outputs under LOGDIR/NAME.

def run_dir(args):
  return os.path.join(args.logdir, args.name)


def setup_logger(args):
  """Logger to stderr and LOGDIR/NAME/train.log."""
  check_writable(args, keep=True)
  logger = logging.getLogger(f'bit.{args.name}')
  logger.setLevel(logging.INFO)
  logger.propagate = False
  for h in list(logger.handlers):
    logger.removeHandler(h)
    h.close()
  fmt = logging.Formatter('%(asctime)s %(levelname)s %(message)s',
                          '%Y-%m-%d %H:%M:%S')
  for h in (logging.StreamHandler(sys.stderr),
            logging.FileHandler(os.path.join(run_dir(args), 'train.log'))):
    h.setFormatter(fmt)
    logger.addHandler(h)
  return logger



def run_logger(args, lead=True):
  """The run's logger on the lead process; a silent one elsewhere."""
  return setup_logger(args) if lead else logging.getLogger('bit.quiet')
