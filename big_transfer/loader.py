"""Batches of the data stream as NumPy, decoded on the host with
big_transfer.preprocess, in order and in parallel (grain's MapDataset): the
input pipeline of the JAX and TF2 backends, which needs no framework.

  train_batches(source, num_classes, stream, resize, crop, start_step=0,
                process_index=0, process_count=1, crop_scale=None,
                workers=None)
      An endless iterator; its k-th element is this process's share of the
      global batch of step `start_step + k`: {'image': uint8 [b, crop,
      crop, 3], 'label': float32 [b, num_classes] one-hot}, b = batch /
      process_count. When the stream's mixup is on, the labels are mixed
      and the batch also holds 'partner', uint8 [b, crop, crop, 3] (each
      row's mixup partner), and 'mix', float32 [b, 2] (the weights of the
      image and of its partner, lambda and 1 - lambda): the images are
      mixed on the device, after their scaling to [-1, 1], so half the
      bytes of float images cross to it (a quarter without mixup), and the
      host does no float arithmetic per pixel. The examples, crops, flips,
      mixup lambdas and partners are the stream's, so they are those of
      every other backend. With `crop_scale` (min, max) the view is the
      Inception crop (distillation's), at `crop`.

  eval_batches(source, batch, crop, process_index=0, process_count=1,
               workers=None, progress=None)
      Every example of `source` once, in order, this process's rows i with
      i % process_count == process_index: {'image': uint8 [b, crop, crop,
      3], 'label': int64 [b], 'mask': bool [b]}, b = batch /
      process_count; every process runs the same number of batches, the
      last ones padded with rows whose mask is False. With `progress` (a
      description), the first process shows its images as they are used
      (big_transfer.progress.images).

A `source` is a big_transfer.datasets.Source. An image that cannot be read
ends the run with datasets.BadImage naming its file. `workers` decode (0:
the calling thread; default: hardware.default_workers(), as --workers):
for training, processes (close the iterator to stop them), which start
once per run; for evaluation, threads, which start at once at every
evaluation.
"""
import functools
import multiprocessing.spawn
import os
import signal
import threading
import time

import grain
import numpy as np

from big_transfer import flags, hardware, preprocess
from big_transfer import progress as shown
from big_transfer.errors import BadInput

ENDLESS = 2**62  # records of a training pipeline: more than any run takes


def _count(workers):
  """`workers`, or by default as many as --workers has."""
  return hardware.default_workers() if workers is None else workers


def _iterate(dataset, workers):
  """Iterates `dataset` with `workers` threads reading ahead (0: in the
  calling thread; None: the default count)."""
  workers = _count(workers)
  return iter(dataset.to_iter_dataset(grain.ReadOptions(
      num_threads=workers, prefetch_buffer_size=2 * workers)))


def _in_processes(dataset, workers):
  """Iterates `dataset` (of batches) in `workers` processes (grain's
  mp_prefetch: process w makes elements w, w + workers, ..., and they are
  read back in order; 0: in the calling thread; None: the default count).
  The iterator's close() stops them.

  Threads would share one GIL, which a quarter of the per-example work
  holds (docs/gpu.md), so they stop near 1,400 img/s on any host; the
  processes scale with the cores, as PyTorch's workers do."""
  workers = _count(workers)
  if not workers:
    return _iterate(dataset, 0)
  _spawn_without_main()
  from absl import flags as absl_flags  # pylint: disable=import-outside-toplevel
  if not absl_flags.FLAGS.is_parsed():  # grain reads its options from them
    absl_flags.FLAGS.mark_as_parsed()
  return iter(dataset.to_iter_dataset(grain.ReadOptions(
      num_threads=1, prefetch_buffer_size=1)).mp_prefetch(
          grain.MultiprocessingOptions(num_workers=workers,
                                       per_worker_buffer_size=2),
          worker_init_fn=functools.partial(_worker_init,
                                           parent=os.getpid())))


