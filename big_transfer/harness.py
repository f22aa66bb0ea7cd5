"""The run harness: everything a training run does the same way in every
backend, for fine-tuning and pre-training alike.

A trainer (`bit_pytorch.train`, `bit_tf2.train`, `bit_jax.train`,
`bit_pytorch.pretrain`) keeps only what its framework needs: the devices,
the compiled step, its checkpoint format. It hands the rest to a `Run`:

  with harness.Run(args, lead=...) as run:    # run folder, lock, logger
    step = run.resume(checkpoints, settings)  # the newest readable checkpoint
    run.start(step, config, summary)          # config.json, metrics.jsonl
    result, step = run.fit(step, total, lr_at, train, evaluate, checkpoints)
    run.finish(result, step, export)          # model.npz, results.json

The `with` block closes the run's files and releases its lock however it
ends; a run refused (BadInput) before `start` removes the folder it made.

`fit` is the training loop: it asks the trainer for one step at a time
(`train(step, lr)`, which returns that step's loss *on the device*), reads
the losses back in bulk every LOG_EVERY steps (so an accelerator's queue
never drains at a step; the first step alone is read back at once and its
time logged: the compilation's; one process alone reads back sooner where
progress.LINE_SECONDS have passed since the last read-back), writes one
metrics row per step, evaluates, checkpoints at evaluations, every
--save_every steps, every SAVE_MINUTES of training and on SIGINT/SIGTERM,
and stops at the first loss that is not a number, before any checkpoint
could hold its weights.
"""
import dataclasses
import fcntl
import importlib.metadata
import json
import logging
import os
import platform
import shutil
import signal
import sys
import threading
import time
import typing

import numpy as np

import bit_hyperrule
from big_transfer import (datastream, events, hardware, held, metrics,
                          progress, runfiles)
from big_transfer.errors import BadInput, Diverged, RunFailed, out_of_memory

LOG_EVERY = 10       # steps between reading losses back from the device
SAVE_MINUTES = 10    # a checkpoint at least this often (of training time)


# --------------------------------------------------------------------------
# Files under LOGDIR/NAME.

class Metrics:
  """Appends one JSON object per line to LOGDIR/NAME/metrics.jsonl, and
the same scalars to a TensorBoard event file beside it.

  On resume, lines from steps after the checkpoint are dropped first (the
  file is rewritten whole or not at all), so it reads as one uninterrupted
  run; a last line that a killed process left half-written is cut off with
  a warning to `logger`.
  """

  def __init__(self, args, resume_step=0, logger=None):
    self.path = os.path.join(runfiles.run_dir(args), runfiles.METRICS)
    kept = []
    if resume_step and os.path.exists(self.path):
      with open(self.path) as f:
        lines = [l for l in f if l.strip()]
      for i, line in enumerate(lines):
        try:
          record = json.loads(line)
        except ValueError:
          if i < len(lines) - 1:
            raise BadInput(f'{self.path}, line {i + 1}, is not JSON; the '
                           'file is damaged: move it away to resume.') from None
          if logger:
            logger.warning(f'{self.path}: cut off its last line, which a '
                           'stopped process left half-written.')
          break
        if record['step'] <= resume_step:
          kept.append(line if line.endswith('\n') else line + '\n')
    with runfiles.replaced(self.path) as f:
      f.writelines(kept)
    self._file = open(self.path, 'a')
    self._tensorboard = events.TensorBoard(runfiles.run_dir(args),
                                                    resume_step)

  def write(self, step, split, **values):
    record = {'step': int(step), 'split': split}
    record.update({k: v.item() if isinstance(v, np.generic) else v
                   for k, v in values.items()})
    self._file.write(json.dumps(record) + '\n')
    self._file.flush()
    self._tensorboard.scalars(step, split, values)

  def close(self):
    """Closes both files; a line that a full disk refused is dropped (the
    next start cuts a torn one off)."""
    for f in (self._file, self._tensorboard):
      try:
        f.close()
      except OSError:
        pass


def versions(*names):
  """{name: version} of Python, numpy and the packages `names` (module or
  distribution names): an imported module's own version string (torch's
  names its CUDA build), else the installed distribution's, without
  importing it (torchvision's import alone takes over a second); '?' for
  one that is not installed."""
  out = {'python': platform.python_version(), 'numpy': np.__version__}
  for name in names:
    module = sys.modules.get(name)
    try:
      out[name] = getattr(module, '__version__', None) or (
          importlib.metadata.version(name))
    except importlib.metadata.PackageNotFoundError:
      out[name] = '?'
  return out


