"""Weights from the Hugging Face Hub (offline, from a cache made here),
exports checked against their source, TensorBoard event files and plots.

References are independent of the code under test: timm's own ResNetV2
(with timm's weight-standardisation eps, 1e-8), onnxruntime, the TFLite
interpreter and TensorBoard's own event reader.
"""
import copy
import functools
import hashlib
import json
import os
import socket
import time

import numpy as np
import pytest
import torch
from PIL import Image

from big_transfer import errors, events, plot, predict, zoo
from conftest import synthetic_weights

COMMIT = 'a' * 40


def timm_bit(layers, width, classes, eps=1e-8):
  """timm's BiT ResNetV2 (as timm.create_model('resnetv2_50x1_bit') builds
  it, at another depth and width); the tests that use it skip without
  timm."""
  pytest.importorskip('timm')
  from timm.layers import StdConv2d  # pylint: disable=import-outside-toplevel
  from timm.models.resnetv2 import ResNetV2  # pylint: disable=import-outside-toplevel
  return ResNetV2(layers=list(layers), num_classes=classes,
                  width_factor=width, stem_type='fixed',
                  conv_layer=functools.partial(StdConv2d, eps=eps)).eval()


@pytest.fixture(scope='module')
def timm_model():
  """A timm R26x0.5 (two units a block) with every parameter drawn at
  random, so that no norm is the identity."""
  torch.manual_seed(0)
  model = timm_bit((2, 2, 2, 2), 0.5, 7)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith('weight') and p.ndim == 1:
        p.copy_(1 + 0.1 * torch.randn_like(p))
      elif p.ndim == 1:
        p.copy_(0.1 * torch.randn_like(p))
      else:
        p.copy_(torch.randn_like(p) * (0.05 if 'head' in name else 1))
  return model


def to_transformers(timm_state):
  """A timm BiT state dict renamed as transformers' BitForImageClassification
  names its parameters (modeling_bit.py: bit.embedder.convolution,
  bit.encoder.stages.I.layers.J.*, bit.norm, classifier.1 a Linear)."""
  out = {}
  for key, value in timm_state.items():
    if key == 'stem.conv.weight':
      key = 'bit.embedder.convolution.weight'
    elif key.startswith('stages.'):
      key = 'bit.encoder.' + key.replace('.blocks.', '.layers.')
    elif key.startswith('norm.'):
      key = 'bit.' + key
    elif key.startswith('head.fc.'):
      key = 'classifier.1.' + key.split('.')[-1]
      value = value.reshape(value.shape[0], -1) if value.ndim == 4 else value
    out[key] = value.clone()
  return out


def put_in_hub_cache(cache, repo_id, files):
  """Stores {filename: bytes} as huggingface_hub's cache does: content in
  blobs/<sha256>, refs/main naming the commit, snapshots/<commit>/<file>
  a relative symlink to the blob."""
  repo = os.path.join(cache, 'models--' + repo_id.replace('/', '--'))
  for sub in ('blobs', 'refs', os.path.join('snapshots', COMMIT)):
    os.makedirs(os.path.join(repo, sub), exist_ok=True)
  with open(os.path.join(repo, 'refs', 'main'), 'w') as f:
    f.write(COMMIT)
  for name, content in files.items():
    blob = hashlib.sha256(content).hexdigest()
    with open(os.path.join(repo, 'blobs', blob), 'wb') as f:
      f.write(content)
    os.symlink(os.path.join('..', '..', 'blobs', blob),
               os.path.join(repo, 'snapshots', COMMIT, name))


def file_bytes(tmp_path, name, write):
  path = tmp_path / name
  write(str(path))
  return path.read_bytes()


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
  """An empty huggingface_hub cache in tmp_path, offline."""
  import huggingface_hub
  cache = str(tmp_path / 'hub')
  os.makedirs(cache)
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  monkeypatch.setenv('HF_HUB_CACHE', cache)
  monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
  monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', cache)
  return cache


