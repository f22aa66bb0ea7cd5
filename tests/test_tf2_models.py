"""bit_tf2.models: published names, .npz and Keras-2 .h5 loading, strictness,
export, and logits equal to the PyTorch model's on the same weights."""
import json
import os
import re
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from big_transfer import errors, flags, predict, zoo
from bit_pytorch import models as torch_models
from bit_tf2 import models
from conftest import (REPO, group_norm_and_gradients, group_norm_inputs,
                      synthetic_weights, tied_max_pool_case)


def write_keras2_h5(path, weights, numbered=True):
  """`weights` as the original TF2 code's Keras-2 `save_weights` wrote them:
  one group per top-level layer of the model named `resnet` (`root_block`,
  `block1`..`block4`, `group_norm`, `head/dense`), each dataset at its full
  variable name with ':0', and the head a Dense layer with a 2-D kernel.
  With `numbered`, unit convolutions are named `standardized_conv2d_N`, as
  in some published files."""
  groups = {}
  count = 0
  for key, value in weights.items():
    layer = key.split('/')[1]
    name = key
    if layer == 'head':
      layer, name = 'head/dense', key.replace('/conv2d/', '/dense/')
      value = value[0, 0] if value.ndim == 4 else value
    elif numbered and layer.startswith('block') and 'conv2d' in key:
      count += 1
      name = key.replace('standardized_conv2d', f'standardized_conv2d_{count}')
    groups.setdefault(layer, []).append((name + ':0', value))
  with h5py.File(path, 'w') as f:
    f.attrs['backend'] = b'tensorflow'
    f.attrs['keras_version'] = b'2.4.0'
    f.attrs['layer_names'] = [g.encode() for g in groups]
    for layer, variables in groups.items():
      group = f.create_group(layer)
      group.attrs['weight_names'] = [n.encode() for n, _ in variables]
      for name, value in variables:
        group.create_dataset(name, data=value)
  return str(path)


def tf2_logits(weights, images):
  return np.asarray(models.create('weights', weights=weights)(images))


def test_variable_paths_are_the_published_names():
  arch = zoo.parse_arch('R26x0.5')
  net = models.create('R26x0.5', head_size=7)
  shapes = {v.path: tuple(v.shape) for v in net.weights}
  assert shapes == zoo.expected_shapes(arch, 7)


def test_h5_in_keras2_layout_and_npz_load_the_same(tmp_path, make_npz):
  npz = make_npz('R14x0.5', 10)
  h5 = write_keras2_h5(tmp_path / 'w.h5', zoo.load_npz(npz))
  from_npz, from_h5 = zoo.load_weights(npz), zoo.load_weights(h5)
  assert sorted(from_h5) == sorted(from_npz)
  for key in from_npz:
    np.testing.assert_array_equal(from_h5[key], from_npz[key], err_msg=key)
  a = models.create('weights', weights=from_npz).export_weights()
  b = models.create('weights', weights=from_h5).export_weights()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize('head_size', [1000, 21843])
def test_bit_s_and_bit_m_shaped_h5_files_load(tmp_path, head_size):
  weights = synthetic_weights('R14x0.5', head_size)
  h5 = write_keras2_h5(tmp_path / f'{head_size}.h5', weights, numbered=False)
  net = models.create('weights', weights=zoo.load_weights(h5))
  assert net.head_size == head_size
  np.testing.assert_array_equal(
      net.export_weights()['resnet/head/conv2d/bias'],
      weights['resnet/head/conv2d/bias'])


@pytest.mark.parametrize('arch,size', [('R14x0.5', 64), ('R26x0.5', 48)])
def test_logits_equal_pytorch(arch, size):
  weights = synthetic_weights(arch, 10, seed=1)
  images = np.random.default_rng(0).uniform(
      -1, 1, (3, size, size, 3)).astype(np.float32)
  with torch.no_grad():
    expected = torch_models.create('weights', weights=weights)(
        torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
  got = tf2_logits(weights, images)
  scale = np.abs(expected).max()
  assert scale > 0.1  # the comparison is not between near-zero outputs
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4 * scale)


