"""The command line every trainer shares and its checks, as in the original
repository (`argparser`; its `setup_logger` is runfiles', still importable
from here). The rest of the shared layer is the `big_transfer` package.
"""
import argparse

from big_transfer import datasets, flags, runfiles, zoo
from big_transfer.errors import BadInput
# The original's names, used by its notebooks (now runfiles'):
from big_transfer.runfiles import run_dir, setup_logger

__all__ = ['argparser', 'check_args', 'run_dir', 'setup_logger',
           'with_backend_defaults']


# --------------------------------------------------------------------------
# Command line.

def argparser(known_models=None, backend_flags=None):
  """The CLI every `bit_*.train` shares: the original flags, then ours, then
  `backend_flags` (a backend's own group, from flags.group). `known_models`
  (the original's argument: a backend's KNOWN_MODELS) are the registered
  names the help shows first.

  A flag added again replaces this one, as the original trainers' scripts
  add --datadir, --workers, --no-save, --batch_eval and --tfds_manual_dir
  to this parser themselves."""
  examples = tuple(list(known_models or [])[:4]) or flags.EXAMPLE_MODELS
  return flags.parser(
      'Fine-tune a BiT model with the BiT-HyperRule.', flags.run(),
      flags.model(examples=examples), flags.dataset(), flags.loading(),
      flags.holding(), flags.fewshot(), flags.batches(), flags.batch_split(),
      flags.schedule(), flags.precision(training=True),
      *([backend_flags] if backend_flags else []), conflict_handler='resolve')


def check_args(args, devices=1):
  """Refuses flag values that cannot work, before any long work starts."""
  flags.check_at_least(args, (
      'batch', 'total_steps', 'resize_size', 'crop_size', 'eval_every',
      'batch_eval', 'examples_per_class', 'save_every'))
  flags.check_at_least(args, ('workers',), 0)
  mixup = getattr(args, 'mixup_alpha', None)
  if mixup is not None and not 0 <= mixup < float('inf'):
    raise BadInput(f'--mixup_alpha must be 0 (off) or positive, got {mixup}.')
  if not 0 < args.base_lr < float('inf'):
    raise BadInput(f'--base_lr must be a positive number, got '
                   f'{args.base_lr}.')
  flags.check_batch_split(args.batch, args.batch_split, devices, '--batch')
  datasets.check_source(args)
  if (args.resize_size and args.crop_size and
      args.crop_size > args.resize_size):
    raise BadInput(f'--crop_size {args.crop_size} is larger than '
                   f'--resize_size {args.resize_size}.')
  zoo.check_model(args.model)
  runfiles.check_run_dir(args)


def with_backend_defaults(args, backend_flags):
  """`args` of the shared parser, completed with the defaults of a backend's
  own flags (for in-process use)."""
  return argparse.Namespace(**{**vars(backend_flags.parse_args([])),
                               **vars(args)})