@pytest.fixture
def hub_repos(tmp_path, offline_hub, timm_model):
  """Two repositories in the offline cache: timm's layout as safetensors,
  transformers' as a PyTorch .bin with its config.json."""
  from safetensors.torch import save_file
  state = {k: v.contiguous() for k, v in timm_model.state_dict().items()}
  put_in_hub_cache(offline_hub, 'timm/resnetv2_26x05_bit.test', {
      'model.safetensors': file_bytes(
          tmp_path, 'm.safetensors', lambda p: save_file(state, p)),
      'config.json': json.dumps({'architecture': 'resnetv2_50x1_bit'}).encode(),
  })
  put_in_hub_cache(offline_hub, 'google/bit-26-test', {
      'pytorch_model.bin': file_bytes(
          tmp_path, 'm.bin', lambda p: torch.save(to_transformers(state), p)),
      'config.json': json.dumps({'layer_type': 'preactivation',
                                 'global_padding': None,
                                 'embedding_dynamic_padding': False}).encode(),
  })
  return ('hf-hub:timm/resnetv2_26x05_bit.test', 'hf-hub:google/bit-26-test')


def test_hub_weights_through_every_backend_match_timm(tmp_path, hub_repos,
                                                      timm_model):
  from bit_jax import predict as jax_predict
  from bit_pytorch import predict as torch_predict
  from bit_tf2 import predict as tf2_predict
  rng = np.random.default_rng(0)
  images = []
  for i in range(2):
    images.append(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    Image.fromarray(images[-1]).save(tmp_path / f'img{i}.png')
  x = (np.stack(images).astype(np.float32) - 127.5) / 127.5
  with torch.no_grad():
    want = timm_model(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
  scale = np.abs(want).max()
  assert scale > 0.1
  timm_repo, transformers_repo = hub_repos
  weights = zoo.load_weights(timm_repo)
  assert zoo.infer_arch(weights) == (zoo.parse_arch('R26x0.5'), 7)
  # The transformers file maps to the very same published weights...
  from_transformers = zoo.load_weights(transformers_repo)
  assert sorted(from_transformers) == sorted(weights)
  for key, value in weights.items():
    np.testing.assert_array_equal(from_transformers[key], value, err_msg=key)
  # bit_pytorch.validate takes it too.
  import argparse
  from bit_pytorch import validate
  net, _ = validate.load_model(argparse.Namespace(
      ckpt_path=transformers_repo, bit_pretrained_dir='.'), list(range(7)))
  with torch.no_grad():
    got = net.eval()(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
  np.testing.assert_allclose(got, want, atol=2e-5 * scale, rtol=0)
  # A fresh process finds the cache from the environment alone.
  import subprocess
  import sys
  env = dict(os.environ, HF_HUB_OFFLINE='1',
             HF_HUB_CACHE=os.environ['HF_HUB_CACHE'])
  shown = subprocess.run(
      [sys.executable, '-c', 'from big_transfer import zoo; print(zoo.infer_arch('
       f'zoo.load_weights({timm_repo!r}))[0].name)'],
      env=env, capture_output=True, text=True, check=True, cwd=tmp_path,
      timeout=300)
  assert shown.stdout.strip() == 'R26x0.5'
  # ... and every backend's predict command gives timm's logits.
  for name, backend, model in (('pytorch', torch_predict, transformers_repo),
                               ('tf2', tf2_predict, timm_repo),
                               ('jax', jax_predict, timm_repo)):
    out = tmp_path / f'{name}.npy'
    args = predict.predict_argparser(name).parse_args(
        [str(tmp_path / 'img0.png'), str(tmp_path / 'img1.png'),
         '--model', model, '--resolution', '64', '--save_logits', str(out)])
    backend.main(args)
    # timm standardises with eps 1e-8, BiT with 1e-10: float32 rounding and
    # that difference only.
    np.testing.assert_allclose(np.load(out), want, atol=2e-5 * scale, rtol=0,
                               err_msg=f'{model} in {name}')


def test_our_model_equals_timm_at_the_same_eps(timm_model):
  """With timm's eps set to BiT's, the logits are equal to float64 rounding
  (computed in float64: in float32 the kernels' own rounding, ours
  standardising with GroupNorm, timm's with batch norm, is larger than the
  eps's effect): the remaining difference to stock timm is the eps alone."""
  from bit_pytorch import models
  state = {k: v.numpy() for k, v in timm_model.state_dict().items()}
  ours = models.create('hub', weights=zoo.from_torch_layout(state)).eval()
  same_eps = timm_bit((2, 2, 2, 2), 0.5, 7, eps=1e-10)
  same_eps.load_state_dict(timm_model.state_dict())
  x = torch.from_numpy(np.random.default_rng(1).uniform(
      -1, 1, (3, 3, 64, 64)))
  with torch.no_grad():
    a, b, stock = (m.double()(x) for m in (
        ours, same_eps, copy.deepcopy(timm_model)))
  scale = stock.abs().max()
  assert (a - b).abs().max() < 1e-12 * scale
  eps_effect = (a - stock).abs().max()
  assert 1e-10 * scale < eps_effect < 1e-7 * scale


def test_a_hub_that_does_not_answer_is_not_waited_for(hub_repos, monkeypatch,
                                                      caplog):
  """Online, but the Hub's address refuses connections (a bound socket
  that does not listen): the cache serves what it holds, and a file it
  lacks is reported at once, where huggingface_hub retried for 25 s."""
  import huggingface_hub
  closed = socket.socket()
  closed.bind(('127.0.0.1', 0))
  endpoint = f'http://127.0.0.1:{closed.getsockname()[1]}'
  monkeypatch.delenv('HF_HUB_OFFLINE')
  monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', False)
  monkeypatch.setattr(huggingface_hub.constants, 'ENDPOINT', endpoint)
  monkeypatch.setattr(huggingface_hub.constants,
                      'HUGGINGFACE_CO_URL_TEMPLATE',
                      endpoint + '/{repo_id}/resolve/{revision}/{filename}')
  start = time.monotonic()
  for repo in hub_repos:
    assert zoo.load_weights(repo).keys() == synthetic_weights(
        'R26x0.5', head_size=7).keys()
  with pytest.raises(errors.BadInput, match=(
      'timm/absent: the Hugging Face Hub is unreachable .*Connection refused'
      '.* neither model.safetensors nor pytorch_model.bin')):
    zoo.fetch('.', 'hf-hub:timm/absent')
  assert time.monotonic() - start < zoo.PROBE_TIMEOUT_S
  assert 'requesting HEAD' not in caplog.text  # no request beyond the probe
  closed.close()


def test_a_command_asks_the_hub_once_per_repository(hub_repos, monkeypatch):
  """Online, a command fetches the weights before it reads the data and
  loads them after: one probe of the Hub and one request for the weight
  file, not two. (No network here: the Hub 'answers' the probe, and the
  files come from the cache the fixture filled.)"""
  import huggingface_hub
  monkeypatch.delenv('HF_HUB_OFFLINE')
  monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', False)
  probes, asked = [], []
  monkeypatch.setattr(zoo, '_hub_silence', lambda: probes.append(1))
  download = huggingface_hub.hf_hub_download

  def from_the_cache(repo_id, filename, **kw):
    asked.append((repo_id, filename))
    return download(repo_id, filename, **{**kw, 'local_files_only': True})
  monkeypatch.setattr(huggingface_hub, 'hf_hub_download', from_the_cache)
  for repo in hub_repos:
    zoo.fetch('.', repo)
    zoo.load_weights(repo)
  weight_files = [a for a in asked if a[1] in zoo.HF_HUB_FILES]
  assert weight_files == [('timm/resnetv2_26x05_bit.test', 'model.safetensors'),
                          ('google/bit-26-test', 'model.safetensors'),
                          ('google/bit-26-test', 'pytorch_model.bin')]
  assert len(probes) == 2


def test_hub_refusals(tmp_path, offline_hub, timm_model):
  from safetensors.numpy import save_file
  state = {k: v.numpy().copy() for k, v in timm_model.state_dict().items()}
  with pytest.raises(errors.BadInput, match='HF_HUB_OFFLINE'):
    zoo.load_weights('hf-hub:timm/not-in-the-cache')
  with pytest.raises(errors.BadInput, match='ORG/NAME'):
    zoo.load_weights('hf-hub:just-a-name')
  # Commands fetch the weights before they read data: a Hub repository
  # into the cache; a local file is not read (this one is empty).
  (tmp_path / 'x.h5').touch()
  with pytest.raises(errors.BadInput, match='HF_HUB_OFFLINE'):
    zoo.fetch(str(tmp_path), str(tmp_path / 'x.h5'),
              'hf-hub:timm/not-in-the-cache')
  # What --model takes, checked up front without the network.
  for ok in ('hf-hub:timm/x@main', 'BiT-M-R50x1', str(tmp_path / 'x.h5')):
    assert zoo.check_model(ok) == ok
  for bad, message in (('hf-hub:a/b/c', 'ORG/NAME'), ('BiT-Q', 'unknown'),
                       (str(tmp_path), 'without model.npz'),
                       (str(tmp_path / 'missing.npz'), 'does not exist')):
    with pytest.raises(errors.BadInput, match=message):
      zoo.check_model(bad)
  # NaN: refused, naming the key.
  bad = dict(state)
  bad['stages.1.blocks.0.conv2.weight'] = bad[
      'stages.1.blocks.0.conv2.weight'].copy()
  bad['stages.1.blocks.0.conv2.weight'][0, 0, 0, 0] = np.nan
  put_in_hub_cache(offline_hub, 'x/nan', {'model.safetensors': file_bytes(
      tmp_path, 'nan.safetensors', lambda p: save_file(bad, p))})
  with pytest.raises(errors.BadInput,
                     match='block2/unit01/b/standardized_conv2d/kernel.*NaN'):
    zoo.load_weights('hf-hub:x/nan')
  # A batch-norm ResNet-v2 (timm's resnetv2_50): its first unknown key named.
  bn = dict(state, **{'norm.running_mean': np.zeros(1024, np.float32)})
  put_in_hub_cache(offline_hub, 'x/bn', {'model.safetensors': file_bytes(
      tmp_path, 'bn.safetensors', lambda p: save_file(bn, p))})
  with pytest.raises(errors.BadInput, match='norm.running_mean'):
    zoo.load_weights('hf-hub:x/bn')
  # A missing parameter: named, as for every other file.
  short = {k: v for k, v in state.items()
           if k != 'stages.0.blocks.1.norm3.bias'}
  put_in_hub_cache(offline_hub, 'x/short', {'model.safetensors': file_bytes(
      tmp_path, 'short.safetensors', lambda p: save_file(short, p))})
  with pytest.raises(errors.BadInput, match='block1/unit02/c/group_norm'):
    zoo.load_weights('hf-hub:x/short')
  # transformers with TF 'SAME' padding: another network than BiT's.
  tr = {k: v.numpy() for k, v in to_transformers(
      timm_model.state_dict()).items()}
  put_in_hub_cache(offline_hub, 'x/same', {
      'model.safetensors': file_bytes(
          tmp_path, 'same.safetensors', lambda p: save_file(tr, p)),
      'config.json': json.dumps({'global_padding': 'same'}).encode()})
  with pytest.raises(errors.BadInput, match='global_padding'):
    zoo.load_weights('hf-hub:x/same')
  # And a published-layout .npz holding an infinity (issue 10).
  w = synthetic_weights('R14x0.5', 3)
  w['resnet/group_norm/beta'][1] = np.inf
  np.savez(tmp_path / 'inf.npz', **w)
  with pytest.raises(errors.BadInput, match='resnet/group_norm/beta'):
    zoo.load_weights(str(tmp_path / 'inf.npz'))


def npz(tmp_path, arch, head, name):
  path = tmp_path / name
  np.savez(path, **synthetic_weights(arch, head))
  return str(path)


def test_timm_export_reloaded_by_timm(tmp_path, monkeypatch):
  timm = pytest.importorskip('timm')
  from safetensors.torch import load_file
  from bit_pytorch import export, models
  src = npz(tmp_path, 'R26x0.5', 5, 'r26.npz')
  out = str(tmp_path / 'r26-timm')
  export.main(export.argparser().parse_args(
      ['--model', src, '--format', 'timm', '--out', out,
       '--resolution', '64']))
  reloaded = timm_bit((2, 2, 2, 2), 0.5, 5)
  reloaded.load_state_dict(load_file(os.path.join(out, 'model.safetensors')),
                           strict=True)
  ours = models.create('w', weights=zoo.load_npz(src)).eval()
  x = torch.from_numpy(np.random.default_rng(2).uniform(
      -1, 1, (2, 3, 64, 64)).astype(np.float32))
  with torch.no_grad():
    want, got = ours(x), reloaded(x)
  assert (got - want).abs().max() <= 1e-4 * want.abs().max()
  # A failing check keeps nothing: here timm is made to disagree.
  def wrong_timm(*args):
    net = good_timm(*args)
    with torch.no_grad():
      net.head.fc.bias.add_(1.)
    return net
  good_timm = export.timm_model
  monkeypatch.setattr(export, 'timm_model', wrong_timm)
  with pytest.raises(errors.RunFailed, match='not kept'):
    export.main(export.argparser().parse_args(
        ['--model', src, '--format', 'timm', '--out', str(tmp_path / 'bad'),
         '--resolution', '32']))
  assert not os.path.exists(tmp_path / 'bad')
  assert sorted(os.listdir(tmp_path)) == ['r26-timm', 'r26.npz']
  monkeypatch.undo()
  # An architecture timm names: timm.create_model reads the folder itself.
  src = npz(tmp_path, 'R50x1', 4, 'BiT-test-R50x1.npz')
  export.main(export.argparser().parse_args(
      ['--model', src, '--format', 'timm', '--resolution', '32',
       '--out', str(tmp_path / 'r50')]))
  net = timm.create_model(f'local-dir:{tmp_path / "r50"}', pretrained=True)
  assert type(net).__name__ == 'ResNetV2' and net.num_classes == 4
  # (the export compared its logits already; here: timm holds the weights)
  w = zoo.load_npz(src)
  state = net.state_dict()
  np.testing.assert_array_equal(
      state['stages.3.blocks.2.conv2.weight'].numpy(),
      w['resnet/block4/unit03/b/standardized_conv2d/kernel'].transpose(
          3, 2, 0, 1))
  np.testing.assert_array_equal(state['head.fc.bias'].numpy(),
                                w['resnet/head/conv2d/bias'])


def test_onnx_export_has_dynamic_batch_and_size(tmp_path):
  import onnx
  import onnxruntime
  from bit_pytorch import export, models
  src = npz(tmp_path, 'R14x0.5', 6, 'r14.npz')
  out = str(tmp_path / 'r14.onnx')
  export.main(export.argparser().parse_args(
      ['--model', src, '--format', 'onnx', '--out', out,
       '--resolution', '64']))
  graph_input = onnx.load(out).graph.input[0]
  assert graph_input.name == 'images'
  dims = graph_input.type.tensor_type.shape.dim
  assert [bool(d.dim_param) for d in dims] == [True, False, True, True]
  assert dims[1].dim_value == 3  # batch, height and width are symbolic
  session = onnxruntime.InferenceSession(out,
                                         providers=['CPUExecutionProvider'])
  ours = models.create('w', weights=zoo.load_npz(src)).eval()
  for shape in ((2, 3, 64, 64), (5, 3, 40, 72)):
    x = np.random.default_rng(shape[0]).uniform(-1, 1, shape).astype(
        np.float32)
    got = session.run(None, {'images': x})[0]
    with torch.no_grad():
      want = ours(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize('backend,fmt,name', [
    ('pytorch', 'onnx', 'm.onnx'), ('pytorch', 'timm', 'm'),
    ('tf2', 'tflite', 'm.tflite'), ('tf2', 'saved_model', 'm')])
def test_an_unwritable_out_is_refused_before_the_export(tmp_path, backend,
                                                        fmt, name):
  import importlib
  export = importlib.import_module(f'bit_{backend}.export')
  src = npz(tmp_path, 'R14x0.5', 6, 'r14.npz')
  (tmp_path / 'a_file').write_text('not a folder')
  with pytest.raises(errors.BadInput, match='cannot write to .*a_file.*--out'):
    export.main(export.argparser().parse_args(
        ['--model', src, '--format', fmt, '--out',
         str(tmp_path / 'a_file' / name)]))


@pytest.mark.parametrize('backend,fmt,name,words', [
    ('pytorch', 'onnx', 'm.pt', r'm\.pt: give a \.onnx file name'),
    ('pytorch', 'timm', 'a_file', 'a_file is a file; a timm export is a'),
    ('tf2', 'tflite', 'm.onnx', r'm\.onnx: give a \.tflite file name'),
    ('tf2', 'saved_model', 'a_file', 'a_file is a file; a SavedModel is a')])
def test_an_out_of_the_wrong_kind_is_refused_and_left_alone(
    tmp_path, backend, fmt, name, words):
  import importlib
  export = importlib.import_module(f'bit_{backend}.export')
  src = npz(tmp_path, 'R14x0.5', 6, 'r14.npz')
  (tmp_path / 'a_file').write_text('not a folder')
  with pytest.raises(errors.BadInput, match=words):
    export.main(export.argparser().parse_args(
        ['--model', src, '--format', fmt, '--out', str(tmp_path / name)]))
  assert (tmp_path / 'a_file').read_text() == 'not a folder'
  assert sorted(p.name for p in tmp_path.iterdir()) == ['a_file', 'r14.npz']


def tflite_logits(path, x):
  """The logits of the .tflite file at `path` for the images `x`."""
  from bit_tf2 import export  # pylint: disable=import-outside-toplevel
  with open(path, 'rb') as f:
    return export.tflite_logits(export.tflite_interpreter(f.read()), x)


def test_tf2_exports_match_the_source(tmp_path):
  import tensorflow as tf
  from bit_tf2 import export, models
  src = npz(tmp_path, 'R14x0.5', 6, 'r14.npz')
  model = models.create('w', weights=zoo.load_npz(src))
  x = np.random.default_rng(3).uniform(-1, 1, (2, 48, 48, 3)).astype(
      np.float32)
  want = model(x).numpy()
  tflite = str(tmp_path / 'r14.tflite')
  export.main(export.argparser().parse_args(
      ['--model', src, '--format', 'tflite', '--out', tflite,
       '--resolution', '64']))
  got = tflite_logits(tflite, x)
  np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max())
  saved = str(tmp_path / 'r14-saved')
  export.main(export.argparser().parse_args(
      ['--model', src, '--format', 'saved_model', '--out', saved,
       '--resolution', '64']))
  loaded = tf.saved_model.load(saved)
  np.testing.assert_allclose(loaded.serve(x).numpy(), want,
                             atol=1e-5 * np.abs(want).max())


ROWS = [
    {'step': 1, 'split': 'train', 'loss': 2.31, 'lr': 0.0001,
     'images_per_sec': 12.5},
    {'step': 2, 'split': 'train', 'loss': 2.2, 'lr': 0.0002,
     'images_per_sec': 13.0},
    {'step': 2, 'split': 'val', 'loss': 2.25, 'top1': 0.25, 'top5': 0.75,
     'n': 12},
    {'step': 3, 'split': 'train', 'loss': 1.9, 'lr': 0.0003,
     'images_per_sec': 13.5},
    {'step': 4, 'split': 'train', 'loss': 1.7, 'lr': 0.0002,
     'images_per_sec': 14.0},
    {'step': 4, 'split': 'val', 'loss': 1.8, 'top1': 0.5, 'top5': 1.0,
     'n': 12},
]


def write_run(run_dir, rows):
  os.makedirs(run_dir, exist_ok=True)
  with open(os.path.join(run_dir, 'metrics.jsonl'), 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in rows)


def read_events(run_dir):
  """{(split, name): [(step, value)]} as TensorBoard itself reads them."""
  from tensorboard.backend.event_processing.event_accumulator import \
      EventAccumulator
  acc = EventAccumulator(run_dir)
  acc.Reload()
  return {tuple(tag.split('/')): [(e.step, e.value) for e in acc.Scalars(tag)]
          for tag in acc.Tags()['scalars']}


def scalars_of(rows):
  out = {}
  for r in rows:
    for k, v in r.items():
      if k not in ('step', 'split'):
        out.setdefault((r['split'], k), []).append(
            (r['step'], float(np.float32(v))))
  return out


def test_tensorboard_events_equal_metrics(tmp_path):
  run = str(tmp_path / 'run')
  write_run(run, ROWS)
  with events.TensorBoard(run) as tb:
    for row in events.read_metrics(run):
      tb.scalars(row['step'], row['split'],
                 {k: v for k, v in row.items() if k not in ('step', 'split')})
  assert read_events(run) == scalars_of(ROWS)
  # A run resumed from step 2, in the same process and second, rewrites
  # steps 3 and 4 (as metrics.jsonl drops their lines); TensorBoard shows
  # the new values only, and the first file is kept whole.
  first = sorted(os.listdir(run))
  with events.TensorBoard(run, resume_step=2) as tb:
    tb.scalars(3, 'train', {'loss': 1.5, 'lr': 0.0003})
  resumed = ROWS[:3] + [{'step': 3, 'split': 'train', 'loss': 1.5,
                         'lr': 0.0003}]
  shown = read_events(run)
  want = scalars_of(resumed)
  assert {k: v for k, v in shown.items() if v} == want
  assert set(first) < set(os.listdir(run))
  # The command for older runs writes the same from metrics.jsonl alone.
  old = str(tmp_path / 'old')
  write_run(old, ROWS)
  events.main([old])
  assert read_events(old) == scalars_of(ROWS)
  with pytest.raises(errors.BadInput, match='has no metrics.jsonl'):
    events.main([old, str(tmp_path)])


def test_plot_two_runs(tmp_path):
  write_run(str(tmp_path / 'a'), ROWS)
  write_run(str(tmp_path / 'b'), [dict(r, loss=r['loss'] / 2) for r in ROWS])
  out = str(tmp_path / 'runs.png')
  plot.main([str(tmp_path / 'a'), str(tmp_path / 'b'), '--out', out])
  with Image.open(out) as im:
    assert im.format == 'PNG' and im.width > 2 * im.height
    pixels = np.asarray(im.convert('RGB'))
  # Both runs' colours (matplotlib's C0 blue, C1 orange) are drawn.
  for colour in ((31, 119, 180), (255, 127, 14)):
    assert (np.abs(pixels.astype(int) - colour).sum(-1) < 30).sum() > 50
  with pytest.raises(errors.BadInput, match='metrics.jsonl'):
    plot.main([str(tmp_path / 'nothing'), '--out', out])
  (tmp_path / 'a_file').write_text('')
  with pytest.raises(errors.BadInput, match='cannot write.*give another --out'):
    plot.main([str(tmp_path / 'a'), '--out',
               str(tmp_path / 'a_file' / 'runs.png')])
