"""Training images decoded once: a fine-tuning run may hold every training
image resized to the HyperRule's (resize, resize), as uint8 in one file in
its run folder, and take each view's crop and flip from it.

The resize does not depend on the augmentation seed, so the views are
exactly those of an image decoded at every read (preprocess.train_view
resizes the whole image, then crops). BiT's
transfers read their images many times (the HyperRule's 500 steps of 512
read a VTAB-1k task's 1,000 images 256 times), and the host makes views of
held images several times as fast as of decoded ones (docs/gpu.md).

  wanted(args, n, resize, reads, decodes, folder)
      None when the run holds its images, else why not, in words. With
      --hold_images unset (auto): images that are decoded (files or encoded
      bytes, not arrays), each image read at least READS times on average,
      and the file within BUDGET of the machine's memory and half the free
      space of `folder`. --hold_images asks for it whatever the reads;
      --no-hold_images never.
  hold(n, resize, load, folder, workers, logger, process=(0, 1), vote=None)
      Writes the file (image i is `load(i)`, a PIL image, resized) with
      `workers` threads and returns its path; an image that cannot be read
      stops it with load's error, before training starts.
  for_run(run, args, n, hyper, load, decodes, process=(0, 1))
      A fine-tuning run's choice and file. Several processes share one
      file, in the run folder that they all see: they decide together
      (each answers `wanted` for its own host), each decodes its share of
      the images into it, and an error in any of them stops them all.
  Held(path, labels)
      The held images as a datasets.Source (labels, len, load(i)), whose
      load(i) gives the held array, not a PIL image; each process maps the
      file (pickling it passes the path).
  release(folder)
      Removes the file: the run's end calls it (harness.Run.close, however
      the run ends); a killed run leaves it until the same command starts
      again and writes it anew.
"""
import concurrent.futures
import functools
import io
import os
import shutil
import time

import numpy as np

from big_transfer import errors, hardware, preprocess, progress, runfiles
from big_transfer.errors import BadInput, RunFailed

FOLDER = 'held'       # in the run folder
FILE = 'train.npy'
READS = 2             # the fewest reads per image that auto holds for
BUDGET = 0.25         # of the machine's memory, at most
CHUNK = 256           # images decoded at a time while holding


def wanted(args, n, resize, reads, decodes, folder):
  """None if the run holds its training images, else the reason in words
  (see the module doc). `reads`: the images the run reads in all."""
  choice = getattr(args, 'hold_images', None)
  if choice is False:
    return '--no-hold_images'
  if not decodes:
    return 'its images are arrays or a streamed split'
  if choice is None and reads < READS * n:
    return f'each image is read {reads / n:.1f} times on average'
  size = n * resize * resize * 3
  room = min(BUDGET * hardware.memory_bytes(),
             shutil.disk_usage(_existing(folder)).free / 2)
  if size > room:
    return (f'{size / 2**30:.1f} GiB would not fit in {room / 2**30:.1f} '
            f'GiB (a quarter of the memory, half the free space of {folder})')
  return None


def _existing(path):
  while not os.path.isdir(path):
    path = os.path.dirname(path)
  return path


def hold(n, resize, load, folder, workers, logger, process=(0, 1),
         vote=None):
  """Writes image i = load(i) of n, resized, to FOLDER/FILE in `folder` and
  returns its path. Process `index` of `count` (`process`) decodes chunks
  index, index + count, ... of CHUNK images with `workers` threads and
  writes them into one file; `vote` (harness.Run.any_process) joins the
  processes after each round of chunks, so that an error in any of them
  stops them all and no collective waits long (NCCL's ends a run after 10
  minutes). The file is renamed into place once it is whole."""
  index, count = process
  path = os.path.join(folder, FOLDER, FILE)
  part = path + '.part'
  shape = (n, resize, resize, 3)
  header = io.BytesIO()
  np.lib.format.write_array_header_1_0(header, {
      'descr': '|u1', 'fortran_order': False, 'shape': shape})
  header, size = header.getvalue(), resize * resize * 3
  together = functools.partial(errors.together, vote)
  logger.info(f'holding the {n} training images at {resize}x{resize} '
              f'({np.prod(shape) / 2**20:.0f} MiB in {path}), each decoded '
              f'once, in {count} process(es)')
  started = time.perf_counter()

  def create():
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(part, 'wb') as f:
      f.write(header)
      f.truncate(len(header) + n * size)
  together(create if index == 0 else None)

  def resized(i):
    try:
      return preprocess.eval_view(load(i), resize)  # the whole resize
    except OSError as e:  # files raise BadImage; this is a dataset's bytes
      raise BadInput(f'cannot read training image {i} ({e}).') from e

  per_round = CHUNK * count
  with together(lambda: open(part, 'r+b')) as f, \
       concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:

    def write(lo):  # file writes: a mapped file answers a full disk with SIGBUS
      f.seek(len(header) + lo * size)
      for image in pool.map(resized, range(lo, min(n, lo + CHUNK))):
        f.write(image.tobytes())
    for start in progress.images(range(0, n, per_round), n,
                                 lambda start: min(n, start + per_round) -
                                 start, 'holding', show=index == 0):
      mine = start + index * CHUNK
      together(lambda: write(mine) if mine < n else None)
    together(lambda: (f.flush(), os.fsync(f.fileno())))
  together(lambda: (os.replace(part, path),
                    runfiles.sync_folder(os.path.dirname(path)))
           if index == 0 else None)
  took = time.perf_counter() - started
  logger.info(f'held {n} images in {took:.1f} s ({n / took:.0f} img/s)')
  return path


def release(folder):
  shutil.rmtree(os.path.join(folder, FOLDER), ignore_errors=True)


def for_run(run, args, n, hyper, load, decodes, process=(0, 1)):
  """The held file of a fine-tuning run (harness.Run `run`, its
  HyperRule `hyper`), written now by every process (`process`: this one's
  index and the count), or None, with the reason logged."""
  release(run.dir)  # a killed run's file is written anew, or not at all
  why = wanted(args, n, hyper.resize, hyper.total * args.batch, decodes,
               run.dir)
  if run.any_process and run.any_process([why is not None])[0] and not why:
    why = "another process's host lacks the memory or the disk space"
  args.hold_images = not why  # config.json records the choice
  if why:
    run.logger.info(f'training images are decoded at every read ({why}).')
    return None
  try:
    return hold(n, hyper.resize, load, run.dir, args.workers, run.logger,
                process, run.any_process)
  except BaseException as e:
    release(run.dir)
    if isinstance(e, OSError):  # a full disk, a folder made read-only
      raise RunFailed(f'could not write the held images in {run.dir} '
                      f'({e.strerror or e}); free space, or pass '
                      '--no-hold_images, and run the same command again.'
                      ) from e
    raise


class Held:
  """The held images at `path` with their `labels`: a datasets.Source."""

  def __init__(self, path, labels):
    self.path, self.labels = path, labels
    self._images = None

  def __len__(self):
    return len(self.labels)

  def images(self):
    """uint8 [n, resize, resize, 3], the file mapped (once per process)."""
    if self._images is None:
      self._images = np.load(self.path, mmap_mode='r')
    return self._images

  def example(self, i):
    """(image i as held: uint8 (resize, resize, 3), which
    preprocess.train_view crops and flips without resizing again, its int
    label)."""
    return self.images()[i], int(self.labels[i])

  def __getstate__(self):
    return {'path': self.path, 'labels': self.labels, '_images': None}
