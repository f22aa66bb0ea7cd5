"""The bundled upstream model and the offline demo: the model loads without a
download in all three backends with the same logits, and a reduced demo run
shows it ahead of training from scratch at 5 examples per class."""
import hashlib
import json
import os

import numpy as np
import pytest

from big_transfer import datasets, errors, harness, predict, zoo
import bit_common
from bit_pytorch import train as torch_train  # torchvision before TF: see below
from demo import run as demo

# Importing torchvision after TensorFlow can crash the process, so the
# PyTorch trainer (and with it torchvision) is imported first.
del torch_train

NAME = 'BiT-R14x0.5-FashionMNIST'
PROVENANCE = zoo.asset(f'{NAME}.md')


def no_network(url, timeout):
  raise AssertionError(f'tried to download {url}')


@pytest.fixture(scope='module')
def weights():
  path = zoo.weights_path(NAME, '/nonexistent', opener=no_network)
  return zoo.load_npz(path)


@pytest.fixture(scope='module')
def digits_batch():
  """Eight validation digits at 32 px, in [-1, 1], NHWC float32."""
  from PIL import Image
  d = datasets.load_array_dataset('digits')
  images = [np.asarray(Image.fromarray(x).resize((32, 32), Image.BILINEAR))
            for x in d.val_images[:8]]
  return ((np.stack(images).astype(np.float32) - 127.5) / 127.5,
          d.val_labels[:8])


def test_bundled_model_is_registered_and_offline(weights):
  info = zoo.model_info(NAME)
  path = zoo.weights_path(NAME, opener=no_network)
  assert path == info.path and os.path.isfile(path)
  assert os.path.getsize(path) < 10 * 2**20
  zoo.check_weights(weights, info.architecture, info.head_size)
  labels = predict.read_labels(info.labels)
  assert len(labels) == info.head_size == 40
  assert labels[4 * 9] == 'Ankle boot (upright)'


def test_provenance_names_the_file_it_describes():
  text = open(PROVENANCE).read()
  path = zoo.weights_path(NAME)
  digest = hashlib.sha256(open(path, 'rb').read()).hexdigest()
  assert digest in text
  for needed in ('big_transfer/recipes/bit_small_fashion_mnist.yaml',
                 'python -m bit_pytorch.pretrain', 'dataset-fashion-mnist',
                 'top-1', 'revision'):
    assert needed in text


def test_bundled_model_same_logits_in_three_backends(weights, digits_batch):
  import jax
  import jax.numpy as jnp
  import torch
  from bit_jax import models as jax_models
  from bit_pytorch import models as torch_models
  from bit_tf2 import models as tf2_models
  x, _ = digits_batch
  net = torch_models.create(NAME, weights=weights).eval()
  with torch.no_grad():
    torch_logits = net(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
  tf2_logits = np.asarray(tf2_models.create(NAME, weights=weights)(x))
  model, params = jax_models.create(NAME, weights=weights)
  jax_logits = np.asarray(jax.jit(model.apply)({'params': params},
                                               jnp.asarray(x)))
  assert torch_logits.shape == (8, 40)
  np.testing.assert_allclose(tf2_logits, torch_logits, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(jax_logits, torch_logits, rtol=1e-4, atol=1e-4)
  assert (tf2_logits.argmax(1) == torch_logits.argmax(1)).all()
  assert (jax_logits.argmax(1) == torch_logits.argmax(1)).all()


@pytest.mark.parametrize('backend', ['bit_pytorch', 'bit_tf2', 'bit_jax'])
def test_every_backend_resolves_the_bundled_model_and_digits(backend,
                                                             tmp_path):
  """What `python -m BACKEND.train --model NAME --dataset digits` starts
  from, offline: the bundled weights (a 40-class head, replaced by the
  run), digits' 1000 training images of 10 classes, and the HyperRule of a
  small dataset of small images (resize 160, crop 128, 500 steps, no
  mixup), as published."""
  import importlib
  train = importlib.import_module(f'{backend}.train')
  args = train.argparser().parse_args(
      ['--name', 'x', '--logdir', str(tmp_path), '--model', NAME,
       '--dataset', 'digits', '--bit_pretrained_dir', '/nonexistent'])
  bit_common.check_args(args)
  weights = zoo.load_weights(args.model, args.bit_pretrained_dir)
  assert zoo.infer_arch(weights)[1] == 40
  data = datasets.load(args)
  assert (len(data.train), data.num_classes) == (1000, 10)
  hyper = harness.HyperRule.of(args, len(data.train), data.original_hw)
  assert (hyper.resize, hyper.crop, hyper.total, hyper.mixup) == (
      160, 128, 500, 0.0)


@pytest.mark.slow
def test_reduced_demo_upstream_beats_scratch_at_5_shot(tmp_path, capsys):
  args = demo.argparser().parse_args(
      ['--logdir', str(tmp_path), '--shots', '5', '--seeds', '2',
       '--steps', '40', '--eval_every', '20', '--linear_shots', '5'])
  results = demo.main(args)
  top1 = {init: np.median([r['top1'] for r in results if r['init'] == init])
          for init in demo.INITS}
  assert top1['upstream'] > top1['scratch'] + 0.05, top1
  out = capsys.readouterr().out
  assert '| 5 |' in out and 'from scratch' in out
  assert (tmp_path / 'demo.png').stat().st_size > 1000
  saved = json.load(open(tmp_path / 'demo.json'))
  assert len(saved['results']) == 4
  assert [s for s, _ in saved['results'][0]['curve']] == [20, 40]
  # Beside it, the few-shot linear evaluation of both networks.
  assert 'random initialisation, linear' in out
  linear = {init: np.median(saved['linear'][init]['5']) for init in demo.INITS}
  assert linear['upstream'] > linear['scratch'] + 0.05, linear


def test_demo_refuses_bad_shots(capsys):
  with pytest.raises(SystemExit) as e:
    errors.run_cli(demo.main, demo.argparser().parse_args(
        ['--shots', '1,five']))
  assert e.value.code == 2
  assert 'give numbers or "all"' in capsys.readouterr().err