def _spawn_without_main():
  """Grain's workers are spawned processes, and a spawned process imports
  its parent's main module again first (multiprocessing's spawn): the
  trainer's, whose imports a worker never uses; bit_tf2.train's TensorFlow
  alone made each worker 840 MB instead of 240 MB, and took seconds to
  import. What a worker runs reaches it through cloudpickle, which carries
  anything of __main__ by value; so from here on, spawned processes skip
  the main module."""
  prepare = multiprocessing.spawn.get_preparation_data
  if getattr(prepare, 'without_main', False):
    return

  @functools.wraps(prepare)
  def without_main(name):
    data = prepare(name)
    data.pop('init_main_from_name', None)
    data.pop('init_main_from_path', None)
    return data
  without_main.without_main = True
  multiprocessing.spawn.get_preparation_data = without_main


def _worker_init(worker, workers, parent):
  """A worker leaves Ctrl-C to the training process (`parent`), which stops
  it, and ends when that process has ended, however it ended (a killed
  process stops nothing: its workers would wait forever to hand on a
  batch). `parent` comes from the parent itself: it may have died before
  this runs."""
  del worker, workers
  signal.signal(signal.SIGINT, signal.SIG_IGN)

  def watch():
    while os.getppid() == parent:
      time.sleep(1)
    os._exit(0)  # pylint: disable=protected-access
  threading.Thread(target=watch, daemon=True).start()


def train_batches(source, num_classes, stream, resize, crop, start_step=0,
                  process_index=0, process_count=1, crop_scale=None,
                  workers=None):
  """This process's training batches of `stream` (see the module doc)."""
  if stream.batch % process_count:
    raise BadInput(f'--batch {stream.batch} is not divisible by the '
                   f'{process_count} processes.')
  local = stream.batch // process_count
  rows, partner = stream.rows(process_index * local,
                              (process_index + 1) * local)
  scale = tuple(crop_scale) if crop_scale else None
  made = {}  # step -> its draws, for the step whose rows are being made

  def draws(step):
    """(examples, augmentation seeds) of `step`, drawn once per step."""
    got = made.get(step)
    if got is None:
      got = stream.indices(step), stream.aug_seeds(step)
      made.clear()
      made[step] = got
    return got

  def example(k):
    """(view, label, step) of row k % len(rows) of step k // len(rows)."""
    step = start_step + k // len(rows)
    position = rows[k % len(rows)]
    indices, seeds = draws(step)
    i = int(indices[position])
    view, label = preprocess.train_example(source, i, int(seeds[position]),
                                           resize, crop, scale)
    return view, np.int64(label), step

  def mix(batch):
    images, labels, steps = batch
    y = np.eye(num_classes, dtype=np.float32)[labels]
    own = slice(0, local)
    if not stream.mixup_alpha:
      return {'image': images[own], 'label': y[own]}
    # Every batch of a run with mixup has the same entries (a lambda of
    # exactly 1 too), so the compiled step is traced once.
    lam = stream.lam(int(steps[0]))
    return {'image': images[own], 'partner': images[partner],
            'mix': np.tile(np.float32([lam, 1 - lam]), (local, 1)),
            'label': lam * y[own] + (1 - lam) * y[partner]}

  dataset = grain.MapDataset.range(ENDLESS).map(example).batch(
      len(rows), drop_remainder=True).map(mix)
  return _in_processes(dataset, workers)


def eval_batches(source, batch, crop, process_index=0, process_count=1,
                 workers=None, progress=None):
  """This process's evaluation batches of `source` (see the module doc)."""
  if batch % process_count:
    raise BadInput(f'evaluation batch {batch} is not divisible by the '
                   f'{process_count} processes.')
  local = batch // process_count
  mine = range(process_index, len(source), process_count)
  longest = len(range(0, len(source), process_count))
  padded = flags.round_up(longest, local)
  blank = np.zeros((crop, crop, 3), np.uint8)

  def example(j):
    if j >= len(mine):
      return blank, np.int64(0), False
    view, label = preprocess.eval_example(source, mine[j], crop)
    return view, np.int64(label), True

  dataset = grain.MapDataset.range(padded).map(example).batch(local).map(
      lambda b: dict(zip(('image', 'label', 'mask'), b)))
  batches = _iterate(dataset, workers)
  if progress is None:
    return batches
  return shown.images(batches, len(mine), lambda b: int(b['mask'].sum()),
                      progress, show=process_index == 0)
