"""The command line every trainer shares, its checks, and the run's logger,
as in the original repository (`argparser`, `setup_logger`). The rest of the
shared layer is the `big_transfer` package.
"""
import argparse
import logging
import os
import sys

from big_transfer import datasets, flags, runfiles, zoo
from big_transfer.errors import BadInput


# --------------------------------------------------------------------------
# Command line.

def argparser(known_models=None, backend_flags=None):
  """The CLI every `bit_*.train` shares: the original flags, then ours, then
  `backend_flags` (a backend's own group, from flags.group). `known_models`
  (the original's argument: a backend's KNOWN_MODELS) are the registered
  names the help shows first."""
  examples = tuple(list(known_models or [])[:4]) or flags.EXAMPLE_MODELS
  return flags.parser(
      'Fine-tune a BiT model with the BiT-HyperRule.', flags.run(),
      flags.model(examples=examples), flags.dataset(), flags.loading(),
      flags.holding(), flags.fewshot(), flags.batches(), flags.batch_split(),
      flags.schedule(), flags.precision(training=True),
      *([backend_flags] if backend_flags else []))


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
  check_writable(args)


def check_writable(args, keep=False):
  """Refuses a --logdir where the run folder cannot be made or written;
  folders made for the check are removed again unless `keep`."""
  runfiles.check_writable(run_dir(args), 'make it writable or give another '
                          '--logdir.', keep)


def with_backend_defaults(args, backend_flags):
  """`args` of the shared parser, completed with the defaults of a backend's
  own flags (for in-process use)."""
  return argparse.Namespace(**{**vars(backend_flags.parse_args([])),
                               **vars(args)})


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
            LogFile(os.path.join(run_dir(args), runfiles.LOG))):
    h.setFormatter(fmt)
    logger.addHandler(h)
  return logger


class LogFile(logging.FileHandler):
  """train.log. When a write fails (a full disk), says so once on stderr
  and writes no more to it, instead of a traceback per message."""
  failed = False

  def emit(self, record):
    if not self.failed:
      super().emit(record)

  def handleError(self, record):
    err = sys.exc_info()[1]
    if self.failed or not isinstance(err, OSError):
      return super().handleError(record)
    self.failed = True
    print(f'warning: cannot write to {self.baseFilename} '
          f'({err.strerror or err}); logging on stderr only.', file=sys.stderr)
    return None

  def close(self):
    try:
      super().close()
    except OSError:  # closed; its last lines are lost with the full disk
      pass


def run_logger(args, lead=True):
  """The run's logger on the lead process; a silent one elsewhere."""
  return setup_logger(args) if lead else logging.getLogger('bit.quiet')
