"""bit_jax's throughput: the compiled training step of bit_jax.train (SGD,
data-parallel over all local devices) and the evaluation step, on random
data (the data pipeline is not timed)."""
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from benchmarks import conv_kernels
from benchmarks.timing import images_per_sec, median_seconds
from bit_jax import engine, models, train


def compiled_steps(arch, resolution, batch, precision, batch_split=1):
  """bit_jax.train's steps on random data, as the benchmarks run them:
  {'train': the compiled training step, 'state': (params, optimizer
  state), 'data', 'lr': its other arguments, 'eval': the evaluation step,
  'eval_args': its arguments but the parameters}."""
  if precision not in train.DTYPES:
    raise ValueError(f'bit_jax does not support {precision}')
  model, params = models.create(arch, head_size=1000,
                                dtype=train.DTYPES[precision])
  tx = train.optimizer()
  mesh = Mesh(np.array(jax.devices()), ('data',))
  state = jax.device_put((params, tx.init(params)), NamedSharding(mesh, P()))
  train_step, eval_step = train.make_steps(model, tx, mesh, batch_split)
  rng = np.random.default_rng(0)
  sharded = NamedSharding(mesh, P('data'))
  # uint8 images, as big_transfer.loader gives them (the step scales them)
  x = jax.device_put(rng.integers(0, 256, (batch, resolution, resolution, 3),
                                  np.uint8), sharded)
  labels = rng.integers(0, 1000, batch)
  y = jax.device_put(np.eye(1000, dtype=np.float32)[labels], sharded)
  y_int = jax.device_put(labels, sharded)
  mask = jax.device_put(np.ones(batch, bool), sharded)
  lr = jnp.float32(0.003)
  data = {'image': x, 'label': y}
  return {'train': train_step.lower(*state, data, lr).compile(),
          'state': state, 'data': data, 'lr': lr, 'eval': eval_step,
          'eval_args': (x, y_int, mask)}


def measure(arch, resolution, batch, precision, steps, warmup, batch_split=1,
            evaluate=True):
  """{train_img_s, train_mem_bytes, eval_img_s, ...}; train_mem_bytes: the
  compiled training step's memory as XLA plans it (arguments, outputs not
  aliased to them, temporaries), on any platform. (The accelerator
  allocator's peak cannot be reset in JAX and holds the autotuning's
  scratch; the CPU's resident memory holds the compiler's.)"""
  made = compiled_steps(arch, resolution, batch, precision, batch_split)
  train_step, state = made['train'], made['state']

  def step():
    nonlocal state
    params, opt_state, loss = train_step(*state, made['data'], made['lr'])
    state = (params, opt_state)
    loss.block_until_ready()

  device = jax.devices()[0]
  plan = train_step.memory_analysis()
  out = {'train_img_s': images_per_sec(step, batch, steps, warmup),
         'train_mem_bytes': (plan.argument_size_in_bytes +
                             plan.output_size_in_bytes -
                             plan.alias_size_in_bytes +
                             plan.temp_size_in_bytes)}
  if evaluate:
    out['eval_img_s'] = images_per_sec(
        lambda: made['eval'](state[0], *made['eval_args']).block_until_ready(),
        batch, steps, warmup)
  return dict(out, device=device.platform, devices=jax.device_count(),
              jax=jax.__version__, kernels=f'XLA ({device.platform})')


def convolution(shape, precision, steps, warmup):
  """bench_pytorch.convolution's measurement in XLA (NHWC, compiled;
  train_ms: the forward pass and both gradients in one compiled
  function)."""
  _, _, _, _, kernel, stride = shape
  dtype = engine.DTYPES[precision]
  x, w, dy = (jnp.asarray(a, dtype) for a in conv_kernels.arrays(shape))
  pad = kernel // 2

  def conv(x, w):
    return jax.lax.conv_general_dilated(
        x, w, (stride, stride), ((pad, pad), (pad, pad)),
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  forward = jax.jit(conv)
  train = jax.jit(lambda x, w, dy: jax.vjp(conv, x, w)[1](dy))
  dw = np.asarray(train(x, w, dy)[1], np.float64)
  return {'forward_ms': 1e3 * median_seconds(
              lambda: forward(x, w).block_until_ready(), steps, warmup),
          'train_ms': 1e3 * median_seconds(
              lambda: jax.block_until_ready(train(x, w, dy)), steps, warmup),
          'weight_grad_sum': float(np.abs(dw).sum()),
          'kernels': f'XLA ({jax.devices()[0].platform})',
          'version': jax.__version__}