# --------------------------------------------------------------------------
# Fine-tuning settings: the BiT-HyperRule for the data, with the command
# line's overrides.

@dataclasses.dataclass
class HyperRule:
  """What the BiT-HyperRule (and the flags that override it) resolve to for
  one fine-tuning run."""
  resize: int
  crop: int
  schedule: list        # [end of warm-up, decays..., end]
  mixup: float          # mixup alpha; 0: off
  dataset_size: int
  base_lr: float
  total_steps: int = None   # --total_steps

  @classmethod
  def of(cls, args, dataset_size, original_hw):
    mixup = getattr(args, 'mixup_alpha', None)
    resize, crop = bit_hyperrule.resolution(original_hw, args.resize_size,
                                            args.crop_size)
    if crop > resize:  # --resize_size alone, below the HyperRule's crop
      raise BadInput(f'--resize_size {resize} is smaller than the '
                     f'HyperRule\'s crop for this dataset, {crop}; give a '
                     f'--crop_size of at most {resize} too.')
    return cls(resize, crop,
               bit_hyperrule.get_schedule(dataset_size, args.total_steps),
               bit_hyperrule.get_mixup(dataset_size) if mixup is None
               else mixup, dataset_size, args.base_lr, args.total_steps)

  @property
  def total(self):
    return self.schedule[-1]

  def lr(self, step):
    return bit_hyperrule.get_lr(step, self.dataset_size, self.base_lr,
                                self.total_steps)

  def stream(self, args):
    """The run's data stream (datastream.Stream)."""
    return datastream.Stream(self.dataset_size, args.batch, args.seed,
                           self.mixup)

  def settings(self, args, classes):
    """What a resumed run must share with the checkpoint it resumes."""
    return dict(model=args.model, dataset=args.dataset, classes=classes,
                dataset_size=self.dataset_size, batch=args.batch,
                schedule=list(self.schedule),
                resolution=[self.resize, self.crop], seed=args.seed,
                mixup=self.mixup, examples_per_class=args.examples_per_class,
                examples_per_class_seed=args.examples_per_class_seed,
                base_lr=args.base_lr)

  def config(self):
    """The resolved values config.json records."""
    return dict(resolution=[self.resize, self.crop],
                schedule=list(self.schedule), mixup=self.mixup,
                dataset_size=self.dataset_size)

  def describe(self):
    return (f'resolution {self.resize}->{self.crop}, {self.total} steps, '
            f'mixup {self.mixup:g}')


def check_same_run(saved, run, where):
  """Refuses to resume from `where` when its settings differ from `run`."""
  differ = [k for k in run if saved.get(k) != run[k]]
  if differ:
    raise BadInput(
        f'{where} belongs to a run with other settings ('
        + ', '.join(f'{k}: {saved.get(k)!r} there, {run[k]!r} now'
                    for k in differ)[:500]
        + '); choose another --name or delete that folder.')


def check_same_command(folder, command):
  """Refuses (BadInput) a run folder whose config.json another command
  wrote (another backend's trainer, a distillation where a fine-tuning
  ran): `command` could not resume its checkpoints and would overwrite its
  outputs. Folders of runs that recorded no command are not checked."""
  try:
    with open(os.path.join(folder, runfiles.CONFIG)) as f:
      other = json.load(f).get('command')
  except (OSError, ValueError, AttributeError):
    return  # no run yet, or a damaged config.json that the run rewrites
  if other and other != command:
    raise BadInput(f'{folder} holds a run of python -m {other}, which that '
                   f'command resumes; choose another --name for {command}.')


# --------------------------------------------------------------------------
# The checkpoint protocol: what the harness asks of a trainer's checkpoint
# format (bit_pytorch.engine.Checkpoint, bit_tf2.engine.Checkpoints,
# bit_jax.engine.Checkpoints). A checkpoint is named by the format.

class Checkpoints(typing.Protocol):
  """A trainer's checkpoints of one run, as `Run.resume` and `Run.fit` use
  them."""

  def newest_first(self) -> list:
    """The names of the run's checkpoints, the newest first."""

  def read(self, name) -> tuple:
    """Reads checkpoint `name` (raising when it cannot be read) and returns
    (its step, the settings saved with it)."""

  def load(self) -> None:
    """Puts the state read last into the run (weights, optimiser, ...)."""

  def set_aside(self, name) -> None:
    """Moves an unreadable checkpoint out of the way, keeping it."""

  def save(self, step) -> None:
    """Writes the run's state at `step`, whole or not at all; raises
    FloatingPointError, writing nothing, when the weights are not
    finite."""


