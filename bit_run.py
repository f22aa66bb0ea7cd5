"""The run harness: what every trainer does the same way."""
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

import bit_hyperrule
from bit_common import BadInput, run_dir

# --------------------------------------------------------------------------
# Run outputs under LOGDIR/NAME.

def write_json(path, obj):
  """Writes `obj` as JSON atomically (temporary file, then rename)."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, suffix='.json.part')
  with os.fdopen(fd, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=_json_default)
    f.write('\n')
  os.replace(tmp, path)


def _json_default(obj):
  if isinstance(obj, np.generic):
    return obj.item()
  if isinstance(obj, (np.ndarray, tuple, set)):
    return list(obj)
  return str(obj)


class Metrics:
  """Appends one JSON object per line to LOGDIR/NAME/metrics.jsonl.

  On resume, lines from steps after the checkpoint are dropped first, so the
  file reads as one uninterrupted run.
  """

  def __init__(self, args, resume_step=0):
    self.path = os.path.join(run_dir(args), 'metrics.jsonl')
    kept = []
    if resume_step and os.path.exists(self.path):
      with open(self.path) as f:
        kept = [l for l in f if l.strip() and json.loads(l)['step'] <= resume_step]
    self._file = open(self.path, 'w')
    self._file.writelines(kept)
    self._file.flush()

  def write(self, step, split, **values):
    record = {'step': int(step), 'split': split}
    record.update({k: _json_default(v) if isinstance(v, np.generic) else v
                   for k, v in values.items()})
    self._file.write(json.dumps(record) + '\n')
    self._file.flush()

  def close(self):
    self._file.close()


def versions(*modules):
  out = {'python': platform.python_version(), 'numpy': np.__version__}
  for m in modules:
    out[m.__name__] = getattr(m, '__version__', '?')
  return out


class Progress:
  """Training progress: a tqdm bar on a terminal, else a line every 10%.

  Shows loss, lr, images/s and ETA either way.
  """

  def __init__(self, total_steps, start_step, logger):
    from tqdm import tqdm
    self.logger, self.total, self.step = logger, total_steps, start_step
    self._t0, self._step0 = time.time(), start_step
    self._tty = sys.stderr.isatty()
    self._bar = tqdm(total=total_steps, initial=start_step, unit='step',
                     file=sys.stderr, dynamic_ncols=True) if self._tty else None
    self._every = max(1, total_steps // 10)

  def update(self, step, images_per_sec, **values):
    self.step = step
    if self._bar is not None:
      self._bar.update(step - self._bar.n)
      self._bar.set_postfix(img_s=f'{images_per_sec:.1f}',
                            **{k: f'{v:.4g}' for k, v in values.items()})
    elif step % self._every == 0 or step == self.total:
      rate = (step - self._step0) / max(time.time() - self._t0, 1e-9)
      eta = (self.total - step) / rate if rate else float('inf')
      shown = ' '.join(f'{k}={v:.4g}' for k, v in values.items())
      self.logger.info(f'step {step}/{self.total} {shown} '
                       f'images/s={images_per_sec:.1f} ETA {eta:.0f}s')

  def close(self):
    if self._bar is not None:
      self._bar.close()


# --------------------------------------------------------------------------
# A fine-tuning run: what every trainer does the same way.

def resolution(args, original_hw):
  """(resize, crop): the HyperRule's for images of `original_hw`, with the
  --resize_size/--crop_size overrides."""
  resize, crop = bit_hyperrule.get_resolution(original_hw)
  if args.crop_size and not args.resize_size:
    resize = max(args.crop_size, round(args.crop_size * resize / crop))
  return args.resize_size or resize, args.crop_size or crop


def hyperrule(args, dataset_size, original_hw):
  """(resize, crop, schedule, mixup alpha) of a run: the BiT-HyperRule for
  its data, with the command line's overrides."""
  return (*resolution(args, original_hw),
          bit_hyperrule.get_schedule(dataset_size, args.total_steps),
          bit_hyperrule.get_mixup(dataset_size))