def test_wrong_shape_and_missing_key_are_named(tmp_path):
  weights = synthetic_weights('R14x0.5', 10)
  bad = dict(weights)
  bad['resnet/head/conv2d/kernel'] = bad['resnet/head/conv2d/kernel'][:, :, :5]
  h5 = write_keras2_h5(tmp_path / 'bad.h5', bad)
  with pytest.raises(errors.BadInput, match='head/conv2d/kernel.*shape'):
    models.create('R14x0.5', head_size=10, weights=zoo.load_weights(h5))
  missing = dict(weights)
  del missing['resnet/block2/unit01/b/group_norm/beta']
  with pytest.raises(errors.BadInput,
                     match='no resnet/block2/unit01/b/group_norm/beta'):
    models.create('R14x0.5', weights=missing)


def test_h5_with_foreign_datasets_is_refused(tmp_path):
  path = tmp_path / 'other.h5'
  with h5py.File(path, 'w') as f:
    f.create_dataset('dense_1/dense_1/kernel:0', data=np.zeros((2, 2)))
  with pytest.raises(errors.BadInput, match='dense_1/kernel.*no BiT'):
    zoo.load_h5(str(path))


def test_zero_head_fine_tuning_keeps_the_body(make_npz):
  weights = zoo.load_npz(make_npz('R14x0.5', 1000))
  net = models.create('R14x0.5', head_size=5, zero_head=True, weights=weights)
  out = net.export_weights()
  assert out['resnet/head/conv2d/kernel'].shape == (1, 1, 1024, 5)
  assert not out['resnet/head/conv2d/kernel'].any()
  np.testing.assert_array_equal(out['resnet/group_norm/gamma'],
                                weights['resnet/group_norm/gamma'])


def test_export_npz_round_trip_and_saved_model(tmp_path, make_npz):
  import tensorflow as tf
  weights = zoo.load_npz(make_npz('R14x0.5', 10))
  net = models.create('weights', weights=weights)
  exported = zoo.load_npz(net.save_npz(str(tmp_path / 'out.npz')))
  assert sorted(exported) == sorted(weights)
  for key in weights:
    np.testing.assert_array_equal(exported[key], weights[key], err_msg=key)
  images = np.random.default_rng(0).uniform(
      -1, 1, (2, 40, 40, 3)).astype(np.float32)
  served = tf.saved_model.load(net.export_saved_model(str(tmp_path / 'sm')))
  np.testing.assert_allclose(served.serve(images).numpy(), net(images),
                             rtol=0, atol=1e-4)


def test_bf16_policy_keeps_float32_variables_and_is_close():
  weights = synthetic_weights('R14x0.5', 10, seed=2)
  images = np.random.default_rng(1).uniform(
      -1, 1, (2, 32, 32, 3)).astype(np.float32)
  net = models.create('weights', weights=weights, dtype='mixed_bfloat16')
  assert all(v.dtype == 'float32' for v in net.weights)
  out = np.asarray(net(images))
  assert out.dtype == np.float32
  reference = tf2_logits(weights, images)
  assert np.abs(out - reference).max() < 0.05 * np.abs(reference).max()


def run_predict(*args, cwd):
  import os
  import subprocess
  import sys
  return subprocess.run([sys.executable, '-m', 'bit_tf2.predict', *args],
                        cwd=cwd, env=dict(os.environ),
                        capture_output=True, text=True, check=False,
                        timeout=300)