# --------------------------------------------------------------------------
# The run.

class Run:
  """One training run under LOGDIR/NAME (see the module doc).

  `lead`: whether this process writes the outputs (the others compute
  along and stay silent). `any_process(flags)` ORs a few booleans over all
  processes (a framework collective; the default is a single process).
  """

  def __init__(self, args, lead=True, any_process=None, command=None):
    self.args, self.lead, self.command = args, lead, command
    self.dir = runfiles.run_dir(args)
    if command:
      check_same_command(self.dir, command)
    # A run refused (BadInput) before it started leaves no folder it made:
    # these, the run folder first, then the parents that it adds.
    self.made = runfiles.missing_folders(self.dir) if lead else []
    self.started = False
    if lead:
      _lock(self.dir)
    self.logger = runfiles.run_logger(args, lead)
    if lead:
      runfiles.remove_leftovers(self.dir, self.logger)
    self.any_process = any_process
    self.metrics = None
    self.saved_step = None  # newest checkpoint of this run

  # ---------------------------------------------------------------- resume

  def resume(self, checkpoints, settings):
    """The step of the newest readable checkpoint (0 without one), whose
    state `checkpoints` has then loaded. A checkpoint that cannot be read
    is set aside with a warning, and the one before it is tried; one of a
    run with other settings is refused (BadInput).

    `checkpoints`: the trainer's format (a `Checkpoints`).
    """
    if not self.args.save:
      return 0
    for name in checkpoints.newest_first():
      try:
        step, saved = checkpoints.read(name)
      except Exception as e:  # pylint: disable=broad-except
        if self.lead:
          checkpoints.set_aside(name)
        self.logger.warning(f'cannot read checkpoint {name} ('
                            f'{str(e).strip().splitlines()[0][:200]}); set '
                            'aside, trying the one before it.')
        continue
      check_same_run(saved, settings, name)
      checkpoints.load()
      self.logger.info(f'resuming from {name} at step {step}')
      self.saved_step = step
      return step
    return 0

  # ----------------------------------------------------------------- start

  def start(self, step, config, summary, device='cpu', backend=None):
    """Writes config.json (with the step resumed from), opens
    metrics.jsonl and logs the one-line summary of the run; warns once
    where --precision bf16 is no faster than fp32 on `device` ('cpu',
    'gpu', ...) in `backend`, and where the run is on the CPU of a machine
    whose GPUs `backend`'s framework does not see."""
    self.started = True
    if self.lead:
      runfiles.write_json(os.path.join(self.dir, runfiles.CONFIG),
                          dict(vars(self.args), **config, command=self.command,
                               resumed_from_step=step))
      self.metrics = Metrics(self.args, step, self.logger)
    self.logger.info(summary)
    slow_bf16 = (getattr(self.args, 'precision', None) == 'bf16' and
                 hardware.bf16_warning(device, backend))
    if slow_bf16:
      self.logger.warning(slow_bf16)
    unseen = (backend and device.lower() == 'cpu' and
              hardware.unseen_gpus_warning(backend))
    if unseen:
      self.logger.warning(unseen)

  # ------------------------------------------------------------------- fit

  def fit(self, step, total, lr_at, train, evaluate, checkpoints,
          eval_every=None, batch=None, fetch=None):
    """Trains from `step` to `total`; returns (final evaluation, step).

    `train(step, lr)` does the update of `step` and returns its loss as a
    device value; `fetch(losses)` reads a list of them back as floats
    (averaged over processes where each holds its own); `evaluate()` returns
    global sums [loss, top-1 hits, top-5 hits, examples]; `checkpoints`
    saves with `save(step, settings)`. SIGINT/SIGTERM stop the run at the
    next step with a checkpoint, and exit status 128 + signal.
    """
    fetch = fetch or (lambda losses: [float(l) for l in losses])
    batch = batch or self.args.batch
    eval_every = eval_every if eval_every is not None else self.args.eval_every
    save_every = getattr(self.args, 'save_every', None)
    bar = progress.Progress(total, step, self.logger) if self.lead else None
    pending, result = [], None
    window = time.time()
    last_save = started = window
    first = True  # this process's first step: read back at once and timed

    def flush():
      nonlocal window
      if not pending:
        return
      losses = fetch([loss for _, _, loss in pending])
      now = time.time()
      speed = batch * len(pending) / max(now - window, 1e-9)
      window = now
      for (s, lr, _), loss in zip(pending, losses):
        if not np.isfinite(loss):
          raise Diverged(self._diverged(s, loss))
        if self.lead:
          self._write_metrics(s, 'train', loss=loss, lr=lr,
                              images_per_sec=speed)
      if bar:
        bar.show(pending[-1][0], speed, loss=losses[-1],
                      lr=pending[-1][1])
      pending.clear()

    def save(step):
      nonlocal last_save
      flush()  # never a checkpoint after a loss that is not a number
      if self.args.save and self.saved_step != step:
        try:
          checkpoints.save(step)
        except FloatingPointError as e:  # weights not finite: not saved
          raise Diverged(self._diverged(step, 'finite')) from e
        except OSError as e:
          raise self._write_failed(f'the checkpoint of step {step}', e) from e
        self.saved_step = step
      last_save = time.time()

    try:
      with StopSignals() as signals:
        while step < total:
          lr = lr_at(step)
          pending.append((step + 1, lr, train(step, lr)))
          step += 1
          if bar:
            bar.update(step)
          at_eval = step == total or bool(eval_every and
                                          step % eval_every == 0)
          # One process alone also reads back once a line of progress is
          # due (steps of minutes on a CPU); several must agree on when.
          slow = (self.any_process is None and
                  time.time() - window >= progress.LINE_SECONDS)
          if at_eval or step % LOG_EVERY == 0 or first or slow:
            flush()
          if first:
            first = False
            self.logger.info(
                f'the first step took {time.time() - started:.1f} s (its '
                'compilation and first batch included)')
          if at_eval:
            result = self._evaluate(step, evaluate)
            window = time.time()
          stop, due = self._vote(step, signals.signum is not None,
                                 time.time() - last_save > SAVE_MINUTES * 60)
          if at_eval or due or (save_every and step % save_every == 0):
            save(step)
          if stop and step < total:
            save(step)
            self.logger.info(
                f'stopped by signal at step {step}/{total}' +
                ('; run again with the same --name to resume.'
                 if self.args.save else '.'))
            raise SystemExit(128 + (signals.signum or signal.SIGTERM))
      flush()
      if result is None:  # Resumed after the last step: evaluate once more
        # (metrics.jsonl holds this evaluation already, from before the save).
        result = self._evaluate(step, evaluate, record=False)
    except BaseException as e:  # a failed run, a signal's stop, a bug
      failed = self._out_of_memory(step, e) if out_of_memory(e) else e
      if isinstance(failed, RunFailed):
        self._log_to_file(str(failed))  # errors.run_cli prints it on stderr
      self.close()
      if failed is e:
        raise
      raise failed from e
    if bar:
      bar.close()
    return result, step

  def _vote(self, step, stop, due):
    """(stop, save now), the same on every process. A single process
    decides at every step; several agree every LOG_EVERY steps (a
    collective is a synchronisation)."""
    if self.any_process is None:
      return stop, due
    if step % LOG_EVERY:
      return False, False
    return tuple(bool(v) for v in self.any_process([stop, due]))

  def _log_to_file(self, message):
    record = self.logger.makeRecord(self.logger.name, logging.ERROR, '', 0,
                                    message, None, None)
    for handler in self.logger.handlers:
      if isinstance(handler, logging.FileHandler):
        handler.handle(record)

  def _write_metrics(self, step, split, **values):
    try:
      self.metrics.write(step, split, **values)
    except OSError as e:
      raise self._write_failed(runfiles.METRICS, e) from e

  def _out_of_memory(self, step, error):
    """The RunFailed of a step or evaluation that ran out of memory."""
    split = self.args.batch_split or 1
    what = str(error).strip().splitlines()[0][:200] if str(error) else (
        type(error).__name__)
    kept = (f'it resumes from step {self.saved_step}' if self.saved_step
            else 'it starts from the first step')
    smaller = (' (or a smaller --batch_eval)' if getattr(
        self.args, 'batch_eval', None) else '')
    return RunFailed(f'out of memory after step {step} at --batch_split '
                     f'{split} ({what}); run the same command with '
                     f'--batch_split {2 * split}{smaller}: it holds half as '
                     f'many images at once, with the same updates; {kept}.')

  def _write_failed(self, what, error):
    """The RunFailed of a write that failed (a full disk, a folder made
    read-only): what was lost, what is intact, what to do."""
    kept = (f'the checkpoint of step {self.saved_step} is intact'
            if self.saved_step else 'no checkpoint was written before')
    return RunFailed(f'could not write {what} in {self.dir} '
                     f'({error.strerror or error}); {kept}. Free space (or '
                     'make the folder writable) and run the same command '
                     'again.')

  def _diverged(self, step, loss):
    where = (f'the newest good checkpoint is step {self.saved_step} in '
             f'{self.dir}' if self.saved_step else 'no checkpoint was written')
    what = (f'the training loss is {loss}' if loss != 'finite' else
            'the weights hold NaN or infinite values')
    return (f'{what} at step {step}: stopping ({where}). Lower --base_lr or '
            'check the data.')

  def _evaluate(self, step, evaluate, record=True):
    result = self.summarize(step, evaluate())
    if self.lead and record:
      self._write_metrics(step, 'val', **result)
    return result

  def summarize(self, step, sums):
    """The evaluation's result from evaluate()'s global sums, logged."""
    result = metrics.summarize(sums)
    self.logger.info(f'step {step}: validation loss {result["loss"]:.4f}, '
                     f'top-1 {result["top1"]:.2%}, top-5 {result["top5"]:.2%} '
                     f'({result["n"]} examples)')
    return result

  # ---------------------------------------------------------------- finish

  def finish(self, result, step, export=None, **results):
    """The lead writes the exported model (`export(path)`, unless
    --no-save; it returns the path it wrote) and results.json, the last file
    of a run."""
    if not self.lead:
      return dict(result, step=step)
    self.metrics.close()
    saved = None
    try:
      if export and self.args.save:
        saved = export(os.path.join(self.dir, runfiles.MODEL))
      runfiles.write_json(os.path.join(self.dir, runfiles.RESULTS), dict(
          result, step=step, split='val', name=self.args.name, **results))
    except OSError as e:
      failed = self._write_failed('the trained model and results', e)
      self._log_to_file(str(failed))
      self.close()
      raise failed from e
    self.logger.info(f'done: top-1 {result["top1"]:.2%} after {step} steps'
                     + (f'; the model is {saved}.' if saved else '.'))
    self.close()
    return dict(result, step=step)

  def __enter__(self):
    return self

  def __exit__(self, kind, error, traceback):
    self.close()
    if self.made and not self.started and isinstance(error, BadInput):
      shutil.rmtree(self.made[0], ignore_errors=True)
      runfiles.remove_empty(self.made[1:])

  def close(self):
    """Closes the run's files (metrics, TensorBoard, the log file), removes
    its held images (big_transfer.held) and releases its lock; safe to call
    more than once (a `with` block of the run calls it however the block
    ends)."""
    if self.metrics is not None:
      self.metrics.close()
    for handler in list(self.logger.handlers):
      if isinstance(handler, logging.FileHandler):
        self.logger.removeHandler(handler)
        handler.close()
    if self.lead:
      held.release(self.dir)
      _unlock(self.dir)


