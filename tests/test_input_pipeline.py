"""TF2's tf.data pipeline (input_pipeline_tf2_or_jax): datasets, few-shot
subsets, augmentation, mixup, evaluation coverage, resumption. Every test
here is of that pipeline, so the file needs TensorFlow."""

import numpy as np
import pytest

from big_transfer import datasets, datastream, errors
import bit_common

tf = pytest.importorskip('tensorflow')
import input_pipeline_tf2_or_jax as ip  # noqa: E402


def _args(**kw):
  argv = ['--name', 'x', '--logdir', '/tmp/unused']
  for k, v in kw.items():
    argv += [f'--{k}', str(v)]
  return bit_common.argparser().parse_args(argv)


def _first(ds):
  return next(ds.as_numpy_iterator())


def _batches(data, batch, resize, crop, seed=0, mixup_alpha=0.0, **kw):
  stream = datastream.Stream(data.train_size, batch, seed, mixup_alpha)
  return ip.train_batches(data, stream, resize, crop, **kw)


def _array_data(train_images, labels, val_images=None, val_labels=None):
  train = ip.Source(len(labels), np.asarray(labels, np.int64),
                    images=train_images)
  if val_images is None:
    val_images, val_labels = train_images, labels
  val = ip.Source(len(val_labels), np.asarray(val_labels, np.int64),
                  images=val_images)
  n = int(max(labels)) + 1
  return ip.Data('test', train, val, n, None, train_images.shape[1:3], 'val',
                 train.n)


def test_imagefolder_and_fewshot_match_pytorch(imagefolder):
  torch_data = pytest.importorskip('bit_pytorch.data')
  args = _args(dataset='imagefolder', datadir=imagefolder,
               examples_per_class=3, examples_per_class_seed=5)
  data = ip.load(args)
  ref = datasets.fewshot(torch_data.load(args, None).train, args)
  assert data.train_size == 9 and data.num_classes == 3
  assert list(data.train.table) == list(ref.paths)
  np.testing.assert_array_equal(data.train.labels, ref.labels)
  assert data.original_hw == (40, 48) and data.eval_size == 12
  # Another seed draws another subset.
  other = ip.load(_args(dataset='imagefolder', datadir=imagefolder,
                            examples_per_class=3, examples_per_class_seed=6))
  assert list(other.train.table) != list(data.train.table)


def test_fewshot_asks_too_many(imagefolder):
  with pytest.raises(errors.BadInput, match='only 8'):
    ip.load(_args(dataset='imagefolder', datadir=imagefolder,
                      examples_per_class=9))


def test_eval_covers_every_example_in_order_and_is_exact():
  data = ip.load(_args(dataset='digits'))
  batches = list(ip.eval_batches(data, 100, 8).as_numpy_iterator())
  assert all(len(b['mask']) == 100 for b in batches)
  mask = np.concatenate([b['mask'] for b in batches])
  assert mask.sum() == data.eval_size == 797 and mask[:797].all()
  labels = np.concatenate([b['label'] for b in batches])[mask]
  np.testing.assert_array_equal(labels, data.eval.labels)
  # Images already at the crop size pass unchanged, scaled to [-1, 1].
  images = np.concatenate([b['image'] for b in batches])[mask]
  expected = (data.eval.images.astype(np.float32) - 127.5) / 127.5
  np.testing.assert_allclose(images, expected, atol=1e-6)
  # Split over 3 processes, every example is seen once.
  parts = [list(ip.eval_batches(data, 99, 8, p, 3).as_numpy_iterator())
           for p in range(3)]
  assert len({len(p) for p in parts}) == 1
  seen = sum(int(b['mask'].sum()) for p in parts for b in p)
  assert seen == 797


