"""Feature extraction and few-shot linear evaluation (big_transfer.fewshot and
bit_{pytorch,tf2,jax}.{features,fewshot}): the same features and the same
accuracy table in the three backends, the least-squares fit against
scikit-learn, the bundled model against random initialisation, and bad input.
"""
import importlib
import json
import os
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from big_transfer import datasets, errors
from big_transfer import fewshot
from conftest import REPO, synthetic_weights, write_imagefolder

BUNDLED = 'BiT-R14x0.5-FashionMNIST'
BACKENDS = ('bit_pytorch', 'bit_tf2', 'bit_jax')


def features_module(backend):
  return importlib.import_module(f'{backend}.features')


def fewshot_args(*flags):
  return fewshot.fewshot_argparser('test').parse_args(
      ['--workers', '0', *flags])


def features_args(*flags):
  return fewshot.features_argparser('test').parse_args(
      ['--workers', '0', *flags])


@pytest.fixture(scope='module')
def digits_32px():
  """300 training and 200 evaluation digits resized by PIL to 32 px once
  (uint8), as a dict of splits."""
  d = datasets.load_digits()
  resize = lambda images: np.stack([np.asarray(Image.fromarray(x).resize(
      (32, 32), Image.BILINEAR)) for x in images])
  return {'train': (resize(d.train_images[:300]), d.train_labels[:300]),
          'eval': (resize(d.val_images[:200]), d.val_labels[:200])}


def same_images(backend, images):
  """`backend` (a features module) fed these already-sized uint8 images,
  so that every backend sees the very same pixels."""
  def load_data(args, logger):
    del args, logger
    return fewshot.Splits(10, (32, 32),
                              {s: len(y) for s, (_, y) in images.items()},
                              {s: y for s, (_, y) in images.items()})

  def feature_batches(model, splits, split, crop, batch, args):
    del splits, crop, args
    x, y = images[split]
    for i in range(0, len(y), batch):
      yield model((x[i:i + batch] - 127.5) / 127.5), y[i:i + batch]

  return types.SimpleNamespace(NAME=backend.NAME, load_data=load_data,
                               load_model=backend.load_model,
                               feature_batches=feature_batches)


def test_features_equal_across_backends():
  weights = synthetic_weights('R14x0.5', head_size=10, seed=3)
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (5, 40, 40, 3)).astype(np.float32)
  feats = {b: features_module(b).load_model(weights)(images)
           for b in BACKENDS}
  from bit_pytorch import models
  net = models.create('weights', weights=weights).eval()
  with torch.no_grad():
    direct = net.features(torch.from_numpy(images).permute(0, 3, 1, 2))
  assert feats['bit_pytorch'].shape == (5, 1024)
  np.testing.assert_allclose(feats['bit_pytorch'], direct.numpy(), rtol=1e-6)
  scale = np.abs(feats['bit_pytorch']).max()
  for b in ('bit_tf2', 'bit_jax'):
    np.testing.assert_allclose(feats[b], feats['bit_pytorch'], rtol=1e-4,
                               atol=1e-5 * scale)