# One live run per folder: the lead process holds an exclusive lock on
# LOGDIR/NAME/.lock while it lives (the system releases it when the process
# ends, however it ends). A later run in the same process takes it over.
_LOCKS = {}


def _unlock(folder):
  lock = _LOCKS.pop(os.path.abspath(os.path.join(folder, runfiles.LOCK)), None)
  if lock is not None:
    lock.close()


def _lock(folder):
  path = os.path.abspath(os.path.join(folder, runfiles.LOCK))
  if path in _LOCKS:
    _LOCKS.pop(path).close()
  os.makedirs(folder, exist_ok=True)
  f = open(path, 'a+')
  try:
    # A POSIX lock: the process's own, not inherited by forked data workers.
    fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError:
    f.seek(0)
    pid = f.read().strip() or '?'
    f.close()
    raise BadInput(f'{folder} belongs to a run that is still going (process '
                   f'{pid}); wait for it to end, stop it, or choose another '
                   '--name.') from None
  f.truncate(0)
  f.write(f'{os.getpid()}\n')
  f.flush()
  _LOCKS[path] = f


# --------------------------------------------------------------------------
# Stopping cleanly: SIGINT/SIGTERM ask the training loop to stop at the next
# step (where it writes its checkpoint) instead of killing it.

class StopSignals:
  """Context manager; `signum` is the first SIGINT/SIGTERM received, or None.

  Handlers are only installed from the main thread (elsewhere it is inert).
  A second signal of the same kind acts as if we were not here (a second
  Ctrl-C interrupts at once).
  """

  def __init__(self):
    self.signum, self._old = None, {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for s in (signal.SIGINT, signal.SIGTERM):
        self._old[s] = signal.signal(s, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.signum = signum
    signal.signal(signum, self._old[signum])

  def __exit__(self, *exc):
    for s, old in self._old.items():
      signal.signal(s, old)