def test_flips_are_random_and_crops_in_range():
  image = np.zeros((1, 8, 8, 3), np.uint8)
  image[:, :, 4:] = 255                  # dark left half, bright right half
  data = _array_data(image, [0])
  batch = _first(_batches(data, 64, 8, 8, seed=0))
  left_dark = batch['image'][:, :, :4].mean((1, 2, 3)) < 0
  assert 0 < left_dark.sum() < 64        # some flipped, some not
  assert batch['image'].min() >= -1 and batch['image'].max() <= 1
  np.testing.assert_array_equal(batch['label'], np.ones((64, 1)))
  crops = _first(_batches(data, 8, 16, 8, seed=0))['image']
  assert crops.shape == (8, 8, 8, 3)


def test_stream_resumes_at_any_step_and_splits_over_processes():
  data = ip.load(_args(dataset='digits'))
  it = _batches(data, 24, 10, 8, seed=3).as_numpy_iterator()
  # 1000 examples, 24 a batch: step 41 crosses the first epoch boundary.
  steps = [next(it) for _ in range(43)]
  resumed = _first(_batches(data, 24, 10, 8, seed=3, start_step=41))
  np.testing.assert_array_equal(resumed['image'], steps[41]['image'])
  halves = [_first(_batches(data, 24, 10, 8, seed=3, start_step=41,
                                    process_index=p, process_count=2))
            for p in range(2)]
  np.testing.assert_array_equal(
      np.concatenate([h['image'] for h in halves]), steps[41]['image'])
  # One epoch visits every example once.
  labels = np.concatenate([s['label'] for s in steps[:42]])[:1000]
  np.testing.assert_array_equal(labels.sum(0),
                                np.bincount(data.train.labels))
  other = _first(_batches(data, 24, 10, 8, seed=4))
  assert not np.array_equal(other['image'], steps[0]['image'])


def test_mixup_pairs_neighbours_with_the_streams_lambda():
  data = ip.load(_args(dataset='digits'))
  plain = _first(_batches(data, 16, 10, 8, seed=1, start_step=5))
  mixed = _first(_batches(data, 16, 10, 8, seed=1, start_step=5,
                          mixup_alpha=0.5))
  lam = datastream.Stream(data.train_size, 16, 1, 0.5).lam(5)
  assert 0 < lam < 1
  y, x = plain['label'], plain['image']
  pair = np.arange(16) ^ 1  # positions 2k and 2k+1 are partners
  np.testing.assert_allclose(mixed['label'], lam * y + (1 - lam) * y[pair],
                             atol=1e-6)
  np.testing.assert_allclose(mixed['image'], lam * x + (1 - lam) * x[pair],
                             atol=1e-5)
  # A process holding an odd share loads the partners outside it.
  for share in range(2):
    part = _first(_batches(data, 16, 10, 8, seed=1, start_step=5,
                           mixup_alpha=0.5, process_index=share,
                           process_count=4))
    np.testing.assert_allclose(part['image'],
                               mixed['image'][share * 4:share * 4 + 4],
                               atol=1e-6)


def test_the_original_get_data_and_get_dataset_info():
  info = ip.get_dataset_info('digits', 'train', 5)
  assert info == {'original_num_examples': 1000, 'num_examples': 50,
                  'num_classes': 10}
  assert ip.get_dataset_info('digits', 'test', None)[
      'original_num_examples'] == 797
  train = ip.get_data(dataset='digits', mode='train', repeats=None,
                      batch_size=8, resize_size=10, crop_size=8,
                      mixup_alpha=0.1, examples_per_class=2,
                      examples_per_class_seed=0, num_devices=2,
                      tfds_manual_dir=None)
  batch = _first(train)
  assert batch['image'].shape == (2, 4, 8, 8, 3)
  assert batch['label'].shape == (2, 4, 10)
  np.testing.assert_allclose(batch['label'].sum(-1), 1, atol=1e-6)
  test = list(ip.get_data(dataset='digits', mode='test', repeats=1,
                          batch_size=100, resize_size=10, crop_size=8,
                          mixup_alpha=None, examples_per_class=None,
                          examples_per_class_seed=0, num_devices=2,
                          tfds_manual_dir=None).as_numpy_iterator())
  assert test[0]['image'].shape == (2, 50, 8, 8, 3)
  assert sum(int(b['mask'].sum()) for b in test) == 797