def test_predict_reads_h5_and_gives_pytorch_logits(tmp_path):
  from conftest import write_imagefolder
  weights = synthetic_weights('R14x0.5', 3)
  h5 = write_keras2_h5(tmp_path / 'w.h5', weights)
  folder = write_imagefolder(tmp_path / 'f', classes=('x', 'y'), train=2,
                             val=0)
  (tmp_path / 'labels.txt').write_text('zero\none\ntwo\n')
  out = run_predict(folder, '--model', h5, '--labels', 'labels.txt',
                    '--top_k', '2', '--resolution', '32',
                    '--save_logits', 'logits.npy', cwd=tmp_path)
  assert out.returncode == 0, out.stderr[-2000:]
  lines = out.stdout.strip().splitlines()
  files = predict.list_images([folder])
  assert [l.split(': ')[0] for l in lines] == files
  batch = predict.to_model_input(np.stack(
      [predict.load_image(f, 32) for f in files]))
  with torch.no_grad():
    expected = torch_models.create('w', weights=weights)(
        torch.from_numpy(batch).permute(0, 3, 1, 2)).numpy()
  np.testing.assert_allclose(np.load(tmp_path / 'logits.npy'), expected,
                             rtol=0, atol=1e-4 * np.abs(expected).max())
  top = ['zero', 'one', 'two'][int(np.argmax(expected[0]))]
  assert lines[0].split(': ')[1].startswith(top + ' (')


def test_predict_refuses_a_truncated_h5(tmp_path):
  from conftest import write_imagefolder
  h5 = write_keras2_h5(tmp_path / 'w.h5', synthetic_weights('R14x0.5', 3))
  data = open(h5, 'rb').read()
  open(h5, 'wb').write(data[:len(data) // 3])
  folder = write_imagefolder(tmp_path / 'f', classes=('x', 'y'), train=1,
                             val=0)
  out = run_predict(folder, '--model', h5, cwd=tmp_path)
  assert out.returncode == 2, out.stderr[-2000:]
  # TensorFlow's C++ start-up lines may precede it; the error is one line.
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and 'not a readable .h5' in last
  assert 'Traceback' not in out.stderr


def test_the_original_known_models_and_num_units_tables():
  """As the original's code calls them: KNOWN_MODELS[name](...) is a Keras
  model for the name, NUM_UNITS[name] its units per block."""
  from big_transfer import zoo
  assert models.NUM_UNITS['BiT-M-R50x1'] == (3, 4, 6, 3)
  assert models.NUM_UNITS['BiT-S-R152x4'] == (3, 8, 36, 3)
  assert set(models.KNOWN_MODELS) == set(zoo.MODELS)
  name = 'BiT-R14x0.5-FashionMNIST'
  model = models.KNOWN_MODELS[name]()
  model.load_from(zoo.load_weights(name))
  reference = torch_models.create(name, weights=zoo.load_weights(name))
  images = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3))
  with torch.no_grad():
    expected = reference.eval()(torch.from_numpy(
        images.transpose(0, 3, 1, 2)).float()).numpy()
  np.testing.assert_allclose(model(images.astype(np.float32)).numpy(),
                             expected, atol=2e-4)


@pytest.mark.parametrize('backend', ['pytorch', 'jax'])
def test_the_published_h5_loads_in_every_backend(tmp_path, backend, capsys):
  """The Keras-2 .h5 files are read by big_transfer.zoo, so PyTorch's and
  JAX's predict take them as TF2's does, with the logits of the same
  weights from a .npz."""
  import importlib
  from conftest import write_imagefolder
  weights = synthetic_weights('R14x0.5', 3)
  h5 = write_keras2_h5(tmp_path / 'w.h5', weights)
  npz = tmp_path / 'w.npz'
  np.savez(npz, **weights)
  folder = write_imagefolder(tmp_path / 'f', classes=('x', 'y'), train=2,
                             val=0)
  command = importlib.import_module(f'bit_{backend}.predict')
  logits = {}
  for name, model in (('h5', h5), ('npz', str(npz))):
    out = str(tmp_path / f'{name}.npy')
    command.main(predict.predict_argparser(backend).parse_args(
        [folder, '--model', model, '--resolution', '32', '--save_logits',
         out]))
    logits[name] = np.load(out)
  capsys.readouterr()
  np.testing.assert_array_equal(logits['h5'], logits['npz'])
  assert logits['h5'].shape == (4, 3)


def test_the_largest_seed_flags_take_is_the_largest_keras_takes():
  import keras
  keras.utils.set_random_seed(flags.SEED_MAX)
  with pytest.raises(ValueError):
    keras.utils.set_random_seed(flags.SEED_MAX + 1)


