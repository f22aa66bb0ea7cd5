"""big_transfer.held, training images decoded once: the views of held
images are those of images decoded at every read, in PyTorch's and JAX's
loaders, and TF2 gets the same pixels from them; which runs hold. The runs
of tests/test_trainers.py hold theirs, and leave no held file behind."""
import argparse
import contextlib
import dataclasses
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from big_transfer import datasets, datastream, held, loader
from bit_pytorch import data as torch_data
from bit_pytorch import engine

RESIZE, CROP = 24, 16


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  """Images of several sizes, shrunk and enlarged to RESIZE, JPEG and PNG."""
  root = tmp_path_factory.mktemp('held')
  rng = np.random.default_rng(0)
  for split, n in (('train', 5), ('val', 2)):
    for c in range(3):
      os.makedirs(root / split / f'c{c}')
      for i in range(n):
        h, w = rng.integers(16, 60, 2)
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8))
        image.save(root / split / f'c{c}' / f'{i}.{"jpg" if i % 2 else "png"}')
  return str(root)


@pytest.fixture(scope='module')
def holding(folder, tmp_path_factory):
  """(the folder's training Source, its Held images)."""
  train = datasets.load(argparse.Namespace(dataset='imagefolder',
                                           datadir=folder)).train
  path = held.hold(len(train), RESIZE, train.load,
                   str(tmp_path_factory.mktemp('run')), 2,
                   logging.getLogger('test_held'))
  return train, held.Held(path, train.labels)


def test_held_views_are_the_decoded_ones(holding):
  train, kept = holding
  stream = datastream.Stream(len(train), 6, seed=3, mixup_alpha=0.5)
  views = [torch_data.TrainSet(s, RESIZE, CROP) for s in (train, kept)]
  for step in (0, 1):
    for i, seed in zip(stream.indices(step), stream.aug_seeds(step)):
      want, got = (v[(int(i), int(seed))] for v in views)
      torch.testing.assert_close(got, want, rtol=0, atol=0)
  # The JAX loader's processes get the file's path and map it themselves.
  with contextlib.closing(loader.train_batches(
      kept, 3, stream, RESIZE, CROP, workers=2)) as batches:
    batch = next(batches)
  want = next(loader.train_batches(train, 3, stream, RESIZE, CROP,
                                   workers=0))
  for key in want:
    np.testing.assert_array_equal(batch[key], want[key])


def test_tf2_gets_pytorchs_pixels_from_held_images(holding, folder):
  ip = pytest.importorskip('input_pipeline_tf2_or_jax')
  train, kept = holding
  stream = datastream.Stream(len(train), 6, seed=5, mixup_alpha=0.5)
  rows, partner = stream.rows(0, 6)
  views = torch_data.TrainSet(train, RESIZE, CROP)
  i, seeds = stream.indices(0), stream.aug_seeds(0)
  x = torch.stack([views[(int(i[r]), int(seeds[r]))][0] for r in rows])
  (want, *_), = engine.mixed([(x, torch.zeros(len(rows)))],
                             [(rows, partner)], stream.lam(0), 'cpu')
  want = want.permute(0, 2, 3, 1).numpy()
  data = ip.load(argparse.Namespace(
      dataset='imagefolder', datadir=folder, examples_per_class=None,
      examples_per_class_seed=0, skip_bad_images=False, workers=None))

  def first_images(data):
    batches = ip.train_batches(data, stream, RESIZE, CROP)
    return next(batches.as_numpy_iterator())['image']
  # TF2 resizes in float: its own pixels differ from PyTorch's ...
  assert np.abs(first_images(data) - want).max() > 1e-2
  # ... and a held image's are PyTorch's.
  held_data = dataclasses.replace(
      data, train=dataclasses.replace(data.train, held=kept.path))
  np.testing.assert_allclose(first_images(held_data), want, rtol=0,
                             atol=1e-6)


def test_which_runs_hold(tmp_path, monkeypatch):
  def why(n=100, reads=200, decodes=True, processes=1, **flags):
    args = argparse.Namespace(**flags)
    return held.wanted(args, n, 32, reads, decodes, processes, str(tmp_path))
  assert why() is None  # each image read twice, 300 KiB
  assert 'read 1.9 times' in why(reads=190)
  assert why(reads=190, hold_images=True) is None
  assert why(hold_images=False) == '--no-hold_images'
  assert 'arrays' in why(decodes=False)
  assert '2 training processes' in why(processes=2)
  monkeypatch.setattr(held, '_memory_bytes', lambda: 4 * 100 * 32 * 32 * 3 - 4)
  assert 'would not fit' in why()
  assert 'would not fit' in why(hold_images=True)
