"""PyTorch ResNet-v2: published-layout load/export, strictness, timm parity,
and the predict CLI."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from big_transfer import errors, predict, zoo
from bit_pytorch import models
from conftest import (synthetic_weights, tied_max_pool_case, truncate_image,
                      write_imagefolder)


def images(n=2, size=64, seed=0):
  g = torch.Generator().manual_seed(seed)
  return torch.rand(n, 3, size, size, generator=g) * 2 - 1


@pytest.mark.parametrize('arch, head', [('R14x0.5', 5), ('R26x1', 7),
                                        ('R50x1', 10)])
def test_load_export_reload_is_exact(tmp_path, arch, head):
  weights = synthetic_weights(arch, head, seed=1)
  model = models.create(arch, head_size=head)
  model.load_from(weights)
  exported = model.export()
  # Exactly the published keys and shapes, and the very same values.
  assert {k: v.shape for k, v in exported.items()} == zoo.expected_shapes(
      zoo.parse_arch(arch), head)
  for k, v in weights.items():
    np.testing.assert_array_equal(exported[k], v, err_msg=k)
  path = model.save_npz(str(tmp_path / 'out.npz'))
  again = models.create('file', weights=zoo.load_npz(path)).eval()
  model.eval()
  x = images()
  with torch.no_grad():
    np.testing.assert_array_equal(model(x).numpy(), again(x).numpy())


def test_matches_timm_bit_loader(tmp_path, make_npz):
  timm = pytest.importorskip('timm')
  path = make_npz('R50x1', head_size=10, seed=2)
  ours = models.create('R50x1', head_size=10)
  ours.load_from(zoo.load_npz(path))
  theirs = timm.create_model('resnetv2_50x1_bit', pretrained=False,
                             num_classes=10)
  theirs.load_pretrained(path)
  x = images(2, 96, seed=3)
  with torch.no_grad():
    a, b = ours.eval()(x), theirs.eval()(x)
  # timm standardises with eps 1e-8, BiT with 1e-10: equal to float rounding.
  np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-3, atol=1e-4)
  assert a.abs().max() > 0.1   # a real comparison, not of zeros


@pytest.mark.parametrize('size', [7, 8])
def test_stem_max_pool_gradient_goes_to_the_first_maximum(size):
  """models.MaxPool2d (channels-last on the CPU): nn.MaxPool2d's output, in
  NCHW, and the gradient computed by hand, ties included."""
  x, dy, want = (torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()
                 for a in tied_max_pool_case(size))
  x.requires_grad_()
  y = models.MaxPool2d(kernel_size=3, stride=2)(x)
  assert y.is_contiguous()
  torch.testing.assert_close(y, torch.nn.MaxPool2d(3, 2)(x), rtol=0, atol=0)
  y.backward(dy)
  torch.testing.assert_close(x.grad, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('arch', zoo.PUBLISHED_ARCHS)
def test_published_architectures_have_the_published_layout(arch):
  info = zoo.MODELS[f'BiT-M-{arch}']
  with torch.device('meta'):
    model = models.KNOWN_MODELS[info.name]()
  shapes = {k: models.th2tf_shape(p) for k, p in model.published_parameters()}
  assert shapes == zoo.expected_shapes(info.architecture, 21843)


def test_known_models_keep_the_original_signature():
  model = models.KNOWN_MODELS['BiT-S-R50x1'](head_size=3, zero_head=True)
  assert model.head.conv.out_channels == 3
  assert model(images(1)).abs().max() == 0


def test_zero_head_loads_the_body_only():
  weights = synthetic_weights('R14x0.5', head_size=1000)
  model = models.create('R14x0.5', head_size=4, zero_head=True)
  model.load_from(weights)   # a 1000-class head is left out, not refused
  np.testing.assert_array_equal(model.root.conv.weight.permute(2, 3, 1, 0).detach(),
                                weights['resnet/root_block/standardized_conv2d/kernel'])
  assert model.head.conv.weight.abs().max() == 0


@pytest.mark.parametrize('mangle, message', [
    (lambda w: w.pop('resnet/block2/unit01/b/group_norm/gamma'),
     'has no resnet/block2/unit01/b/group_norm/gamma'),
    (lambda w: w.update({'resnet/group_norm/beta': np.zeros(3, np.float32)}),
     r'resnet/group_norm/beta has shape \(3,\) but R14x0.5 needs \(1024,\)'),
])
def test_load_from_is_strict(mangle, message):
  weights = synthetic_weights('R14x0.5', head_size=10)
  mangle(weights)
  with pytest.raises(errors.BadInput, match=message):
    models.create('R14x0.5', head_size=10).load_from(weights)


def test_a_deeper_file_is_refused_not_truncated():
  with pytest.raises(errors.BadInput, match='unit02.*another architecture'):
    models.create('R14x0.5', head_size=10).load_from(
        synthetic_weights('R26x0.5', head_size=10))


def test_head_size_mismatch_names_both_shapes():
  with pytest.raises(errors.BadInput, match=r'head/conv2d/kernel has shape '
                     r'\(1, 1, 1024, 10\) but R14x0.5 needs \(1, 1, 1024, 21843\)'):
    models.create('R14x0.5', head_size=21843).load_from(
        synthetic_weights('R14x0.5', head_size=10))


# ---------------------------------------------------------------- predict

def run_predict(*args, cwd):
  env = dict(os.environ)
  return subprocess.run([sys.executable, '-m', 'bit_pytorch.predict', *args],
                        cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=300)


def test_predict_prints_topk_and_saves_logits(tmp_path, make_npz):
  path = make_npz('R14x0.5', head_size=3)
  folder = write_imagefolder(tmp_path / 'f', classes=('x', 'y'), train=2, val=0)
  (tmp_path / 'labels.txt').write_text('zero\none\ntwo\n')
  out = run_predict(folder, '--model', path, '--labels', 'labels.txt',
                    '--top_k', '2', '--resolution', '32',
                    '--save_logits', 'logits.npy', cwd=tmp_path)
  assert out.returncode == 0, out.stderr
  lines = out.stdout.strip().splitlines()
  assert len(lines) == 4 and lines[0].startswith(os.path.join(folder, 'train', 'x', '000.png'))
  logits = np.load(tmp_path / 'logits.npy')
  # The same images through the model directly give the same logits.
  files = predict.list_images([folder])
  batch = predict.to_model_input(np.stack(
      [predict.load_image(f, 32) for f in files]))
  model = models.create('f', weights=zoo.load_npz(path)).eval()
  with torch.no_grad():
    expected = model(torch.from_numpy(batch).permute(0, 3, 1, 2)).numpy()
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)
  top = ['zero', 'one', 'two'][int(np.argmax(expected[0]))]
  assert lines[0].split(': ')[1].startswith(top + ' (')
  # --out: what is printed, as CSV or JSON, from the same logits.
  for out_file in ('top.csv', 'top.json'):
    again = run_predict(folder, '--model', path, '--labels', 'labels.txt',
                        '--top_k', '2', '--resolution', '32', '--out',
                        out_file, cwd=tmp_path)
    assert again.returncode == 0 and again.stdout == out.stdout
  with open(tmp_path / 'top.json') as f:
    rows = json.load(f)
  with open(tmp_path / 'top.csv', newline='') as f:
    table = list(csv.reader(f))
  assert table[0] == ['path', 'class_1', 'probability_1', 'class_2',
                      'probability_2']
  probs = np.exp(expected) / np.exp(expected).sum(1, keepdims=True)
  for i, (row, line, cells) in enumerate(zip(rows, lines, table[1:])):
    order = np.argsort(-expected[i])[:2]
    assert row['path'] == files[i] == cells[0] == line.split(': ')[0]
    assert row['classes'] == [['zero', 'one', 'two'][c] for c in order]
    np.testing.assert_allclose(row['probabilities'], probs[i, order],
                               rtol=1e-5)
    assert cells[1::2] == row['classes']
    assert [float(p) for p in cells[2::2]] == row['probabilities']


def test_predict_leaves_out_bad_images_where_asked(tmp_path, make_npz):
  """--skip_bad_images: a file whose pixels are damaged is left out with a
  warning, the others are classified; without the flag it stops the run
  with its name and the flag, and nothing is written."""
  path = make_npz('R14x0.5', head_size=3)
  folder = write_imagefolder(tmp_path / 'f', classes=('x', 'y'), train=2, val=0)
  damaged = os.path.join(folder, 'train', 'x', '001.png')
  truncate_image(damaged)
  flags = [folder, '--model', path, '--resolution', '32', '--workers', '0',
           '--out', 'top.csv']
  out = run_predict(*flags, '--skip_bad_images', cwd=tmp_path)
  assert out.returncode == 0, out.stderr
  printed = [line.split(': ')[0] for line in out.stdout.splitlines()]
  assert printed == [f for f in predict.list_images([folder]) if f != damaged]
  assert f'leaving out unreadable image {damaged}' in out.stderr
  os.remove(tmp_path / 'top.csv')
  out = run_predict(*flags, cwd=tmp_path)
  assert out.returncode == 2 and out.stdout == ''
  assert out.stderr.startswith(f'error: cannot read image {damaged}')
  assert '--skip_bad_images' in out.stderr
  assert not os.path.exists(tmp_path / 'top.csv')


@pytest.mark.parametrize('setup, message', [
    ('truncated', 'not a readable .npz'),
    ('missing_key', 'has no resnet/block1/unit01/a/group_norm/gamma'),
    ('no_images', 'no images found'),
    ('unwritable_logits', 'give another --save_logits'),
    ('zero_resolution', '--resolution must be a positive number'),
    ('out_format', 'give a .csv or .json file name'),
    ('unfinished_run', 'is a folder without model.npz'),
    ('bad_image', 'or pass --skip_bad_images to leave such files out'),
])
def test_predict_refusals_exit_2(tmp_path, make_npz, setup, message):
  path = make_npz('R14x0.5', head_size=3)
  folder = write_imagefolder(tmp_path / 'f', classes=('x', 'y'), train=1, val=0)
  if setup == 'truncated':
    data = open(path, 'rb').read()
    open(path, 'wb').write(data[:len(data) // 3])
  elif setup == 'missing_key':
    w = synthetic_weights('R14x0.5', head_size=3)
    del w['resnet/block1/unit01/a/group_norm/gamma']
    np.savez(path, **w)
  elif setup == 'no_images':
    folder = str(tmp_path / 'empty')
    os.makedirs(folder)
  elif setup == 'unfinished_run':  # a run folder before its model.npz
    path = str(tmp_path / 'run')
    os.makedirs(path)
  elif setup == 'bad_image':  # named before the model is read
    (tmp_path / 'f' / 'train' / 'x' / 'no.png').write_bytes(b'not an image')
    os.remove(path)
  extra = {'unwritable_logits': ['--save_logits', '/proc/no/logits.npy'],
           'zero_resolution': ['--resolution', '0'],
           'out_format': ['--out', 'top.txt']}.get(setup, [])
  out = run_predict(folder, '--model', path, *extra, cwd=tmp_path)
  assert out.returncode == 2
  assert message in out.stderr and out.stderr.count('\n') == 1
