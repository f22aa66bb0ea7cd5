"""What a run writes under LOGDIR/NAME, by name, and the one way the shared
layer writes a file whole: `replaced(path)` (and `write_json` on it).

A run folder holds:

  train.log       LOG: the human log (also on stderr)
  config.json     CONFIG: every flag and the resolved settings
  metrics.jsonl   METRICS: one JSON object per training step and evaluation
  model.npz       MODEL: the trained weights in the published layout, which
                  every backend (and --model RUN_FOLDER) loads
  results.json    RESULTS: the final evaluation, written last
  .lock           LOCK: held by the live run
  and the framework's checkpoint: TORCH_CHECKPOINT (PyTorch fine-tuning),
  DISTILL_CHECKPOINT and PRETRAIN_CHECKPOINT (PyTorch distillation and
  pre-training), CHECKPOINTS (a folder: JAX's and TF2's).
"""
import contextlib
import glob
import json
import logging
import os
import shutil
import sys
import tempfile

import numpy as np

from big_transfer.errors import BadInput

LOG = 'train.log'
CONFIG = 'config.json'
METRICS = 'metrics.jsonl'
MODEL = 'model.npz'
RESULTS = 'results.json'
LOCK = '.lock'
TORCH_CHECKPOINT = 'bit.pth.tar'
DISTILL_CHECKPOINT = 'distill.pth.tar'
PRETRAIN_CHECKPOINT = 'pretrain.pth.tar'
CHECKPOINTS = 'checkpoints'


def run_config(model):
  """The config.json of the run that `model` names (its folder, or the
  MODEL in it) as a dict; {} for any other model or an unreadable file."""
  if os.path.isdir(model):
    folder = model
  elif os.path.basename(model) == MODEL:
    folder = os.path.dirname(model)
  else:
    return {}
  try:
    with open(os.path.join(folder, CONFIG)) as f:
      config = json.load(f)
  except (OSError, ValueError):
    return {}
  return config if isinstance(config, dict) else {}


def trained_crop(model):
  """The crop size a fine-tuning run trained `model` at (see run_config),
  or None where it is not known."""
  resolution = run_config(model).get('resolution')
  return (resolution[1] if isinstance(resolution, list) and len(resolution)
          == 2 and isinstance(resolution[1], int) else None)


