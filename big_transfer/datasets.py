"""The datasets --dataset names, read the same way by every backend: their
names, image folders, image-file checks, the datasets that ship offline as
arrays, TFDS and VTAB-1k datasets (through tfds_reader), and each as Data:
two Sources (labels, and image i as a PIL image). Also the few-shot sampler.
"""
import argparse
import collections
import dataclasses
import functools
import hashlib
import io
import logging
import os

import numpy as np

from big_transfer import (hardware, preprocess, progress, runfiles,
                          tfds_reader, vtab)
from big_transfer.errors import BadInput

# Datasets known by name: torchvision's in PyTorch, TFDS's in TF2/JAX.
NAMED_DATASETS = ('cifar10', 'cifar100', 'oxford_iiit_pet',
                  'oxford_flowers102', 'imagenet2012')


def dataset_forms():
  """Every --dataset value accepted, in words."""
  return ', '.join(NAMED_DATASETS + ('imagefolder',) +
                   tuple(ARRAY_DATASETS)) + ', ' + tfds_reader.accepted_forms()


def dataset_name(value):
  """argparse type of --dataset: a named dataset, imagefolder, an offline
  array dataset, tfds:NAME or vtab:TASK (the task checked here)."""
  if value in NAMED_DATASETS + ('imagefolder',) or value in ARRAY_DATASETS:
    return value
  if (value.startswith(tfds_reader.TFDS_PREFIX) and
      len(value) > len(tfds_reader.TFDS_PREFIX)):
    return value
  if (value.startswith(tfds_reader.VTAB_PREFIX) and
      value[len(tfds_reader.VTAB_PREFIX):] in vtab.TASKS):
    return value
  raise argparse.ArgumentTypeError(
      f'unknown dataset {value!r}; give one of {dataset_forms()}')


def check_source(args):
  """Refuses a --dataset, --datadir and split flags that name no data,
  before anything is read or downloaded: an image folder (or imagenet2012)
  without --datadir, a --datadir that is not a folder, and the split flags
  where they would be ignored (check_split_flags)."""
  check_split_flags(args)
  if args.dataset in ('imagefolder', 'imagenet2012') and not args.datadir:
    raise BadInput(f'--dataset {args.dataset} needs --datadir.')
  if args.datadir and args.dataset == 'imagefolder' and not os.path.isdir(
      args.datadir):
    raise BadInput(f'--datadir {args.datadir} is not a folder.')


def check_split_flags(args):
  """Refuses --train_split and --eval_split for a dataset that TFDS does not
  read by those names (they would be ignored: an image folder's splits are
  its folders, and a named dataset is torchvision's in PyTorch, so the
  backends would train on different data)."""
  for flag in ('train_split', 'eval_split'):
    if getattr(args, flag, None) and not tfds_reader.is_tfds(args.dataset):
      hint = (f'; --dataset {tfds_reader.TFDS_PREFIX}{args.dataset} takes '
              'it' if args.dataset in NAMED_DATASETS else '')
      raise BadInput(f'--{flag} applies to tfds:NAME and vtab:TASK '
                     f'datasets, not to {args.dataset}{hint}.')


def fewshot_indices(labels, examples_per_class, seed):
  """Sorted indices of `examples_per_class` examples from each class.

  Classes are visited in sorted order and each draws without replacement
  from a generator seeded with `seed`, so the same labels and seed give the
  same subset in every backend.
  """
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  chosen = []
  for c in np.unique(labels):
    idx = np.flatnonzero(labels == c)
    if len(idx) < examples_per_class:
      raise BadInput(f'class {c} has only {len(idx)} training examples, '
                     f'fewer than the {examples_per_class} per class asked '
                     'for (--examples_per_class, fewshot\'s --shots).')
    chosen.append(rng.choice(idx, examples_per_class, replace=False))
  return np.sort(np.concatenate(chosen))


# --------------------------------------------------------------------------
# Image folders: every backend reads them the same way.

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif',
                    '.tiff', '.webp')