def run_settings(args, classes, dataset_size, schedule, resize, crop):
  """What a resumed run must share with the checkpoint it resumes."""
  return dict(model=args.model, dataset=args.dataset, classes=classes,
              dataset_size=dataset_size, batch=args.batch,
              schedule=list(schedule), resolution=[resize, crop],
              seed=args.seed, examples_per_class=args.examples_per_class,
              examples_per_class_seed=args.examples_per_class_seed,
              base_lr=args.base_lr)


def check_same_run(saved, run, where):
  """Refuses to resume from `where` when its settings differ from `run`."""
  differ = [k for k in run if saved.get(k) != run[k]]
  if differ:
    raise BadInput(
        f'{where} belongs to a run with other settings ('
        + ', '.join(f'{k}: {saved.get(k)!r} there, {run[k]!r} now'
                    for k in differ)[:500]
        + '); choose another --name or delete that folder.')


def log_validation(logger, step, result):
  logger.info(f'step {step}: validation loss {result["loss"]:.4f}, '
              f'top-1 {result["top1"]:.2%}, top-5 {result["top5"]:.2%} '
              f'({result["n"]} examples)')


def fine_tune_loop(args, step, n_train, train_step, evaluate, save, logger,
                   metrics, stop_vote=lambda stop: stop):
  """Runs the HyperRule schedule from `step` to its end; returns
  (final evaluation, step).

  `train_step(step, lr)` does the update of `step` and returns its loss; `evaluate(step)`
  evaluates (and checkpoints) at `step`; `save(step)` checkpoints when
  SIGINT/SIGTERM stops the run early, which then exits with 128 + signal.
  `metrics` is None on all but the lead process. `stop_vote(stop)` tells
  whether any process was asked to stop, so that all stop together.
  """
  import signal
  total = bit_hyperrule.get_schedule(n_train, args.total_steps)[-1]
  progress = Progress(total, step, logger) if metrics else None
  result = None
  with StopSignals() as signals:
    t0 = time.time()
    while step < total and not stop_vote(signals.signum is not None):
      lr = bit_hyperrule.get_lr(step, n_train, args.base_lr, args.total_steps)
      loss = train_step(step, lr)
      step += 1
      t1 = time.time()
      speed = args.batch / max(t1 - t0, 1e-9)
      t0 = t1
      if metrics:
        metrics.write(step, 'train', loss=loss, lr=lr, images_per_sec=speed)
        progress.update(step, speed, loss=loss, lr=lr)
      if args.eval_every and step % args.eval_every == 0 or step == total:
        result = evaluate(step)
        t0 = time.time()
    if step < total:
      save(step)
      logger.info(f'stopped by signal at step {step}/{total}'
                  + ('; run again with the same --name to resume.'
                     if args.save else '.'))
      raise SystemExit(128 + (signals.signum or signal.SIGTERM))
  if progress:
    progress.close()
  if result is None:  # Resumed after the last step: evaluate once more.
    result = evaluate(step)
  return result, step


def write_results(args, result, step, n_train, logger):
  """results.json, the last file a run writes."""
  write_json(os.path.join(run_dir(args), 'results.json'), dict(
      result, step=step, split='val', name=args.name, model=args.model,
      dataset=args.dataset, dataset_size=n_train,
      examples_per_class=args.examples_per_class))
  logger.info(f'done: top-1 {result["top1"]:.2%} after {step} steps.')



# --------------------------------------------------------------------------
# Stopping cleanly: SIGINT/SIGTERM ask a training loop to stop at the next
# step (where it writes its checkpoint) instead of killing it.

class StopSignals:
  """Context manager; `signum` is the first SIGINT/SIGTERM received, or None.

  Handlers are only installed from the main thread (elsewhere it is inert).
  """

  def __init__(self):
    self.signum, self._old = None, {}

  def __enter__(self):
    import signal
    import threading
    if threading.current_thread() is threading.main_thread():
      for s in (signal.SIGINT, signal.SIGTERM):
        self._old[s] = signal.signal(s, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.signum = signum
    # A second signal of the same kind acts as if we were not here (a
    # second Ctrl-C interrupts at once).
    import signal
    signal.signal(signum, self._old[signum])

  def __exit__(self, *exc):
    import signal
    for s, old in self._old.items():
      signal.signal(s, old)

