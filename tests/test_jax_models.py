"""bit_jax.models: same logits as PyTorch, exact published-layout round
trip, strict loading, the compilation cache."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from big_transfer import errors, predict, zoo
from conftest import (REPO, group_norm_and_gradients, group_norm_inputs,
                      synthetic_weights, tied_max_pool_case)

jax = pytest.importorskip('jax')
import jax.numpy as jnp  # noqa: E402
import bit_jax  # noqa: E402
from bit_jax import models  # noqa: E402


@pytest.mark.parametrize('arch', ['R14x0.5', 'R26x1'])
def test_logits_equal_pytorch(arch):
  torch = pytest.importorskip('torch')
  from bit_pytorch import models as torch_models
  weights = synthetic_weights(arch, head_size=7, seed=1)
  images = np.random.default_rng(0).uniform(-1, 1, (2, 48, 48, 3)).astype(
      np.float32)
  net = torch_models.create(arch, weights=weights).eval()
  with torch.no_grad():
    expected = net(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
  model, params = models.create(arch, weights=weights)
  logits = np.asarray(jax.jit(model.apply)({'params': params}, images))
  assert logits.shape == (2, 7)
  np.testing.assert_allclose(logits, expected, rtol=1e-4,
                             atol=1e-4 * np.abs(expected).max())


def test_gradients_equal_pytorch():
  """Every parameter's gradient, including GroupNorm's gamma and beta (a
  custom gradient on CPUs), the standardised kernels (their statistics
  summed as matrix products on CPUs) and the 1x1 ones (matrix products on
  CPUs, the projections' strided), equals PyTorch autograd's."""
  torch = pytest.importorskip('torch')
  from bit_pytorch import models as torch_models
  weights = synthetic_weights('R14x0.5', head_size=5, seed=3)
  rng = np.random.default_rng(1)
  images = rng.uniform(-1, 1, (4, 40, 40, 3)).astype(np.float32)
  labels = np.eye(5, dtype=np.float32)[rng.integers(0, 5, 4)]

  net = torch_models.create('R14x0.5', weights=weights)
  logits = net(torch.from_numpy(images).permute(0, 3, 1, 2))
  torch.sum(-torch.from_numpy(labels) * logits.log_softmax(1)).backward()
  expected = {k: torch_models.th2tf(p.grad)
              for k, p in net.published_parameters()}

  model, params = models.create('R14x0.5', weights=weights)
  grads = models.export(jax.jit(jax.grad(lambda p: jnp.sum(
      -labels * jax.nn.log_softmax(model.apply({'params': p}, images)))))(
          params))
  assert set(grads) == set(expected)
  for k, g in expected.items():
    np.testing.assert_allclose(grads[k], g, rtol=1e-3,
                               atol=1e-4 * np.abs(g).max(), err_msg=k)


def test_pointwise_conv_is_the_convolution_with_its_gradients():
  """models.pointwise_conv's value, alone and differentiated (products
  then), and both its gradients equal XLA's convolution and its autodiff."""
  rng = np.random.default_rng(4)
  x, dy = (jnp.asarray(rng.standard_normal(s), jnp.float32)
           for s in ((2, 5, 6, 8), (2, 5, 6, 3)))
  kernel = jnp.asarray(rng.standard_normal((8, 3)), jnp.float32)

  def conv(x, kernel):
    return jax.lax.conv_general_dilated(
        x, kernel[None, None], (1, 1), 'VALID',
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  expected, back = jax.vjp(conv, x, kernel)
  value, mine = jax.vjp(jax.jit(models.pointwise_conv), x, kernel)
  for got, want in [(models.pointwise_conv(x, kernel), expected),
                    (value, expected), *zip(mine(dy), back(dy))]:
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_3x3_kernel_gradient_copies_the_stored_activation():
  """On CPUs XLA computes a 3x3 kernel's gradient from a transposed copy of
  the activation, channels first. In a part b's compiled gradient that copy
  reads GroupNorm and ReLU's output as stored (models.stored) instead of
  recomputing them; stored changes no number, forwards or backwards."""
  import re
  x = jnp.asarray(np.random.default_rng(5).standard_normal((4, 8, 8, 64)),
                  jnp.float32)
  value, back = jax.vjp(models.stored, x)
  np.testing.assert_array_equal(value, x)
  np.testing.assert_array_equal(back(x + 1)[0], x + 1)

  part = models.PreAct(64, 3)
  params = part.init(jax.random.PRNGKey(0), x)['params']
  program = jax.jit(jax.grad(lambda p: jnp.sum(
      part.apply({'params': p}, x)[0] ** 2))).lower(params).compile().as_text()
  copies = [f for f in re.findall(r'^%.*?^}', program, re.M | re.S)
            if re.search(r'ROOT \S+ = f32\[64,8,8,4\]', f)
            and ' transpose(' in f]
  assert copies
  for fusion in copies:
    assert set(re.findall(r'= \S+ (\w+)\(', fusion)) <= {
        'parameter', 'bitcast', 'copy', 'transpose'}, fusion


@pytest.mark.parametrize('size', [7, 8])
def test_stem_max_pool_gradient_goes_to_the_first_maximum(size):
  """models.max_pool_3x3_s2 (the stem's pool on CPUs): Flax's max pool, and
  a gradient equal to one computed by hand, ties included, alone and
  compiled with the step's jit."""
  import flax.linen as nn
  x, dy, want = tied_max_pool_case(size)
  y, back = jax.vjp(models.max_pool_3x3_s2, jnp.asarray(x))
  np.testing.assert_array_equal(
      y, nn.max_pool(jnp.asarray(x), (3, 3), strides=(2, 2)))
  compiled = jax.jit(lambda x, dy: jax.vjp(models.max_pool_3x3_s2, x)[1](dy))
  for grad, in (back(jnp.asarray(dy)), compiled(x, dy)):
    # Up to four windows add into one pixel, in another order than by hand.
    np.testing.assert_allclose(grad, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('shape', [(2, 5, 3, 64), (3, 4, 4, 128)])
def test_cpu_group_norm_and_its_gradients_equal_the_formula(shape):
  """models.group_norm_cpu (sums over the pixels as products with ones, its
  gradient written out), alone and under jit, and the GroupNorm module on
  this CPU, against GroupNorm and its closed-form gradients in float64
  (conftest.group_norm_and_gradients)."""
  x, dy, gamma, beta = group_norm_inputs(shape)
  want = group_norm_and_gradients(x, dy, gamma, beta)
  module = models.GroupNorm()

  def apply(x, gamma, beta):
    return module.apply({'params': {'gamma': gamma, 'beta': beta}}, x)
  for fn in (models.group_norm_cpu, jax.jit(models.group_norm_cpu), apply):
    y, back = jax.vjp(fn, *(jnp.asarray(a) for a in (x, gamma, beta)))
    for got, w in zip([y, *back(jnp.asarray(dy))], want):
      np.testing.assert_allclose(np.asarray(got), w, rtol=1e-4,
                                 atol=1e-4 * np.abs(w).max())


def test_export_import_round_trip_is_exact(tmp_path):
  weights = synthetic_weights('R26x0.5', head_size=5, seed=2)
  model, params = models.create('R26x0.5', weights=weights)
  exported = models.export(params)
  assert set(exported) == set(weights)
  for k in weights:
    assert exported[k].dtype == np.float32
    np.testing.assert_array_equal(exported[k], weights[k])
  path = models.save_npz(str(tmp_path / 'm.npz'), params)
  again = zoo.load_npz(path)
  assert all(np.array_equal(again[k], weights[k]) for k in weights)


def test_fine_tuning_head_is_zero_and_sized():
  weights = synthetic_weights('R14x0.5', head_size=10)
  model, params = models.create('x', head_size=3, zero_head=True,
                                weights=weights)
  head = models.export(params)
  assert head['resnet/head/conv2d/kernel'].shape == (1, 1, 1024, 3)
  assert not head['resnet/head/conv2d/kernel'].any()
  assert not head['resnet/head/conv2d/bias'].any()
  np.testing.assert_array_equal(
      head['resnet/block4/unit01/c/standardized_conv2d/kernel'],
      weights['resnet/block4/unit01/c/standardized_conv2d/kernel'])
  logits = jax.jit(model.apply)({'params': params}, jnp.zeros((1, 32, 32, 3)))
  assert logits.shape == (1, 3) and not np.asarray(logits).any()


def test_strict_loading_names_the_key():
  weights = synthetic_weights('R14x0.5', head_size=10)
  missing = dict(weights)
  del missing['resnet/block2/unit01/b/group_norm/beta']
  model = models.ResNetV2(zoo.parse_arch('R14x0.5'), 10,
                          zero_head=False)
  with pytest.raises(errors.BadInput,
                     match='block2/unit01/b/group_norm/beta'):
    models.load(model, missing)
  wrong = dict(weights)
  wrong['resnet/group_norm/gamma'] = np.ones(3, np.float32)
  with pytest.raises(errors.BadInput, match=r'group_norm/gamma.*\(3,\)'):
    models.load(model, wrong)
  with pytest.raises(errors.BadInput, match='head'):
    models.create('x', head_size=4, weights=weights)   # file head has 10


def test_bf16_close_to_fp32():
  weights = synthetic_weights('R14x0.5', head_size=4, seed=3)
  images = np.random.default_rng(1).uniform(-1, 1, (2, 32, 32, 3)).astype(
      np.float32)
  m32, p = models.create('x', weights=weights)
  m16, _ = models.create('x', weights=weights, dtype=jnp.bfloat16)
  a = np.asarray(jax.jit(m32.apply)({'params': p}, images))
  b = np.asarray(jax.jit(m16.apply)({'params': p}, images))
  assert b.dtype == np.float32
  np.testing.assert_allclose(b, a, atol=0.1 * np.abs(a).max())


def test_predict_matches_pytorch(tmp_path, make_npz, capsys):
  torch = pytest.importorskip('torch')
  from bit_jax import predict as jax_predict
  from bit_pytorch import models as torch_models
  from conftest import write_imagefolder
  path = make_npz('R14x0.5', head_size=3)
  folder = write_imagefolder(tmp_path / 'f', classes=('x', 'y'), train=2,
                             val=0)
  labels = tmp_path / 'labels.txt'
  labels.write_text('zero\none\ntwo\n')
  args = predict.predict_argparser('JAX').parse_args(
      [folder, '--model', path, '--labels', str(labels), '--top_k', '2',
       '--resolution', '32', '--batch', '3'])
  logits = jax_predict.main(args)
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 4 and all(l.count('%') == 2 for l in lines)
  files = predict.list_images([folder])
  batch = predict.to_model_input(np.stack(
      [predict.load_image(f, 32) for f in files]))
  net = torch_models.create('x', weights=zoo.load_npz(path)).eval()
  with torch.no_grad():
    expected = net(torch.from_numpy(batch).permute(0, 3, 1, 2)).numpy()
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


def test_the_original_known_models_table():
  """As the original's code calls it: KNOWN_MODELS[name](...) is the
  model, its parameters from init_params or loaded from the file."""
  from big_transfer import zoo
  name = 'BiT-R14x0.5-FashionMNIST'
  assert set(models.KNOWN_MODELS) == set(zoo.MODELS)
  model = models.KNOWN_MODELS[name](head_size=10, zero_head=True)
  assert model.num_classes == 10 and model.zero_head
  assert model.architecture == zoo.parse_arch('R14x0.5')
  weights = zoo.load_weights(name)
  params = models.load(model, weights, model.init_params())
  np.testing.assert_array_equal(params['head']['conv2d']['kernel'], 0)
  whole = models.KNOWN_MODELS[name]()  # the file's 40-class head
  loaded = models.load(whole, weights)
  np.testing.assert_array_equal(loaded['head']['conv2d']['bias'],
                                weights['resnet/head/conv2d/bias'])


def test_a_checkpoint_set_aside_twice_keeps_both(tmp_path):
  """A damaged checkpoint whose step was set aside before (a run that
  failed again at the same place) goes beside the earlier one."""
  from bit_jax import engine
  state = {'params': {'w': jnp.ones(3)}}
  ckpt = engine.Checkpoints(tmp_path / 'checkpoints', {'seed': 0}, state)
  ckpt.save(4)
  ckpt.close()
  newest, = ckpt.newest_first()
  earlier = tmp_path / 'checkpoints' / '4.unreadable'
  earlier.mkdir()
  (earlier / 'kept').write_text('the first one set aside')
  ckpt.set_aside(newest)
  assert (earlier / 'kept').exists()
  assert (tmp_path / 'checkpoints' / '4.unreadable-1').is_dir()
  assert ckpt.newest_first() == []


def test_evaluation_waits_for_all_but_the_last_batches():
  """The sums are exact, and when the loop asks for a batch, the device has
  computed every batch but the last EVAL_IN_FLIGHT: the host holds no
  more of them than that, however fast it reads (a slow step here)."""
  import jax.numpy as jnp
  from bit_jax import engine
  parallel = engine.DataParallel()
  w = jnp.eye(256) * 0.5

  @jax.jit
  def eval_step(w, image, label, mask):
    x = image.reshape(len(image), -1).astype(jnp.float32)
    for _ in range(100):
      x = jnp.tanh(x @ w)
    return jnp.stack([label.sum().astype(jnp.float32), x.sum() * 0,
                      mask.sum().astype(jnp.float32), 1.0])

  outputs, lagging = [], []

  def step(*args):
    outputs.append(eval_step(*args))
    return outputs[-1]

  def batches():
    for i in range(12):
      lagging.append(sum(not o.is_ready() for o in
                         outputs[:len(outputs) - engine.EVAL_IN_FLIGHT]))
      yield {'image': np.full((8, 16, 16), i, np.uint8),
             'label': np.full(8, i, np.int64), 'mask': np.ones(8, bool)}

  sums = parallel.evaluate(step, batches(), w)
  np.testing.assert_array_equal(sums, [8 * sum(range(12)), 0, 96, 12])
  assert lagging == [0] * 12


def test_importing_bit_jax_keeps_compiled_steps_for_the_next_process(
    tmp_path):
  """Where the environment names no compilation cache, bit_jax puts JAX's
  in the package's cache folder: a second process reads the step that the
  first compiled (JAX's own cache-hit event) instead of compiling it."""
  script = (
      'import json, bit_jax, jax, jax.numpy as jnp\n'
      'events = []\n'
      'jax.monitoring.register_event_listener(lambda e, **kw: '
      'events.append(e))\n'
      'jax.jit(lambda x: jnp.tanh(x) * 3)(jnp.ones(5)).block_until_ready()\n'
      'print(json.dumps([jax.config.jax_compilation_cache_dir, '
      'jax.config.jax_compilation_cache_max_size, '
      '"/jax/compilation_cache/cache_hits" in events]))\n')
  env = {k: v for k, v in os.environ.items()
         if not k.startswith('JAX_COMPILATION_CACHE')}
  env.update(BIT_CACHE=str(tmp_path), JAX_PLATFORMS='cpu',
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')

  def run(**extra):
    done = subprocess.run([sys.executable, '-c', script], cwd=REPO,
                          env=dict(env, **extra), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])
  folder = str(tmp_path / 'jax_compilation')
  assert run() == [folder, bit_jax.COMPILATION_CACHE_BYTES, False]
  assert any(name.endswith('-cache') for name in os.listdir(folder))
  assert run() == [folder, bit_jax.COMPILATION_CACHE_BYTES, True]
  # The environment's own choice stays.
  assert run(JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'mine'))[0] == str(
      tmp_path / 'mine')
  # Without filelock, JAX cannot keep the cache's size (it would warn at
  # every compilation): no cache, and nothing said.
  done = subprocess.run(
      [sys.executable, os.path.join(REPO, 'tests', 'without.py'), 'filelock',
       '-c', script], cwd=REPO, env=env, capture_output=True, text=True,
      timeout=120)
  assert done.returncode == 0, done.stderr[-2000:]
  assert json.loads(done.stdout.splitlines()[-1])[0] is None
  assert 'filelock' not in done.stderr