# HEIF/HEIC (an iPhone's photos): read where pillow-heif is installed (the
# heif extra).
HEIF_EXTENSIONS = ('.heic', '.heif')


@functools.cache
def heif_readable():
  """Whether PIL reads HEIF/HEIC files in this process: pillow-heif is
  installed, and this call registers its reader with PIL."""
  try:
    import pillow_heif  # pylint: disable=import-outside-toplevel
  except ImportError:
    return False
  pillow_heif.register_heif_opener()
  return True


def image_extensions():
  """The extensions of the files read as images (any case)."""
  return IMAGE_EXTENSIONS + (HEIF_EXTENSIONS if heif_readable() else ())


def open_image(file):
  """PIL's Image.open(file), HEIF/HEIC files too where they are readable."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  heif_readable()
  return Image.open(file)


@dataclasses.dataclass
class FileSplit:
  paths: list
  labels: np.ndarray
  left_out: list = dataclasses.field(default_factory=list)  # not images


def is_image_file(name):
  return name.lower().endswith(image_extensions())


def _visible(name):
  return not name.startswith('.')


def folder_files(folder):
  """(image files, other files) below `folder`, its subfolders included
  (links followed, each folder once: a link back up is not a loop), each
  list sorted by path. Hidden files and folders (`.DS_Store`,
  `.ipynb_checkpoints/`) are in neither."""
  images, others, seen = [], [], set()
  for d, subdirs, names in os.walk(folder, followlinks=True):
    stat = os.stat(d)
    if (stat.st_dev, stat.st_ino) in seen:
      subdirs[:] = []
      continue
    seen.add((stat.st_dev, stat.st_ino))
    subdirs[:] = filter(_visible, subdirs)
    for name in filter(_visible, names):
      (images if is_image_file(name) else others).append(os.path.join(d, name))
  return sorted(images), sorted(others)


def _scan_split(folder, classes=None):
  found = sorted(d for d in os.listdir(folder) if _visible(d)
                 and os.path.isdir(os.path.join(folder, d)))
  if classes is None:
    classes = found
  elif set(found) - set(classes):
    raise BadInput(f'{folder} has classes that train/ lacks: '
                   f'{sorted(set(found) - set(classes))}.')
  paths, labels, left_out = [], [], []
  for label, c in enumerate(classes):
    files, others = folder_files(os.path.join(folder, c))
    if not files:
      raise BadInput(f'class folder {os.path.join(folder, c)} has no images; '
                     'add some, or remove the class from every split.')
    paths += files
    labels += [label] * len(files)
    left_out += others
  return classes, FileSplit(paths, np.array(labels, dtype=np.int64), left_out)


def left_out_warning(split):
  """One line naming the files of `split`'s class folders that were left
  out as not images (by their extension; hidden files are not named), or
  None."""
  if not split.left_out:
    return None
  kinds = collections.Counter(os.path.splitext(p)[1].lower() or 'none'
                              for p in split.left_out)
  counts = ', '.join(f'{kind} {n}' for kind, n in sorted(kinds.items()))
  heif = (' HEIF/HEIC photos are read once pillow-heif is installed (pip '
          "install 'big-transfer[heif]')." if set(kinds) & set(
              HEIF_EXTENSIONS) else '')
  return (f'left out {len(split.left_out)} file(s) that are not images by '
          f'their extension ({counts}; e.g. {split.left_out[0]}); the image '
          f'extensions are {" ".join(image_extensions())}.{heif}')


def scan_imagefolder(datadir):
  """(classes, training split, evaluation split, the evaluation split's
  name) of an image folder.

  The training images are train/<class>/..., or <class>/... where the
  folder has no train/; classes are the sorted subfolders (hidden ones
  aside), and a class holds the images anywhere below its folder, sorted by
  path. The evaluation split is val/, or test/ where there is no val/; with
  train/ and neither of them, or without train/, it is HELD_OUT of each
  class's training images (held_out), named 'held-out'.
  """
  train = os.path.join(datadir, 'train')
  evals = [s for s in ('val', 'test')
           if os.path.isdir(os.path.join(datadir, s))]
  if not os.path.isdir(train) and evals:
    raise BadInput(f'{datadir} has {evals[0]}/ but no train/ folder; '
                   f'expected train/<class>/* beside {evals[0]}/<class>/*.')
  root = train if os.path.isdir(train) else datadir
  classes, train_split = _scan_split(root)
  if len(classes) < 2:
    raise BadInput(f'{root} has {len(classes)} class folder(s); need 2+ '
                   '(train/<class>/* and val/<class>/*, or <class>/* alone).')
  if not evals:
    return (classes, *held_out(train_split, root), 'held-out')
  _, eval_split = _scan_split(os.path.join(datadir, evals[0]), classes)
  if not eval_split.paths:
    raise BadInput(f'{os.path.join(datadir, evals[0])} has no images.')
  return classes, train_split, eval_split, evals[0]


HELD_OUT = 0.1  # of each class, evaluated on where a folder has no val/


def held_out(split, root):
  """(training, evaluation) FileSplits of an image folder without an
  evaluation split: of each class's n images (n >= 2), the round(HELD_OUT
  x n) (at least 1) whose paths below `root` hash lowest are evaluated on.
  The same files in every run and backend, and a file keeps its side when
  others are added, unless it is at the margin."""
  prefix = os.path.join(root, '')  # the paths are os.path.join(root, ...)

  def rank(path):  # of the path below root, '/' between its folders
    rel = path[len(prefix):].replace(os.sep, '/')
    return hashlib.sha256(rel.encode()).digest()
  evaluated = np.zeros(len(split.paths), bool)
  order = np.argsort(split.labels, kind='stable')  # by class, then by path
  for members in np.split(order, np.flatnonzero(np.diff(
      split.labels[order])) + 1):
    if len(members) < 2:
      folder = os.path.dirname(split.paths[members[0]])
      raise BadInput(f'class folder {folder} has one image; holding some '
                     'out for evaluation needs 2+ (or add a val/ folder).')
    n = min(len(members) - 1, max(1, round(HELD_OUT * len(members))))
    evaluated[sorted(members, key=lambda i: rank(split.paths[i]))[:n]] = True
  return tuple(FileSplit([p for p, e in zip(split.paths, evaluated)
                          if e == side], split.labels[evaluated == side],
                         [] if side else split.left_out)
               for side in (False, True))


class BadImage(BadInput):
  """An image file that cannot be read."""

  @classmethod
  def of(cls, path, error):
    return cls(f'cannot read image {path} ({error}); delete or replace it, '
               'or pass --skip_bad_images to leave such files out.')


def _image_error(path, decode):
  try:
    with open_image(path) as im:
      if decode:
        im.load()
    return None
  except Exception as e:  # pylint: disable=broad-except
    return e  # PIL raises many kinds of error on damaged files.


def readable_images(paths, skip=False, logger=None):
  """Indices of the `paths` that can be read, checked in threads: the one
  rule of every backend for --skip_bad_images.

  Without `skip`, headers are read and the first unreadable file stops the
  run with its name (BadImage); a file whose pixels are damaged is named
  when it is decoded. With `skip`, every file is decoded whole and those
  that fail are left out with a warning, so the same files are left out
  in every backend, before the schedule is computed. Progress is shown
  where `logger` shows INFO lines (the first process's).
  """
  import concurrent.futures
  with concurrent.futures.ThreadPoolExecutor(16) as pool:
    checked = pool.map(functools.partial(_image_error, decode=skip), paths,
                       chunksize=64)
    errors = list(progress.images(
        checked, len(paths), lambda _: 1,
        'decoding images (--skip_bad_images)' if skip else 'checking images',
        show=logger is not None and logger.isEnabledFor(logging.INFO)))
  bad = [i for i, e in enumerate(errors) if e is not None]
  if bad and not skip:
    raise BadImage.of(paths[bad[0]], errors[bad[0]])
  for i in bad:
    if logger:
      logger.warning(f'leaving out unreadable image {paths[i]} ({errors[i]})')
  if len(bad) == len(paths):
    raise BadInput(f'no readable image among {len(paths)}.')
  return np.setdiff1d(np.arange(len(paths)), bad)


def image_sizes(paths, limit=256):
  """(height, width), upright, of up to `limit` images spread over
  `paths`."""
  step = max(1, len(paths) // limit)
  sizes = []
  for p in paths[::step][:limit]:
    try:
      with open_image(p) as im:
        sizes.append(preprocess.upright_size(im))
    except OSError as e:
      raise BadInput(f'cannot read image {p} ({e}).') from e
  return sizes


# --------------------------------------------------------------------------
# Datasets that ship offline as arrays: uint8 images (N, H, W, 3) and labels.

@dataclasses.dataclass
class ArrayData:
  train_images: np.ndarray
  train_labels: np.ndarray
  val_images: np.ndarray
  val_labels: np.ndarray
  classes: list


def _gray_to_rgb(images):
  return np.repeat(images[..., None], 3, axis=-1)


def load_digits():
  """scikit-learn's handwritten digits (UCI): 8x8, 10 classes, 1797 images.

  The first 1000 images train, the other 797 evaluate.
  """
  from sklearn.datasets import load_digits as sk_digits
  d = sk_digits()
  images = _gray_to_rgb(np.round(d.images * 255 / 16).astype(np.uint8))
  labels = d.target.astype(np.int64)
  return ArrayData(images[:1000], labels[:1000], images[1000:], labels[1000:],
                   [str(i) for i in range(10)])


FASHION_MNIST_DIR = os.environ.get('FASHION_MNIST_DIR',
                                   '/usr/share/datasets/fashion-mnist')
FASHION_MNIST_CLASSES = ['T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat',
                         'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot']


def _read_idx(path):
  """An IDX file (optionally gzipped) as a uint8 array."""
  import gzip
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rb') as f:
    data = f.read()
  if len(data) < 4 or data[:3] != b'\x00\x00\x08':  # magic: 0, 0, uint8
    raise BadInput(f'{path} is not an IDX file of bytes.')
  ndim = data[3]
  shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], 'big')
                for i in range(ndim))
  array = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
  if array.size != int(np.prod(shape)):
    raise BadInput(f'{path} is truncated: {array.size} values for {shape}.')
  return array.reshape(shape)


def load_fashion_mnist(folder=None):
  """Zalando's Fashion-MNIST: 28x28 grey clothing photos, 10 classes,
  60000 train / 10000 test, read from the IDX files that Debian's
  dataset-fashion-mnist package installs (or $FASHION_MNIST_DIR)."""
  folder = folder or FASHION_MNIST_DIR
  def read(stem):
    for name in (f'{stem}.gz', stem):
      if os.path.exists(os.path.join(folder, name)):
        return _read_idx(os.path.join(folder, name))
    raise BadInput(f'Fashion-MNIST is not in {folder} (no {stem}.gz); install '
                   'it with "apt-get install dataset-fashion-mnist" or set '
                   'FASHION_MNIST_DIR to a folder with its IDX files.')
  return ArrayData(_gray_to_rgb(read('train-images-idx3-ubyte')),
                   read('train-labels-idx1-ubyte').astype(np.int64),
                   _gray_to_rgb(read('t10k-images-idx3-ubyte')),
                   read('t10k-labels-idx1-ubyte').astype(np.int64),
                   list(FASHION_MNIST_CLASSES))


ARRAY_DATASETS = {'digits': load_digits, 'fashion_mnist': load_fashion_mnist}


def load_array_dataset(name):
  return ARRAY_DATASETS[name]()


# --------------------------------------------------------------------------
# A dataset as every framework-neutral reader sees it: two Sources.

def decode(file):
  """The image in `file` (a path or a binary file object) as a PIL RGB
  image, decoded (an RGB image is not copied), upright as an image viewer
  shows it: turned and mirrored as its EXIF Orientation tag says (a camera's
  photo taken upright is stored sideways with that tag). A 16-bit grey
  image keeps the high byte of each value, as TensorFlow's decode_png and
  PIL's own 16-bit colour reading do (PIL's convert would clip it at 255)."""
  from PIL import Image, ImageOps  # pylint: disable=import-outside-toplevel
  with open_image(file) as im:
    ImageOps.exif_transpose(im, in_place=True)
    if im.mode.startswith('I;16'):
      im = Image.fromarray((np.asarray(im) >> 8).astype(np.uint8))
    return im if im.mode == 'RGB' else im.convert('RGB')


def decode_file(path):
  """decode(path); a file that cannot be read raises BadImage naming it."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  try:
    return decode(path)
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise BadImage.of(path, e) from e