def test_a_tf_config_that_cannot_work_is_one_line(monkeypatch):
  from bit_tf2 import engine  # pylint: disable=import-outside-toplevel
  for config, words in (('{bad', "not of TensorFlow's form"),
                        ('[]', "not of TensorFlow's form"),
                        ('{"cluster": {"worker": "h:1"}, "task": {}}',
                         "not of TensorFlow's form"),
                        ('{"cluster": {"worker": ["h:1"]}, "task": {"type": '
                         '"worker", "index": 3}}', 'worker 3, is not one of '
                         "its cluster's (1 worker)"),
                        ('{"cluster": {"worker": ["h:1"]}, "task": {"type": '
                         '"chief", "index": 0}}', 'chief 0')):
    monkeypatch.setenv('TF_CONFIG', config)
    with pytest.raises(errors.BadInput, match=re.escape(words)):
      engine.make_strategy()
  two = {'cluster': {'chief': ['h:1'], 'worker': ['h:2']},
         'task': {'type': 'worker', 'index': 0}}
  monkeypatch.setenv('TF_CONFIG', json.dumps(two))
  assert engine.tf_config() == two
  monkeypatch.delenv('TF_CONFIG')
  assert engine.tf_config() == {}


def test_compile_flag_decides_xla_and_is_refused_on_several_cpu_devices():
  from types import SimpleNamespace  # pylint: disable=import-outside-toplevel
  from bit_tf2 import engine  # pylint: disable=import-outside-toplevel
  one, two = (SimpleNamespace(extended=SimpleNamespace(worker_devices=d))
              for d in (['cpu:0'], ['cpu:0', 'cpu:1']))
  # By default on the CPU TF's own kernels train and evaluate, on one
  # device or several; --compile asks for XLA, on one.
  assert engine.uses_xla(one) is False and engine.uses_xla(two) is False
  assert engine.uses_xla(one, True) is True
  assert engine.uses_xla(two, False) is False
  with pytest.raises(errors.BadInput, match='several CPU devices'):
    engine.uses_xla(two, True)


@pytest.mark.parametrize('size', [7, 8, 17])
def test_stem_max_pool_equals_keras_max_pooling(size):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from keras import layers  # pylint: disable=import-outside-toplevel
  x = np.random.default_rng(size).normal(size=(2, size, size + 1, 3))
  x = x.astype(np.float32)
  want = layers.MaxPooling2D(3, 2, padding='valid')(x)
  np.testing.assert_array_equal(models.max_pool_3x3_s2(x), want)
  # Also with the spatial size unknown until run time (a SavedModel's).
  dynamic = tf.function(models.max_pool_3x3_s2, input_signature=[
      tf.TensorSpec([None, None, None, 3], tf.float32)])
  np.testing.assert_array_equal(dynamic(x), want)


XLA_STEPS = """
import json, sys
import numpy as np
import torch  # noqa: F401 (before TensorFlow)
import tensorflow as tf
from bit_tf2 import engine, models, train
engine.deterministic()
weights = dict(np.load(sys.argv[1]))
rng = np.random.default_rng(0)
batch = {'image': rng.integers(0, 256, (8, 32, 32, 3), np.uint8),
         'label': np.eye(10, dtype=np.float32)[rng.integers(0, 10, 8)]}
losses = {}
for xla in (False, True):
  strategy = tf.distribute.OneDeviceStrategy('/cpu:0')
  with strategy.scope():
    net = models.create('w', head_size=10, zero_head=True, weights=weights)
    opt, lr = train.make_optimizer('fp32')
    opt.build(net.trainable_variables)
  step, _ = train.make_steps(strategy, net, opt, lr, 8, 2, xla)
  print(f'steps with xla={xla}', file=sys.stderr, flush=True)
  losses[xla] = [float(step(batch, tf.constant(0.05))) for _ in range(3)]
print(json.dumps([losses[False], losses[True]]))
"""


