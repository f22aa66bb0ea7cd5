"""Data for the PyTorch backend: the datasets of big_transfer.datasets plus
torchvision's named ones, the pre-processing of big_transfer.preprocess as
torch Datasets, and the sampler that feeds the shared data stream
(datastream.Stream) to a DataLoader.

Every random choice about the data (the order, the crops, the flips, mixup)
comes from the stream, a function of (--seed, step, position in the global
batch), so a resumed run, a run over any number of processes, and a run in
another backend see exactly the same batches.
"""
import os

import numpy as np
import torch

import bit_hyperrule
from big_transfer import datasets, errors, preprocess, runfiles


def load(args, logger, check_train=True):
  """The dataset of --dataset (datasets.Data); the named datasets through
  torchvision. Raises BadInput on bad data (see datasets.load)."""
  return datasets.load(args, logger, check_train, named=_torchvision)


def _torchvision(args):
  """cifar10/100, oxford_iiit_pet, oxford_flowers102 via torchvision,
  downloaded into --datadir when missing."""
  from torchvision import datasets as tv_datasets
  root = args.datadir or os.path.join('data', args.dataset)
  try:
    with runfiles.removed_on_failure(root):
      if args.dataset in ('cifar10', 'cifar100'):
        cls = (tv_datasets.CIFAR10 if args.dataset == 'cifar10' else
               tv_datasets.CIFAR100)
        train, val = (cls(root, train=t, download=True) for t in (True, False))
        return datasets.Data(args.dataset, list(train.classes),
                             datasets.Source(np.asarray(train.targets),
                                             images=train.data),
                             datasets.Source(np.asarray(val.targets),
                                             images=val.data),
                             train.data.shape[1:3], 'test')
      # As the TFDS backends: train on the dataset's train split, evaluate on
      # its validation split where it has one, else on its test split.
      if args.dataset == 'oxford_iiit_pet':
        train, val = (tv_datasets.OxfordIIITPet(root, split=s, download=True)
                      for s in ('trainval', 'test'))
        files = [_pets_files(root, s) for s in ('trainval', 'test')]
      else:  # oxford_flowers102: loader=str gives each image's path
        train, val = (tv_datasets.Flowers102(root, split=s, download=True,
                                          loader=str) for s in ('train', 'val'))
        files = [tuple(zip(*(d[i] for i in range(len(d))))) for d in (train,
                                                                      val)]
  except (OSError, RuntimeError) as e:
    raise errors.BadInput(f'could not get {args.dataset} into {root} ({e}); '
                          'check the network or --datadir.') from e
  (tp, tl), (vp, vl) = files
  tp = [str(p) for p in tp]
  return datasets.Data(
      args.dataset, list(train.classes), datasets.Source(np.asarray(tl), tp),
      datasets.Source(np.asarray(vl), [str(p) for p in vp]),
      bit_hyperrule.typical_size(datasets.image_sizes(tp)),
      'test' if args.dataset == 'oxford_iiit_pet' else 'val')


def _pets_files(root, split):
  """(image paths, labels) of a split of Oxford-IIIT Pet as torchvision
  lays it out: the dataset's own annotation list, whose lines read "NAME
  CLASS_ID SPECIES BREED_ID" (CLASS_ID counts from 1)."""
  folder = os.path.join(root, 'oxford-iiit-pet')
  with open(os.path.join(folder, 'annotations', f'{split}.txt')) as f:
    rows = [line.split() for line in f if line.strip()]
  return ([os.path.join(folder, 'images', f'{r[0]}.jpg') for r in rows],
          [int(r[1]) - 1 for r in rows])


# --------------------------------------------------------------------------
# Pre-processing. Workers return uint8 CHW tensors; scaling to [-1, 1]
# happens on the device, so less data crosses to it.

def _to_tensor(view):
  """uint8 HWC (NumPy) -> uint8 CHW tensor."""
  return torch.from_numpy(view).permute(2, 0, 1)


class TrainSet(torch.utils.data.Dataset):
  """preprocess.train_example of a datasets.Source, indexed by (example,
  augmentation seed)."""

  def __init__(self, source, resize, crop, crop_scale=None):
    self.source, self.resize, self.crop = source, resize, crop
    self.crop_scale = crop_scale

  def __len__(self):
    return len(self.source)

  def __getitem__(self, key):
    i, seed = key
    image, label = preprocess.train_example(
        self.source, i, seed, self.resize, self.crop, self.crop_scale)
    return _to_tensor(image), label


class EvalSet(torch.utils.data.Dataset):
  """preprocess.eval_example of a datasets.Source."""

  def __init__(self, source, crop):
    self.source, self.crop = source, crop

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    image, label = preprocess.eval_example(self.source, i, self.crop)
    return _to_tensor(image), label


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