@contextlib.contextmanager
def replaced(path, mode='w', keep=None):
  """A new file whose content replaces `path` when the block ends without
  an error: written to a temporary file beside it, flushed and synced to
  disk, renamed over `path`, and the folder synced, so that `path` is
  either its old content or the whole new one after a crash or a power
  cut. With `keep`, the old file is renamed to `keep` first. On an error
  nothing changes and the temporary file is removed."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=f'.{os.path.basename(path)}.',
                             suffix='.part')
  try:
    with os.fdopen(fd, mode) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    if keep and os.path.exists(path):
      os.replace(path, keep)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  sync_folder(folder)


def cache_dir(*parts):
  """The folder of what the package keeps to save time, and can compute
  again (`parts` below it): $BIT_CACHE, else $XDG_CACHE_HOME/big_transfer,
  else ~/.cache/big_transfer."""
  root = os.environ.get('BIT_CACHE') or os.path.join(
      os.environ.get('XDG_CACHE_HOME') or
      os.path.join(os.path.expanduser('~'), '.cache'), 'big_transfer')
  return os.path.join(root, *parts)


def file_stamp(path):
  """What changes when the file at `path` is replaced or rewritten, for the
  keys of what the cache keeps: its real path, size and modification time."""
  stat = os.stat(path)
  return f'{os.path.realpath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}'


def missing_folders(path):
  """The folders that making `path` would add, `path` first (absolute; none
  where it exists)."""
  missing, path = [], os.path.abspath(path)
  while not os.path.lexists(path):
    missing.append(path)
    path = os.path.dirname(path)
  return missing


@contextlib.contextmanager
def removed_on_failure(folder):
  """Runs a block that fills `folder` (a dataset's download, say): where
  it fails, the folders it made for `folder` go again with what they hold
  (nothing that existed before the block is touched)."""
  made = missing_folders(folder) if folder else []
  try:
    yield
  except BaseException:
    if made:
      shutil.rmtree(made[-1], ignore_errors=True)
    raise


def remove_empty(folders):
  """Removes `folders` (missing_folders's, deepest first) while they are
  empty: another process may have begun to fill one."""
  for folder in folders:
    try:
      os.rmdir(folder)
    except OSError:
      break


def check_writable(folder, hint, keep=False):
  """Refuses (BadInput, ending with `hint`) a folder that cannot be made or
  written in. With `keep` the folder is made; without, the check leaves
  nothing behind and makes nothing that another process checking the same
  folder could see (a missing folder: a uniquely named one made and removed
  in its nearest existing parent)."""
  folder = os.path.abspath(folder)
  missing = missing_folders(folder)
  parent = os.path.dirname(missing[-1]) if missing else folder
  try:
    if keep:
      os.makedirs(folder, exist_ok=True)
      parent = folder
    if parent == folder:
      with tempfile.TemporaryFile(dir=folder):
        pass
    else:
      os.rmdir(tempfile.mkdtemp(dir=parent))
  except OSError as e:
    raise BadInput(f'cannot write to {folder} ({e.strerror or e}); '
                   f'{hint}') from None


def run_dir(args):
  """LOGDIR/NAME: the run folder of `args` (--logdir, --name)."""
  return os.path.join(args.logdir, args.name)


def check_run_dir(args, keep=False):
  """Refuses a --logdir where the run folder cannot be made or written;
  folders made for the check are removed again unless `keep`."""
  check_writable(run_dir(args), 'make it writable or give another '
                 '--logdir.', keep)


def _stamped():
  return logging.Formatter('%(asctime)s %(levelname)s %(message)s',
                           '%Y-%m-%d %H:%M:%S')


def setup_logger(args):
  """Logger to stderr and LOGDIR/NAME/train.log."""
  check_run_dir(args, keep=True)
  logger = logging.getLogger(f'bit.{args.name}')
  logger.setLevel(logging.INFO)
  logger.propagate = False
  for h in list(logger.handlers):
    logger.removeHandler(h)
    h.close()
  for h in (logging.StreamHandler(sys.stderr),
            LogFile(os.path.join(run_dir(args), LOG))):
    h.setFormatter(_stamped())
    logger.addHandler(h)
  return logger


def console_logger(command, stamped=False):
  """The logger of a command that writes no run folder: INFO lines on
  stderr, with their time and level where `stamped`. Its lines do not reach
  the root logger, to which TF, absl or grain may have given a handler of
  their own (each line would show twice)."""
  logger = logging.getLogger(f'bit.{command}')
  if not logger.handlers:
    handler = logging.StreamHandler(sys.stderr)
    if stamped:
      handler.setFormatter(_stamped())
    logger.addHandler(handler)
  logger.setLevel(logging.INFO)
  logger.propagate = False
  return logger


def run_logger(args, lead=True):
  """The run's logger on the lead process; a silent one elsewhere."""
  return setup_logger(args) if lead else logging.getLogger('bit.quiet')


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


def check_out(out, flag='--out'):
  """`out`, an output file or folder (given with `flag`), once its parent
  folder is known to be writable (BadInput otherwise), before the work that
  writes it."""
  check_writable(os.path.dirname(os.path.abspath(out)), f'give another {flag}.')
  return out


def remove_leftovers(folder, logger=None):
  """Removes the temporary files that a process killed while writing left
  in `folder` (replaced's `.NAME.*.part`)."""
  for path in glob.glob(os.path.join(folder, '.*.part')):
    os.remove(path)
    if logger:
      logger.info(f'removed {path}, left by a write that did not finish')


def write_json(path, obj):
  """Writes `obj` as indented JSON (NumPy values as numbers and lists),
  whole or not at all."""
  with replaced(path) as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=_json_default)
    f.write('\n')


def _json_default(obj):
  if isinstance(obj, np.generic):
    return obj.item()
  if isinstance(obj, (np.ndarray, tuple, set)):
    return list(obj)
  return str(obj)


def sync_folder(folder):
  """Syncs a folder's entries (a rename in it) to disk."""
  fd = os.open(folder, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)