def test_subset_smaller_than_batch_draws_with_replacement():
  images = np.arange(6, dtype=np.uint8)[:, None, None, None] * np.ones(
      (1, 4, 4, 3), np.uint8) * 40
  data = _array_data(images, [0, 1, 2, 0, 1, 2])
  batch = _first(_batches(data, 16, 4, 4, seed=0))
  values = np.unique(np.round(batch['image'][:, 0, 0, 0] * 127.5 + 127.5))
  assert len(batch['image']) == 16 and set(values) <= set(range(0, 201, 40))


def test_tfds_path_on_a_local_builder(tmp_path, monkeypatch):
  """The TFDS code path (prepare, labels of the whole split, few-shot,
  sizes from the images, validation split) on a tiny offline builder."""
  tfds = pytest.importorskip('tensorflow_datasets')

  class Tiny(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({  # noqa: E501
          'image': tfds.features.Image(shape=(None, None, 3)),
          'label': tfds.features.ClassLabel(names=['a', 'b']),
          'extra': tfds.features.Image(shape=(None, None, 1))}))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples(30, 0),
              'validation': self._generate_examples(7, 1)}

    def _generate_examples(self, n, seed):
      rng = np.random.default_rng(seed)
      for i in range(n):
        h = 20 + i % 3          # images of varied sizes
        yield i, {'image': rng.integers(0, 255, (h, 24, 3), dtype=np.uint8),
                  'label': i % 2,
                  'extra': np.zeros((h + 1, 5, 1), np.uint8)}

  monkeypatch.setattr(tfds, 'builder',
                      lambda name, data_dir=None: Tiny(data_dir=str(tmp_path)))
  data = ip.load(_args(dataset='cifar10', examples_per_class=4,
                           examples_per_class_seed=2))
  assert data.eval_split == 'validation' and data.eval_size == 7
  assert data.full_train_size == 30 and data.train_size == 8
  assert data.classes == ['a', 'b'] and data.original_hw == (21, 24)
  # The subset is the shared sampler's, over the whole split's labels.
  stored = Tiny(data_dir=str(tmp_path)).as_dataset('train', shuffle_files=False)
  all_labels = np.array([r['label'] for r in stored.as_numpy_iterator()])
  idx = datasets.fewshot_indices(all_labels, 4, 2)
  np.testing.assert_array_equal(data.train.labels, all_labels[idx])
  batch = _first(_batches(data, 8, 24, 16, seed=0))
  assert batch['image'].shape == (8, 16, 16, 3)
  evals = list(ip.eval_batches(data, 4, 16).as_numpy_iterator())
  assert sum(int(b['mask'].sum()) for b in evals) == 7
  # A split too large to hold streams through a shuffle buffer instead.
  monkeypatch.setattr(ip, 'IN_MEMORY_BYTES', 0)
  data = ip.load(_args(dataset='cifar10'))
  assert not data.train.random_access and data.train_size == 30
  labels = [b['label'].argmax(1) for b in
            _batches(data, 10, 24, 16, seed=0).take(3)
            .as_numpy_iterator()]
  np.testing.assert_array_equal(np.bincount(np.concatenate(labels)), [15, 15])
  resumed = _first(_batches(data, 10, 24, 16, seed=0, start_step=2))
  np.testing.assert_array_equal(resumed['label'].argmax(1), labels[2])
  # TF's global seed (bit_tf2.train sets it from --seed, 0 by default; JAX
  # leaves it unset) changes nothing, and 0 does not break the stream.
  import tensorflow as tf
  try:
    for global_seed in (0, 5):
      tf.random.set_seed(global_seed)
      again = [b['label'].argmax(1) for b in
               _batches(data, 10, 24, 16, seed=0).take(3)
               .as_numpy_iterator()]
      np.testing.assert_array_equal(again, labels, err_msg=global_seed)
  finally:
    tf.random.set_seed(None)
  evals = list(ip.eval_batches(data, 4, 16).as_numpy_iterator())
  assert sum(int(b['mask'].sum()) for b in evals) == 7