@pytest.mark.parametrize('n,d', [(60, 12), (15, 40)])
def test_ridge_equals_scikit_learn(n, d):
  """Both closed forms (more examples than features, and fewer) give
  scikit-learn's ridge regression on the standardised features."""
  from sklearn.linear_model import Ridge
  rng = np.random.default_rng(n)
  labels = np.arange(n) % 5
  x = rng.normal(size=(n, d)) * rng.uniform(0.1, 3, d) + labels[:, None]
  x_test = rng.normal(size=(30, d)) + (np.arange(30) % 5)[:, None]
  fits = fewshot.fit_ridge(x, labels, 5, [0.5, 40.0])
  for l2, fit in zip([0.5, 40.0], fits):
    z = (x - x.mean(0)) / fit.std
    ref = Ridge(alpha=l2, fit_intercept=True, solver='svd').fit(
        z, np.eye(5)[labels])
    np.testing.assert_allclose(fit.w, ref.coef_.T, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(fit.b, ref.intercept_, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(fit.scores(x_test), ref.predict(
        (x_test - x.mean(0)) / fit.std), rtol=1e-6, atol=1e-9)
  # The standardisation: mean and std of the few-shot examples, the std
  # floored at STD_FLOOR times the mean std.
  s = x.std(0)
  np.testing.assert_allclose(fits[0].std, s + fewshot.STD_FLOOR * s.mean())


def test_large_fits_in_float32_agree(monkeypatch):
  """Large problems form the Gram matrix and the scores in float32: the
  same classifier as float64 to about float32 precision."""
  rng = np.random.default_rng(0)
  labels = np.arange(400) % 40
  centres = rng.normal(size=(40, 300))
  x = np.maximum(centres[labels] + rng.normal(size=(400, 300)), 0)
  x_test = np.maximum(centres[np.arange(2000) % 40] +
                      rng.normal(size=(2000, 300)), 0).astype(np.float32)
  exact = fewshot.fit_ridge(x, labels, 40, [100.0])[0]
  exact_predictions = exact.predict(x_test)
  monkeypatch.setattr(fewshot, 'FLOAT32_ABOVE', 0)
  fast = fewshot.fit_ridge(x.astype(np.float32), labels, 40, [100.0])[0]
  scale = np.abs(exact.w).max()
  np.testing.assert_allclose(fast.w, exact.w, atol=1e-5 * scale)
  assert fast.scores(x_test).dtype == np.float32
  assert np.mean(fast.predict(x_test) == exact_predictions) > 0.999


def test_fewshot_table_identical_across_backends(digits_32px, tmp_path):
  """The bundled model on the same digits images: the same table (top-1 of
  every shot and seed) in the three backends."""
  out = {}
  for b in BACKENDS:
    args = fewshot_args('--model', BUNDLED, '--dataset', 'digits',
                        '--shots', '1,5', '--seeds', '2', '--batch', '400',
                        '--out', str(tmp_path / f'{b}.json'))
    out[b] = fewshot.fewshot_main(
        args, same_images(features_module(b), digits_32px))
  saved = json.load(open(tmp_path / 'bit_jax.json'))
  assert set(saved['shots']) == {'1', '5'} and len(saved['shots']['5']) == 2
  assert saved['l2'] == 1024 and saved['eval_size'] == 200
  for b in ('bit_tf2', 'bit_jax'):
    assert out[b]['shots'] == out['bit_pytorch']['shots'], b


def test_bundled_model_beats_random_init_at_5_shots(tmp_path, capsys):
  """Through bit_pytorch.fewshot's own data pipeline, on digits at 32 px."""
  from bit_pytorch import fewshot, models
  torch.manual_seed(0)
  scratch = models.create('R14x0.5', head_size=40).save_npz(
      str(tmp_path / 'scratch.npz'))
  top1 = {}
  for name, model in (('bundled', BUNDLED), ('scratch', scratch)):
    result = fewshot.main(fewshot_args(
        '--model', model, '--dataset', 'digits', '--resolution', '32',
        '--shots', '5', '--seeds', '3', '--batch', '256'))
    top1[name] = np.median(result['shots']['5'])
  assert top1['bundled'] > top1['scratch'] + 0.05, top1
  assert '| 5 | 1024 |' in capsys.readouterr().out


@pytest.mark.parametrize('backend', BACKENDS)
def test_features_cli_covers_the_split_in_order(backend, tmp_path, make_npz):
  """Every example of the evaluation split, in dataset order, from a model
  given as a .npz path (as a fine-tuned model.npz is)."""
  out = tmp_path / 'eval.npz'
  args = features_args('--model', make_npz(), '--dataset', 'digits',
                       '--split', 'eval', '--resolution', '16', '--batch',
                       '300', '--out', str(out))
  features_module(backend).main(args)
  with np.load(out) as f:
    assert f['features'].shape == (797, 1024)
    assert f['features'].dtype == np.float32
    np.testing.assert_array_equal(f['labels'],
                                  datasets.load_digits().val_labels)
    assert json.loads(str(f['info']))['resolution'] == 16


# The features command of a backend on several CPU devices: TF2's logical
# devices (set before TensorFlow starts), JAX's host platform devices.
SEVERAL_DEVICES = {
    'bit_tf2': ('import tensorflow as tf\n'
                'cpu = tf.config.list_physical_devices("CPU")[0]\n'
                'tf.config.set_logical_device_configuration(\n'
                '    cpu, [tf.config.LogicalDeviceConfiguration()] * 2)\n'
                'from bit_tf2 import features\n'
                'features.cli()\n', {}),
    'bit_jax': ('from bit_jax import features\nfeatures.cli()\n',
                {'XLA_FLAGS': '--xla_force_host_platform_device_count=3',
                 'JAX_PLATFORMS': 'cpu'}),
}


@pytest.mark.parametrize('backend', SEVERAL_DEVICES)
def test_features_on_several_devices_equal_one(backend, tmp_path, make_npz):
  """The batch split over 2 (TF2) or 3 (JAX) devices, the rows padded to a
  multiple of them, gives one device's features, in order; a direct call
  on 5 images too."""
  script, env = SEVERAL_DEVICES[backend]
  flags = ['--model', make_npz(), '--dataset', 'digits', '--split', 'eval',
           '--resolution', '16', '--batch', '100', '--workers', '0']
  done = subprocess.run(
      [sys.executable, '-c', script, *flags, '--out', str(tmp_path / 'n.npz')],
      cwd=REPO, env=dict(os.environ, **env),
      capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  features_module(backend).main(features_args(
      *flags[:-2], '--out', str(tmp_path / 'one.npz')))
  with np.load(tmp_path / 'n.npz') as several, \
      np.load(tmp_path / 'one.npz') as one:
    info = json.loads(str(several['info']))
    assert info['n'] == 797 and info['devices'] == (2 if 'tf2' in backend
                                                    else 3)
    np.testing.assert_array_equal(several['labels'], one['labels'])
    # Smaller batches per device take other kernel blockings: rounding.
    scale = np.abs(one['features']).max()
    np.testing.assert_allclose(several['features'], one['features'],
                               rtol=1e-5, atol=1e-5 * scale)


def test_tf2_features_ignore_the_workers_of_tf_config(monkeypatch):
  """A features command is one process: where TF_CONFIG names a cluster (a
  training job's environment), it stays on its own devices instead of
  waiting for workers that never join."""
  import tensorflow as tf
  from bit_tf2 import engine
  monkeypatch.setenv('TF_CONFIG', json.dumps({
      'cluster': {'worker': ['localhost:1', 'localhost:2']},
      'task': {'type': 'worker', 'index': 0}}))
  model = features_module('bit_tf2').load_model(
      synthetic_weights('R14x0.5', head_size=10, seed=3))
  assert type(model.strategy) is tf.distribute.MirroredStrategy
  assert engine.worker(model.strategy) == (0, 1)
  images = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), np.uint8)
  assert model(images).shape == (3, 1024)


def test_imagefolder_and_cache(tmp_path, monkeypatch):
  """An image folder at the HyperRule resolution for its (small) images,
  and features reused from --cache_dir."""
  from bit_tf2 import features
  root = write_imagefolder(tmp_path / 'images', train=6, val=3,
                           size=(24, 20))
  args = fewshot_args('--model', BUNDLED, '--dataset', 'imagefolder',
                      '--datadir', root, '--shots', '1,6', '--seeds', '2',
                      '--cache_dir', str(tmp_path / 'cache'), '--l2', '1,100')
  first = fewshot.fewshot_main(args, features)
  assert first['resolution'] == 128  # small images: 160 -> 128
  assert (first['train_size'], first['eval_size']) == (18, 9)
  assert sorted(first['by_l2']) == ['1', '100']
  assert first['shots'] == first['by_l2']['1']
  assert first['shots']['6'] == [1.0, 1.0]  # colours: all 6 -> one draw
  assert len(list((tmp_path / 'cache').iterdir())) == 2

  extract, extracted = features.feature_batches, []

  def recorded(model, splits, split, *rest):
    extracted.append(split)
    return extract(model, splits, split, *rest)
  monkeypatch.setattr(features, 'feature_batches', recorded)
  again = fewshot.fewshot_main(args, features)
  assert again['shots'] == first['shots'] and extracted == []
  # An evaluation image replaced under its name, the number of images the
  # same: an owl among the cats is the one error, not the stale features.
  shutil.copyfile(os.path.join(root, 'val', 'owl', '000.png'),
                  os.path.join(root, 'val', 'cat', '000.png'))
  changed = fewshot.fewshot_main(args, features)
  assert extracted == ['eval']
  assert changed['shots']['6'] == [8 / 9, 8 / 9]


def exit_status(main, args):
  with pytest.raises(SystemExit) as e:
    errors.run_cli(main, args)
  return e.value.code


def test_a_failed_weights_download_is_reported_before_the_data(
    tmp_path, capsys, weights_download_fails):
  del weights_download_fails
  from bit_pytorch import features, fewshot as torch_fewshot
  for main, args in (
      (torch_fewshot.main, fewshot_args('--shots', '1')),
      (features.main, features_args('--split', 'eval', '--out',
                                    str(tmp_path / 'f.npz')))):
    args.model, args.bit_pretrained_dir = 'BiT-S-R50x1', str(tmp_path / 'w')
    assert exit_status(main, args) == 2
    assert 'could not download' in capsys.readouterr().err
  assert os.listdir(tmp_path) == []


def test_bad_input_exits_2(tmp_path, capsys, monkeypatch):
  from bit_pytorch import features, fewshot
  monkeypatch.setattr(features, 'load_model', lambda weights: pytest.fail(
      'the model was loaded before the input was checked'))
  # More shots than a class has (digits: 91 to 104 training images each).
  assert exit_status(fewshot.main, fewshot_args(
      '--model', BUNDLED, '--dataset', 'digits', '--shots', '5,200')) == 2
  assert 'fewer than the 200 per class' in capsys.readouterr().err
  assert exit_status(fewshot.main, fewshot_args(
      '--model', BUNDLED, '--dataset', 'digits', '--train_split',
      'train[:50]')) == 2
  assert '--train_split applies to tfds:NAME' in capsys.readouterr().err
  root = write_imagefolder(tmp_path / 'images', train=3, val=2)
  # A missing folder of --out is made; one under a file cannot be.
  (tmp_path / 'a_file').write_text('not a folder')
  unwritable = tmp_path / 'a_file' / 'dir'
  assert exit_status(fewshot.main, fewshot_args(
      '--model', BUNDLED, '--dataset', 'imagefolder', '--datadir', root,
      '--shots', '5')) == 2
  for flags in (['--shots', 'five'], ['--shots', '0'], ['--seeds', '0'],
                ['--l2', '-1'], ['--model', 'BiT-X-R1'],
                ['--out', str(unwritable / 'x.json')]):
    assert exit_status(fewshot.main, fewshot_args(
        '--dataset', 'digits', '--model', BUNDLED, *flags)) == 2, flags
  # An unknown split, or an unknown dataset: the parser says so (status 2).
  for flags in (['--split', 'test'], ['--split', 'eval', '--dataset', 'x']):
    with pytest.raises(SystemExit) as e:
      features_args('--model', BUNDLED, '--out', 'x.npz', *flags)
    assert e.value.code == 2
  assert exit_status(features.main, features_args(
      '--model', BUNDLED, '--dataset', 'digits', '--split', 'eval',
      '--out', str(unwritable / 'x.npz'))) == 2