class Source:
  """The examples of one split: `example(i)`, (image i as a PIL RGB image,
  its int label), from image files (`paths`), uint8 arrays (`images`, (N,
  H, W, 3)) or a big_transfer.tfds_reader Split (`split`), and their int64
  `labels`. A Split's labels come with its examples, one record read each;
  `labels` reads them all (one pass over the records, at the first use
  only: a run that never asks, training on the whole split, starts at
  once). Pickles for data-loader workers."""

  def __init__(self, labels=None, paths=None, images=None, split=None):
    self._labels, self.paths, self.images, self.split = (labels, paths,
                                                         images, split)

  @property
  def labels(self):
    if self._labels is None:
      self._labels = self.split.labels
    return self._labels

  def __len__(self):
    return len(self.split if self._labels is None else self._labels)

  @property
  def decoded(self):
    """Whether its images are decoded when read (files or bytes)."""
    return self.images is None

  def example(self, i):
    """(image i as a PIL RGB image, its int label)."""
    from PIL import Image  # pylint: disable=import-outside-toplevel
    if self.split is not None:
      encoded, label = self.split[i]
      return decode(io.BytesIO(encoded)), label
    if self.images is not None:
      return Image.fromarray(self.images[i]), int(self.labels[i])
    return decode_file(self.paths[i]), int(self.labels[i])

  def load(self, i):
    """Image i as a PIL RGB image."""
    return self.example(i)[0]

  def fingerprint(self):
    """A hash of what decides these examples: their files (path, size and
    modification time) and labels, their arrays, or their TFDS records
    (tfds_reader.Split.fingerprint)."""
    if self.split is not None:
      return self.split.fingerprint()
    digest = hashlib.sha256(np.asarray(self.labels, '<i8').tobytes())
    if self.images is not None:
      digest.update(np.ascontiguousarray(self.images))
    else:
      for path in self.paths:
        digest.update(runfiles.file_stamp(path).encode() + b'\0')
    return digest.hexdigest()

  def subset(self, indices):
    return Source(None if self._labels is None else self._labels[indices],
                  None if self.paths is None else
                  [self.paths[i] for i in indices],
                  None if self.images is None else self.images[indices],
                  None if self.split is None else self.split.subset(indices))


