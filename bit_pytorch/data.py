"""Data for the PyTorch backend: where the images come from (image folders,
torchvision's datasets, offline arrays), the HyperRule pre-processing, and
the sampler that feeds the shared data stream (datastream.Stream) to a
DataLoader.

Every random choice about the data (the order, the crops, the flips, mixup)
comes from the stream, a function of (--seed, step, position in the global
batch), so a resumed run, a run over any number of processes, and a run in
another backend see exactly the same batches.
"""
import dataclasses
import io
import os

import numpy as np
import torch
from PIL import Image

from big_transfer import datasets, datastream, errors
import bit_hyperrule
from big_transfer import tfds_reader


@dataclasses.dataclass
class Source:
  """Examples of one split: `load(i)` gives image i as a PIL RGB image."""
  labels: np.ndarray = None
  paths: list = None          # image files, or
  images: np.ndarray = None   # uint8 (N, H, W, 3), or
  split: object = None        # a tfds_reader.Split (encoded images, labels)

  def __post_init__(self):
    if self.split is not None and self.labels is None:
      self.labels = self.split.labels

  def __len__(self):
    return len(self.labels)

  def load(self, i):
    if self.images is not None:
      return Image.fromarray(self.images[i])
    if self.split is not None:
      with Image.open(io.BytesIO(self.split[i][0])) as im:
        return im.convert('RGB')
    try:
      with Image.open(self.paths[i]) as im:
        return im.convert('RGB')
    except (OSError, ValueError, Image.DecompressionBombError) as e:
      raise datasets.BadImage.of(self.paths[i], e) from e

  def subset(self, indices):
    return Source(self.labels[indices],
                  None if self.paths is None else [self.paths[i] for i in indices],
                  None if self.images is None else self.images[indices],
                  None if self.split is None else self.split.subset(indices))


@dataclasses.dataclass
class Data:
  classes: list
  train: Source
  val: Source
  original_hw: tuple   # typical (height, width) of the images


def load(args, logger, check_train=True):
  """The dataset named by --dataset, as Data; raises BadInput on bad data.

  Image files are checked (headers read) before use; `check_train=False`
  checks only the validation files.
  """
  if args.dataset in datasets.ARRAY_DATASETS:
    d = datasets.load_array_dataset(args.dataset)
    return Data(list(d.classes), Source(d.train_labels, images=d.train_images),
                Source(d.val_labels, images=d.val_images),
                d.train_images.shape[1:3])
  if args.dataset in ('imagefolder', 'imagenet2012'):
    classes, train, val = datasets.scan_imagefolder(args.datadir)
    train = Source(train.labels, train.paths)
    if check_train:
      train = _check_files(train, args, logger)
    val = _check_files(Source(val.labels, val.paths), args, logger)
    return Data(classes, train, val, _typical_hw(train.paths))
  if tfds_reader.is_tfds(args.dataset):
    d = tfds_reader.resolve(args.dataset, args.datadir,
                         getattr(args, 'tfds_manual_dir', None),
                         getattr(args, 'train_split', None),
                         getattr(args, 'eval_split', None))
    return Data(d.classes, Source(split=d.read('train')),
                Source(split=d.read('eval')), d.original_hw)
  return _torchvision(args)


def _typical_hw(paths):
  return bit_hyperrule.typical_size(datasets.image_sizes(paths))


def _check_files(source, args, logger):
  """The source without unreadable files (--skip_bad_images), or datasets.BadImage."""
  keep = datasets.readable_images(source.paths, args.skip_bad_images, logger)
  return source if len(keep) == len(source) else source.subset(keep)


def _torchvision(args):
  """cifar10/100, oxford_iiit_pet, oxford_flowers102 via torchvision,
  downloaded into --datadir when missing."""
  from torchvision import datasets
  root = args.datadir or os.path.join('data', args.dataset)
  try:
    if args.dataset in ('cifar10', 'cifar100'):
      cls = datasets.CIFAR10 if args.dataset == 'cifar10' else datasets.CIFAR100
      train, val = (cls(root, train=t, download=True) for t in (True, False))
      return Data(list(train.classes),
                  Source(np.asarray(train.targets), images=train.data),
                  Source(np.asarray(val.targets), images=val.data),
                  train.data.shape[1:3])
    # As the TFDS backends: train on the dataset's train split, evaluate on
    # its validation split where it has one, else on its test split.
    if args.dataset == 'oxford_iiit_pet':
      train, val = (datasets.OxfordIIITPet(root, split=s, download=True)
                    for s in ('trainval', 'test'))
      files = [_pets_files(root, s) for s in ('trainval', 'test')]
    else:  # oxford_flowers102: loader=str gives each image's path
      train, val = (datasets.Flowers102(root, split=s, download=True,
                                        loader=str) for s in ('train', 'val'))
      files = [tuple(zip(*(d[i] for i in range(len(d))))) for d in (train,
                                                                    val)]
  except (OSError, RuntimeError) as e:
    raise errors.BadInput(f'could not get {args.dataset} into {root} ({e}); '
                              'check the network or --datadir.') from e
  (tp, tl), (vp, vl) = files
  tp = [str(p) for p in tp]
  return Data(list(train.classes), Source(np.asarray(tl), tp),
              Source(np.asarray(vl), [str(p) for p in vp]), _typical_hw(tp))


