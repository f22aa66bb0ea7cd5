"""big_transfer.held, training images decoded once: the views of held
images are those of images decoded at every read, in PyTorch's loader and
in big_transfer.loader (JAX's and TF2's); which runs hold; several
processes decide together, share the decoding, and an error in one stops
them all. The runs
of tests/test_trainers.py and tests/test_multiprocess.py hold theirs, and
leave no held file behind."""
import argparse
import contextlib
import logging
import os
import threading
import types

import numpy as np
import pytest
import torch
from PIL import Image

from big_transfer import (datasets, datastream, errors, hardware, held,
                          loader, preprocess)
from conftest import as_processes
from bit_pytorch import data as torch_data

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


def test_a_held_view_is_a_writable_copy(holding):
  # Also where the crop is the whole held image: the teacher's run in
  # tests/test_distill.py (images at the crop size) once handed PyTorch a
  # read-only view of the mapped file.
  image, _ = holding[1].example(0)
  assert not image.flags.writeable
  _, _, flips = datastream.crop_flip(np.arange(8), RESIZE, RESIZE)
  assert 0 < flips.sum() < 8  # flipped and not
  for seed in range(8):
    view = preprocess.train_view(image, seed, RESIZE, RESIZE)
    assert view.flags.writeable and view.flags.c_contiguous
    assert not np.shares_memory(view, image)
    np.testing.assert_array_equal(view, image[:, ::-1] if flips[seed]
                                  else image)


def test_which_runs_hold(tmp_path, monkeypatch):
  def why(n=100, reads=200, decodes=True, **flags):
    args = argparse.Namespace(**flags)
    return held.wanted(args, n, 32, reads, decodes, str(tmp_path))
  assert why() is None  # each image read twice, 300 KiB
  assert 'read 1.9 times' in why(reads=190)
  assert why(reads=190, hold_images=True) is None
  assert why(hold_images=False) == '--no-hold_images'
  assert 'arrays' in why(decodes=False)
  monkeypatch.setattr(hardware, 'memory_bytes', lambda: 4 * 100 * 32 * 32 * 3 - 4)
  assert 'would not fit' in why()
  assert 'would not fit' in why(hold_images=True)


def two_processes(folder, run_dir, load):
  """held.for_run in two processes (conftest.as_processes: threads), p0
  the lead, on one run folder, image i read by load(process, train, i):
  {name: (its file or its error, args.hold_images)}."""
  train = datasets.load(argparse.Namespace(dataset='imagefolder',
                                           datadir=folder)).train

  def process(index, votes):
    run = types.SimpleNamespace(dir=str(run_dir), lead=index == 0,
                                any_process=votes,
                                logger=logging.getLogger('test_held'))
    args = argparse.Namespace(batch=4, workers=1)
    hyper = types.SimpleNamespace(resize=RESIZE, total=len(train))
    try:
      end = held.for_run(run, args, len(train), hyper,
                         lambda i: load(f'p{index}', train, i), True,
                         (index, 2))
    except Exception as e:  # pylint: disable=broad-exception-caught
      end = e
    return end, args.hold_images
  return as_processes(2, process)


def test_processes_hold_together(holding, folder, tmp_path, monkeypatch):
  train, kept = holding
  monkeypatch.setattr(held, 'CHUNK', 4)  # 15 images: chunks 0, 2 and 1, 3
  readers = {}

  def load(process, src, i):
    readers.setdefault(process, []).append(i)
    return src.load(i)
  ends = two_processes(folder, tmp_path, load)
  path = str(tmp_path / held.FOLDER / held.FILE)
  assert ends == {'p0': (path, True), 'p1': (path, True)}
  assert {k: sorted(v) for k, v in readers.items()} == {
      'p0': [0, 1, 2, 3, 8, 9, 10, 11], 'p1': [4, 5, 6, 7, 12, 13, 14]}
  np.testing.assert_array_equal(np.load(path), kept.images())
  assert os.listdir(tmp_path / held.FOLDER) == [held.FILE]

  # One host short of memory: neither holds, and nothing is written.
  monkeypatch.setattr(hardware, 'memory_bytes', lambda: (
      8 if threading.current_thread().name == 'p1' else 2**40))
  ends = two_processes(folder, tmp_path, lambda _, src, i: src.load(i))
  assert ends == {'p0': (None, False), 'p1': (None, False)}
  assert not os.path.exists(tmp_path / held.FOLDER)


def test_an_error_in_one_process_stops_every_process(folder, tmp_path,
                                               monkeypatch):
  monkeypatch.setattr(held, 'CHUNK', 4)

  def unreadable(_, src, i):
    if i == 13:  # p1's, in the second round
      raise datasets.BadImage.of(src.paths[i], OSError('truncated'))
    return src.load(i)
  ends = two_processes(folder, tmp_path, unreadable)
  (lead, chose), (other, _) = ends['p0'], ends['p1']
  assert chose and isinstance(other, errors.BadInput)
  assert 'truncated' in str(other)
  assert isinstance(lead, errors.BadInput)
  assert 'another process refused its input' in str(lead)
  assert not os.path.exists(tmp_path / held.FOLDER)  # no partial file left

  def out_of_memory(_, src, i):
    if i == 2:  # the lead's, in the first round
      raise MemoryError
    return src.load(i)
  ends = two_processes(folder, tmp_path, out_of_memory)
  assert isinstance(ends['p0'][0], MemoryError)
  assert isinstance(ends['p1'][0], errors.RunFailed)
  assert 'another process failed' in str(ends['p1'][0])