@dataclasses.dataclass
class Data:
  """A dataset: class names, training and evaluation Sources, the typical
  (height, width) of its images (for the HyperRule), the evaluation split's
  name, and the training split's size before any few-shot draw."""
  name: str
  classes: list
  train: Source
  val: Source
  original_hw: tuple
  eval_split: str = 'val'
  full_train_size: int = None

  def __post_init__(self):
    if self.full_train_size is None:
      self.full_train_size = len(self.train)

  @property
  def num_classes(self):
    return len(self.classes)

  def describe(self):
    """What config.json records of the data."""
    return {'dataset': self.name, 'train_size': len(self.train),
            'full_train_size': self.full_train_size,
            'eval_size': len(self.val), 'eval_split': self.eval_split,
            'num_classes': self.num_classes,
            'original_hw': list(self.original_hw)}


def load(args, logger=None, check_train=True, named=None):
  """The dataset of --dataset (Data), checked (BadInput on bad data):
  image folders (their files checked first; `check_train=False` checks
  only the evaluation files), the offline arrays, tfds:NAME and vtab:TASK.
  `named(args)` gives the Data of a named dataset (cifar10, ...), where a
  backend has its own downloader; without it they are read as tfds:NAME.
  Its training split is the --examples_per_class subset where the flag is
  set (`fewshot`; Data.full_train_size keeps the whole split's size)."""
  data = _read(args, logger, check_train, named)
  data.train = fewshot(data.train, args)
  return data