def _pets_files(root, split):
  """(image paths, labels) of a split of Oxford-IIIT Pet as torchvision
  lays it out: the dataset's own annotation list, whose lines read "NAME
  CLASS_ID SPECIES BREED_ID" (CLASS_ID counts from 1)."""
  folder = os.path.join(root, 'oxford-iiit-pet')
  with open(os.path.join(folder, 'annotations', f'{split}.txt')) as f:
    rows = [line.split() for line in f if line.strip()]
  return ([os.path.join(folder, 'images', f'{r[0]}.jpg') for r in rows],
          [int(r[1]) - 1 for r in rows])


def fewshot(source, args):
  """The --examples_per_class subset, drawn by the shared sampler."""
  if not args.examples_per_class:
    return source
  return source.subset(datasets.fewshot_indices(
      source.labels, args.examples_per_class, args.examples_per_class_seed))


# --------------------------------------------------------------------------
# Pre-processing. Workers return uint8 CHW tensors; scaling to [-1, 1]
# happens on the device, so less data crosses to it.

def _to_tensor(img):
  return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


class TrainSet(torch.utils.data.Dataset):
  """Resize to (resize, resize), crop to (crop, crop), flip, as the data
  stream decides: indexed by (example, augmentation seed)."""

  def __init__(self, source, resize, crop):
    self.source, self.resize, self.crop = source, resize, crop

  def __len__(self):
    return len(self.source)

  def __getitem__(self, key):
    i, seed = key
    (top,), (left,), (flip,) = datastream.crop_flip([seed], self.resize,
                                                  self.crop)
    img = self.source.load(i).resize((self.resize, self.resize),
                                     Image.BILINEAR)
    img = img.crop((left, top, left + self.crop, top + self.crop))
    if flip:
      img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return _to_tensor(img), int(self.source.labels[i])


class EvalSet(torch.utils.data.Dataset):
  """Resize to (crop, crop)."""

  def __init__(self, source, crop):
    self.source, self.crop = source, crop

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    img = self.source.load(i).resize((self.crop, self.crop), Image.BILINEAR)
    return _to_tensor(img), int(self.source.labels[i])


def normalize(images, device, channels_last=False):
  """uint8 NCHW -> float in [-1, 1] on `device`."""
  x = images.to(device, non_blocking=True).float().sub_(127.5).div_(127.5)
  return x.contiguous(memory_format=torch.channels_last) if channels_last else x


# --------------------------------------------------------------------------
# The order of training examples.

class TrainBatches(torch.utils.data.Sampler):
  """This process's micro-batches of the data stream (datastream.Stream),
  from `start_step` to `total_steps`, as keys (example, augmentation seed).

  Process `rank` of `world` trains on its contiguous share of each global
  batch, cut into `split` micro-batches; a micro-batch also loads the mixup
  partners of its examples that lie outside it (`layout` says where each
  example's partner is), so any (world, split) pair trains on the same
  mixed batch.
  """

  def __init__(self, stream, start_step, total_steps, rank=0, world=1,
               split=1):
    self.stream, self.start, self.total = stream, start_step, total_steps
    micro = stream.batch // world // split
    self.layout = [stream.rows(lo, lo + micro) for lo in range(
        rank * micro * split, (rank + 1) * micro * split, micro)]

  def __len__(self):
    return (self.total - self.start) * len(self.layout)

  def __iter__(self):
    for step in range(self.start, self.total):
      idx, seeds = self.stream.indices(step), self.stream.aug_seeds(step)
      for rows, _ in self.layout:
        yield [(int(idx[p]), int(seeds[p])) for p in rows]