def test_xla_training_step_compiles_once_under_op_determinism_and_agrees(
    tmp_path):
  """The step TF2 trains with on GPUs (--compile: XLA; here on the CPU,
  whose GroupNorm has its own gradient) compiles with op determinism on,
  as every TF2 run asks for, once for a run's steps, and gives the losses
  of the uncompiled step. TF logs each XLA compilation at verbosity 1."""
  path = tmp_path / 'w.npz'
  np.savez(path, **synthetic_weights('R14x0.5', 10, seed=3))
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='0',
             TF_CPP_VMODULE='device_compiler=1')
  done = subprocess.run([sys.executable, '-c', XLA_STEPS, str(path)],
                        cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  uncompiled, compiled = json.loads(done.stdout)
  assert uncompiled[-1] < uncompiled[0]
  np.testing.assert_allclose(compiled, uncompiled, rtol=1e-5)
  xla_steps = done.stderr.split('steps with xla=True')[1]
  assert xla_steps.count('Compilation of XLA executable') == 1, xla_steps


@pytest.mark.parametrize('size', [7, 8])
def test_stem_max_pool_gradient_goes_to_the_first_maximum(size):
  """Against a gradient computed by hand: each window's gradient goes to
  its first maximum in row-major order (PyTorch's rule), ties included,
  both through TF's own gradient and through the element-wise one that
  XLA compiles."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  x, dy, want = tied_max_pool_case(size)
  xt = tf.constant(x)
  with tf.GradientTape() as tape:
    tape.watch(xt)
    y = models.max_pool_3x3_s2(xt)
  np.testing.assert_array_equal(tape.gradient(y, xt, dy), want)
  # The same inside an XLA-compiled function.
  @tf.function(jit_compile=True)
  def compiled(xt):
    with tf.GradientTape() as tape:
      tape.watch(xt)
      y = models.max_pool_3x3_s2(xt)
    return tape.gradient(y, xt, dy)
  np.testing.assert_array_equal(compiled(xt), want)


@pytest.mark.parametrize('strides', [1, 2])
def test_bf16_pointwise_conv_is_the_convolution_with_its_gradients(strides):
  """In bf16 on the CPU a 1x1 kernel is a matrix product
  (models.padded_conv); its value and both gradients equal TF's bf16
  convolution's, to bf16's rounding."""
  import tensorflow as tf
  rng = np.random.default_rng(5)
  x = tf.constant(rng.standard_normal((2, 7, 6, 16)), tf.bfloat16)
  w = tf.constant(rng.standard_normal((1, 1, 16, 8)), tf.bfloat16)
  out = (2, -(-7 // strides), -(-6 // strides), 8)
  dy = tf.constant(rng.standard_normal(out), tf.bfloat16)
  results = []
  for conv in (lambda x, w: models.padded_conv(x, w, strides, 0),
               lambda x, w: tf.nn.conv2d(x, w, strides, 'VALID')):
    with tf.GradientTape() as tape:
      tape.watch([x, w])
      y = conv(x, w)
    results.append([y, *tape.gradient(y, [x, w], output_gradients=dy)])
  for got, want in zip(*results):
    assert got.shape == want.shape and got.dtype == tf.bfloat16
    got, want = (np.asarray(tf.cast(t, tf.float32)) for t in (got, want))
    np.testing.assert_allclose(got, want, rtol=0.02,
                               atol=0.02 * np.abs(want).max())


def test_bf16_pointwise_conv_slices_nothing_at_stride_1():
  """The stride-1 matrix product reshapes x and the kernel, and slices
  neither: the gradient of a TF slice is a full copy (about 50 ms of R50x1's
  bf16 training step on the CPU, docs/performance.md)."""
  import tensorflow as tf

  @tf.function
  def gradients(x, w):
    with tf.GradientTape() as tape:
      tape.watch([x, w])
      y = models.padded_conv(x, w, 1, 0)
    return tape.gradient(y, [x, w])
  graph = gradients.get_concrete_function(
      tf.TensorSpec((2, 7, 6, 16), tf.bfloat16),
      tf.TensorSpec((1, 1, 16, 8), tf.bfloat16)).graph
  ops = graph.get_operations()
  assert 'MatMul' in {op.type for op in ops}
  assert not [op.name for op in ops if op.type.startswith('StridedSlice')
              and op.outputs[0].dtype.is_floating]


@pytest.mark.parametrize('shape', [(2, 5, 3, 64), (3, 4, 4, 128)])
def test_cpu_group_norm_relu_and_its_gradients_equal_the_formula(shape):
  """models.group_norm_relu_cpu (sums over the pixels as products with
  ones, its gradient written out, ReLU included), eager and compiled by
  XLA, against GroupNorm and its closed-form gradients in float64
  (conftest.group_norm_and_gradients), then ReLU: the output gradient
  masked where GroupNorm's output is not positive."""
  import tensorflow as tf
  x, dy, gamma, beta = group_norm_inputs(shape)
  normed = group_norm_and_gradients(x, dy, gamma, beta)[0]
  assert (normed > 0).mean() > 0.2 and (normed < 0).mean() > 0.2
  want = [np.maximum(normed, 0), *group_norm_and_gradients(
      x, np.where(normed > 0, dy, 0), gamma, beta)[1:]]

  def value_and_grads(x, gamma, beta):
    with tf.GradientTape() as tape:
      tape.watch([x, gamma, beta])
      y = models.group_norm_relu_cpu(x, gamma, beta)
    return [y, *tape.gradient(y, [x, gamma, beta], output_gradients=dy)]

  for fn in (value_and_grads, tf.function(value_and_grads, jit_compile=True)):
    got = fn(*(tf.constant(a) for a in (x, gamma, beta)))
    for g, w in zip(got, want):
      np.testing.assert_allclose(np.asarray(g), w, rtol=1e-4,
                                 atol=1e-4 * np.abs(w).max())


def test_group_norms_compile_in_steps_once_per_shape_not_at_creation(
    monkeypatch):
  """Creating a model (its first call, eager, makes the variables) compiles
  none of its GroupNormReLU layers: a compilation at that call's shapes
  would be thrown away. In tf.functions, as every step runs the model, the
  CPU's layers call one compiled function, traced once per input shape:
  in R26, whose blocks have two units, layers of one shape share a trace,
  and the compiled calls give the eager call's logits. TF counts traces
  per Python function and used to log a warning that the function was
  "retracing" after five: a model run in inference and in training at two
  sizes logs no such warning."""
  import logging
  import tensorflow as tf
  traced, called = [], []

  def norm(x, gamma, beta):
    traced.append(tuple(x.shape))
    return models.group_norm_relu_cpu(x, gamma, beta)

  monkeypatch.setattr(models, 'group_norm_relu_cpu_xla',
                      models.xla_function(norm))
  shipped = models.GroupNormReLU.call

  def call(self, x):
    if not tf.executing_eagerly():
      called.append(tuple(x.shape))
    return shipped(self, x)

  monkeypatch.setattr(models.GroupNormReLU, 'call', call)
  messages = []
  handler = logging.Handler()
  handler.emit = lambda record: messages.append(record.getMessage())
  tf.get_logger().addHandler(handler)
  try:
    model = models.create('R26x0.5', head_size=3)
    norms = [l for l in model._flatten_layers()  # pylint: disable=protected-access
             if isinstance(l, models.GroupNormReLU)]
    assert len(norms) == 25
    x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(
        np.float32)
    eager = model(x, training=False).numpy()
    assert traced == [] and called == []
    for size in (32, 40):
      x_size = x[:, :size, :size] if size <= 32 else np.pad(
          x, ((0, 0), (0, size - 32), (0, size - 32), (0, 0)))
      for training in (False, True):
        got = tf.function(lambda x, t=training: model(x, training=t))(x_size)
        if size == 32:
          # Unseeded weights: the two differed by up to 1.2e-5 on logits
          # of about 1.4 (a fresh-clone CI), as float32 sums in two orders.
          np.testing.assert_allclose(got, eager, rtol=1e-4,
                                     atol=1e-4 * np.abs(eager).max())
  finally:
    tf.get_logger().removeHandler(handler)
  assert len(called) == 4 * len(norms)
  assert sorted(traced) == sorted(set(called))
  assert len(traced) < 2 * len(norms)  # layers of one shape share a trace
  assert not [m for m in messages if 'retracing' in m], messages