def _read(args, logger, check_train, named):
  """The whole dataset of --dataset (see `load`)."""
  if args.dataset in ARRAY_DATASETS:
    d = load_array_dataset(args.dataset)
    return Data(args.dataset, list(d.classes),
                Source(d.train_labels, images=d.train_images),
                Source(d.val_labels, images=d.val_images),
                tuple(d.train_images.shape[1:3]))
  if args.dataset == 'imagefolder' or (args.dataset == 'imagenet2012' and
                                       named is not None):
    classes, train, val, eval_split = scan_imagefolder(args.datadir)
    for split in (train, val) if check_train else (val,):
      if logger and split.left_out:
        logger.warning(left_out_warning(split))
    if logger and eval_split == 'held-out':
      logger.info(f'{args.datadir} has no val/ or test/ folder: evaluating '
                  f'on {len(val.paths)} of its images held out of training, '
                  f'{HELD_OUT:.0%} of each class (the same ones in every run '
                  'and backend).')
    if check_train:
      train = _readable(train, args, logger)
    val = _readable(val, args, logger)
    import bit_hyperrule  # pylint: disable=import-outside-toplevel
    return Data(args.dataset, classes, Source(train.labels, train.paths),
                Source(val.labels, val.paths),
                bit_hyperrule.typical_size(image_sizes(train.paths)),
                eval_split)
  if args.dataset in NAMED_DATASETS and named is not None:
    return named(args)
  dataset = (args.dataset if tfds_reader.is_tfds(args.dataset) else
             tfds_reader.TFDS_PREFIX + args.dataset)
  # Each data-loading worker and training process holds a dataset that is
  # read whole (tfrecord files).
  copies = (1 + getattr(args, 'workers', 0)) * hardware.local_processes()
  d = tfds_reader.resolve(dataset, args.datadir,
                          getattr(args, 'tfds_manual_dir', None),
                          getattr(args, 'train_split', None),
                          getattr(args, 'eval_split', None), copies=copies)
  return Data(args.dataset, list(d.classes), Source(split=d.read('train')),
              Source(split=d.read('eval')), d.original_hw, d.eval_split)


def _readable(split, args, logger):
  """The FileSplit without unreadable files (--skip_bad_images), or
  BadImage; BadInput where that leaves a class without images."""
  keep = readable_images(split.paths, getattr(args, 'skip_bad_images', False),
                         logger)
  if len(keep) == len(split.paths):
    return split
  for label in np.setdiff1d(split.labels, split.labels[keep]):
    folder = os.path.dirname(split.paths[np.argmax(split.labels == label)])
    raise BadInput(f'class folder {folder} has no readable images; add '
                   'some, or remove the class from every split.')
  return FileSplit([split.paths[i] for i in keep], split.labels[keep])


def fewshot(source, args):
  """The --examples_per_class subset of a Source, drawn by the shared
  sampler (the Source itself without the flag)."""
  if not getattr(args, 'examples_per_class', None):
    return source
  return source.subset(fewshot_indices(
      source.labels, args.examples_per_class, args.examples_per_class_seed))
