"""The VTAB-1k benchmark as data: its 19 tasks, each with its TFDS dataset,
class count, split table and label rule (written from the definitions of
google-research/task_adaptation, task_adaptation/data/). The model registry
(zoo) and the TFDS reader (tfds_reader) both read it.
"""
import dataclasses

import numpy as np


def split_table(kind, counts, arg=None):
  """The seven VTAB splits as TFDS split expressions.

  `counts` maps TFDS split names to their sizes. Kinds:
    given    the dataset's own train/validation/test splits
    carve    validation carved from the end of TFDS train (the first `arg`
             percent stay train); test is TFDS test, or `test_from`
    three    train, validation and test all carved from TFDS train
             (`arg` = (train percent, validation percent))
    norb     validation is the first half of TFDS test, test the second
  """
  if kind == 'given':
    return dict(train='train', val='validation', trainval='train+validation',
                test='test', train800='train[:800]', val200='validation[:200]',
                train800val200='train[:800]+validation[:200]')
  if kind == 'norb':
    return dict(train='train', val='test[:50%]', trainval='train+test[:50%]',
                test='test[50%:]', train800='train[:800]', val200='test[:200]',
                train800val200='train[:800]+test[:200]')
  total = counts['train']
  if kind == 'three':
    n_train, n_val = (p * total // 100 for p in arg)
    table = dict(train=f'train[:{n_train}]',
                 val=f'train[{n_train}:{n_train + n_val}]',
                 trainval=f'train[:{n_train + n_val}]',
                 test=f'train[{n_train + n_val}:]')
  else:  # carve
    percent, test = arg
    n_train = percent * total // 100
    table = dict(train=f'train[:{n_train}]', val=f'train[{n_train}:]',
                 trainval='train', test=test)
  table.update(train800='train[:800]',
               val200=f'train[{n_train}:{n_train + 200}]',
               train800val200=f'train[:800]+train[{n_train}:{n_train + 200}]')
  return table


class _Feature:
  """The label is a class-label feature of the record."""

  def __init__(self, name):
    self.name = name

  def __call__(self, r):
    return int(r[self.name])


class _Binned:
  """Class `name` of `original` classes merged into `bins` equal bins."""

  def __init__(self, name, original, bins):
    self.name, self.width = name, original / bins

  def __call__(self, r):
    return int(np.floor(float(r[self.name]) / self.width))


def _count_objects(r):
  """CLEVR: 3 to 10 objects -> classes 0 to 7."""
  return len(r['objects']['pixel_coords']) - 3


# Bin edges: the label is the last edge below the value.
CLEVR_DISTANCE_EDGES = (0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0)
KITTI_DISTANCE_EDGES = (-100.0, 8.0, 20.0, 999.0)
KITTI_VEHICLES = ('Car', 'Van', 'Truck')


def _last_edge_below(edges, value):
  return int(np.searchsorted(np.asarray(edges), value, side='left')) - 1


def _clevr_distance(r):
  """CLEVR: depth of the closest object, binned."""
  depths = np.asarray(r['objects']['pixel_coords'])[:, 2]
  return _last_edge_below(CLEVR_DISTANCE_EDGES, np.min(depths))


class KittiDistance:
  """KITTI: depth of the closest vehicle (car, van, truck; 1000 m when there
  is none), binned. `types` are the class names of objects/type."""

  def __init__(self, types=None):
    self.vehicle = None if types is None else np.isin(np.asarray(types),
                                                      KITTI_VEHICLES)

  def __call__(self, r):
    kind = np.asarray(r['objects']['type'], np.int64)
    depth = np.asarray(r['objects']['location'],
                       np.float64).reshape(-1, 3)[:, 2]
    nearest = min([1000.0] + list(depth[self.vehicle[kind]]))
    return _last_edge_below(KITTI_DISTANCE_EDGES, nearest)


def _range_names(edges, unit=''):
  return [f'{a:g}-{b:g}{unit}' for a, b in zip(edges[:-1], edges[1:])]


@dataclasses.dataclass(frozen=True)
class VtabTask:
  name: str
  tfds_name: str
  num_classes: int
  splits: tuple                  # (kind, arg) of _split_table
  label: object = None           # record -> int; None: the 'label' feature
  class_names: tuple = None      # None: the label feature's names
  binary_pixels: bool = False    # images hold 0/1 and are scaled to 0/255
  image_key: str = 'image'


def _vtab_tasks():
  natural = [
      VtabTask('caltech101', 'caltech101', 102, ('carve', (90, 'test'))),
      VtabTask('cifar100', 'cifar100', 100, ('carve', (90, 'test'))),
      VtabTask('dtd', 'dtd', 47, ('given', None)),
      VtabTask('oxford_flowers102', 'oxford_flowers102', 102, ('given', None)),
      VtabTask('oxford_iiit_pet', 'oxford_iiit_pet', 37,
               ('carve', (80, 'test'))),
      VtabTask('sun397', 'sun397/tfds', 397, ('given', None)),
      VtabTask('svhn', 'svhn_cropped', 10, ('carve', (90, 'test'))),
  ]
  specialized = [
      VtabTask('patch_camelyon', 'patch_camelyon', 2, ('given', None)),
      VtabTask('eurosat', 'eurosat/rgb', 10, ('three', (60, 20))),
      VtabTask('resisc45', 'resisc45', 45, ('three', (60, 20))),
      VtabTask('diabetic_retinopathy',
               'diabetic_retinopathy_detection/btgraham-300', 5,
               ('given', None)),
  ]
  bins16 = tuple(f'bin {i}' for i in range(16))
  structured = [
      VtabTask('clevr-count', 'clevr', 8, ('carve', (90, 'validation')),
               _count_objects, tuple(f'{n} objects' for n in range(3, 11))),
      VtabTask('clevr-distance', 'clevr', 6, ('carve', (90, 'validation')),
               _clevr_distance, tuple(_range_names(CLEVR_DISTANCE_EDGES))),
      VtabTask('dmlab', 'dmlab', 6, ('given', None)),
      VtabTask('kitti-distance', 'kitti', 4, ('given', None), KittiDistance(),
               tuple(_range_names(KITTI_DISTANCE_EDGES, ' m'))),
      VtabTask('dsprites-xpos', 'dsprites', 16, ('three', (80, 10)),
               _Binned('label_x_position', 32, 16), bins16, True),
      VtabTask('dsprites-orientation', 'dsprites', 16, ('three', (80, 10)),
               _Binned('label_orientation', 40, 16), bins16, True),
      VtabTask('smallnorb-azimuth', 'smallnorb', 18, ('norb', None),
               _Feature('label_azimuth')),
      VtabTask('smallnorb-elevation', 'smallnorb', 9, ('norb', None),
               _Feature('label_elevation')),
  ]
  return {t.name: t for t in natural + specialized + structured}


TASKS = _vtab_tasks()
SPLITS = ('train800', 'val200', 'train800val200', 'test', 'train', 'val',
               'trainval')
# VTAB-1k as published: fit on the 1,000 examples, report on test.
DEFAULT_SPLITS = ('train800val200', 'test')


def label_feature(task):
  """The record feature a task's label is read from: 'label', the feature
  a label rule reads as it is (smallnorb), or 'derived'."""
  if task.label is None:
    return 'label'
  return task.label.name if isinstance(task.label, _Feature) else 'derived'
