"""The original repository's input-pipeline API (input_pipeline_tf2_or_jax:
get_data, get_dataset_info) on top of big_transfer.loader: the batches
are the trainers', scaled to [-1, 1] and mixed up on the host, in the
original's layout. The file needs TensorFlow."""
import argparse

import numpy as np
import pytest

from big_transfer import datasets, datastream, loader

tf = pytest.importorskip('tensorflow')
import input_pipeline_tf2_or_jax as ip  # noqa: E402


def get_data(mode, **kw):
  settings = dict(dataset='digits', mode=mode, repeats=None, batch_size=8,
                  resize_size=10, crop_size=8, mixup_alpha=None,
                  examples_per_class=None, examples_per_class_seed=0,
                  num_devices=2, tfds_manual_dir=None)
  return list(ip.get_data(**dict(settings, **kw)).as_numpy_iterator())


def digits():
  return datasets.load(argparse.Namespace(dataset='digits'))


def unit(images):
  return (images.astype(np.float32) - 127.5) / 127.5


def test_dataset_info_counts_the_fewshot_subset():
  info = ip.get_dataset_info('digits', 'train', 5)
  assert info == {'original_num_examples': 1000, 'num_examples': 50,
                  'num_classes': 10}
  assert ip.get_dataset_info('digits', 'test', None) == {
      'original_num_examples': 797, 'num_examples': 797, 'num_classes': 10}


def test_training_batches_are_the_loaders_mixed_on_the_host():
  """get_data's training batches are big_transfer.loader's (the trainers'
  batches, resized 10 -> cropped 8 from the 8 px digits), each image
  scaled and mixed with its partner by the stream's lambda, in
  [num_devices, batch / num_devices] layout; `repeats` epochs end it."""
  got = get_data('train', repeats=1, mixup_alpha=0.5, examples_per_class=2,
                 examples_per_class_seed=3)
  # 2 examples of 10 classes, 8 a batch: one epoch is 3 steps.
  assert len(got) == 3
  assert got[0]['image'].shape == (2, 4, 8, 8, 3)
  assert got[0]['label'].shape == (2, 4, 10)
  train = datasets.fewshot(digits().train, argparse.Namespace(
      examples_per_class=2, examples_per_class_seed=3))
  stream = datastream.Stream(len(train), 8, 0, 0.5)
  want = loader.train_batches(train, 10, stream, 10, 8, workers=0)
  for step, batch in enumerate(got):
    ref = next(want)
    lam = stream.lam(step)
    assert 0 < lam < 1 and np.allclose(ref['mix'][:, 0], lam)
    mixed = lam * unit(ref['image']) + (1 - lam) * unit(ref['partner'])
    np.testing.assert_allclose(batch['image'].reshape(8, 8, 8, 3), mixed,
                               rtol=0, atol=1e-6)
    np.testing.assert_allclose(batch['label'].reshape(8, 10), ref['label'],
                               rtol=0, atol=1e-7)
    assert batch['image'].min() >= -1 and batch['image'].max() <= 1
  want.close()


def test_evaluation_covers_the_split_once_in_order_and_exactly():
  batches = get_data('test', batch_size=100)
  assert all(b['mask'].shape == (2, 50) for b in batches)
  mask = np.concatenate([b['mask'].ravel() for b in batches])
  assert mask.sum() == 797 and mask[:797].all()
  data = digits()
  labels = np.concatenate([b['label'].reshape(100, 10) for b in batches])
  np.testing.assert_array_equal(labels[mask].argmax(1), data.val.labels)
  # Images already at the crop size pass unchanged, scaled to [-1, 1].
  images = np.concatenate([b['image'].reshape(100, 8, 8, 3)
                           for b in batches])
  np.testing.assert_allclose(images[mask], unit(data.val.images), atol=1e-6)
