"""Progress of long work, shown as the work goes (on standard error):

  Progress(total_steps, start_step, logger)
      Training: a bar of steps on a terminal, else a logged line every 10%
      of the steps, and sooner where LINE_SECONDS have passed since the
      last (a CPU's steps can take minutes); loss, learning rate, images/s
      and ETA as they are read back.
  images(batches, total, count, desc, show=True)
      Yields `batches` (an iterator over `total` images, `count(batch)` of
      them in each): a bar of images on a terminal, cleared when done,
      else a line every LINE_SECONDS with images/s and ETA, none for work
      done sooner. Evaluations, validation, prediction, feature
      extraction, holding and the check of an image folder's files show
      it.

A bar shows only where standard error is a terminal: in a log file its
redrawn lines would pile up.
"""
import sys
import time

LINE_SECONDS = 30  # between lines where there is no bar


def _bar(**kwargs):
  """A tqdm bar on standard error, or None where it is not a terminal."""
  if not sys.stderr.isatty():
    return None
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm(file=sys.stderr, dynamic_ncols=True, **kwargs)


class Progress:
  """Training progress: a tqdm bar on a terminal, else a line every 10% of
  the steps or LINE_SECONDS, whichever comes first. Loss, lr, images/s and
  ETA are shown as they are read back; the ETA follows the steps since the
  first read-back, leaving out the first step's compilation."""

  def __init__(self, total_steps, start_step, logger):
    self.logger, self.total = logger, total_steps
    self._shown, self._shown_at = start_step, time.time()
    self._since = (start_step, self._shown_at)  # (step, time) the ETA is from
    self._first = True
    self._bar = _bar(total=total_steps, initial=start_step, unit='step')
    self._every = max(1, total_steps // 10)

  def update(self, step):
    """Step `step` is done (called at every step)."""
    if self._bar is not None:
      self._bar.update(step - self._bar.n)

  def show(self, step, images_per_sec, **values):
    """Values read back at `step`."""
    now = time.time()
    if self._bar is not None:
      self._bar.set_postfix(img_s=f'{images_per_sec:.1f}',
                            **{k: f'{v:.4g}' for k, v in values.items()})
    elif (step // self._every > self._shown // self._every or
          step == self.total or
          not self._first and now - self._shown_at >= LINE_SECONDS):
      self._shown, self._shown_at = step, now
      done, start = self._since
      rate = (step - done) / max(now - start, 1e-9)
      eta = (self.total - step) / rate if rate else float('inf')
      shown = ' '.join(f'{k}={v:.4g}' for k, v in values.items())
      self.logger.info(f'step {step}/{self.total} {shown} '
                       f'images/s={images_per_sec:.1f} ETA {eta:.0f}s')
    if self._first:  # the first step, compilation included: logged apart
      self._first, self._since = False, (step, now)

  def close(self):
    if self._bar is not None:
      self._bar.close()


def images(batches, total, count, desc, show=True):
  """`batches`, shown as they pass (see the module doc); nothing is shown
  unless `show`."""
  bar = _bar(total=total, unit='img', desc=desc, mininterval=1,
             leave=False) if show else None
  start = last = time.time()
  done = 0
  try:
    for batch in batches:
      yield batch
      n = count(batch)
      done += n
      if bar is not None:
        bar.update(n)
      elif show and time.time() - last >= LINE_SECONDS:
        last = time.time()
        rate = done / (last - start)
        print(f'{desc}: {done}/{total} images, {rate:.1f} images/s, ETA '
              f'{(total - done) / max(rate, 1e-9):.0f} s', file=sys.stderr,
              flush=True)
  finally:
    if bar is not None:
      bar.close()
