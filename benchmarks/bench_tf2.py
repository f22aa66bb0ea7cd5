"""bit_tf2's throughput: the training step of bit_tf2.train (SGD, batch
distributed over all local devices by its strategy, XLA on accelerators,
Keras mixed precision, TF's deterministic settings) and the evaluation
step, on random data (the data pipeline is not timed)."""
import os

import keras
import numpy as np
import tensorflow as tf

from benchmarks import conv_kernels
from benchmarks.timing import RssPeak, images_per_sec, median_seconds
from bit_tf2 import engine, models, train


def training(arch, resolution, batch, precision, batch_split=1, xla=None):
  """(strategy, train_step, eval_step, train_batch, eval_batch, rate, xla)
  of bit_tf2.train's steps for a new `arch` model (its weights drawn from
  seed 0) on one random batch of uint8 images, as big_transfer.loader gives
  them (the step scales them); `xla` as --compile (True) or --no-compile
  (False) set it, by default as the trainer decides."""
  engine.deterministic()
  keras.utils.set_random_seed(0)
  strategy = engine.make_strategy()
  with strategy.scope():
    model = models.create(arch, head_size=1000,
                          dtype=engine.POLICIES[precision])
    optimizer, lr = train.make_optimizer(precision)
    optimizer.build(model.trainable_variables)
  xla = engine.uses_xla(strategy, xla)
  train_step, eval_step = train.make_steps(strategy, model, optimizer, lr,
                                           batch, batch_split, xla)
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 1000, batch)
  images = rng.integers(0, 256, (batch, resolution, resolution, 3), np.uint8)
  data = {'image': images, 'label': np.eye(1000, dtype=np.float32)[labels]}
  eval_data = {'image': images, 'label': labels, 'mask': np.ones(batch, bool)}
  train_batch, eval_batch = (
      engine.to_replicas(strategy, tf.nest.map_structure(tf.constant, b))
      for b in (data, eval_data))
  return (strategy, train_step, eval_step, train_batch, eval_batch,
          tf.constant(0.003, tf.float32), xla)


def measure(arch, resolution, batch, precision, steps, warmup, batch_split=1,
            evaluate=True, xla=None):
  """{train_img_s, train_mem_bytes, eval_img_s, ...}; train_mem_bytes: on a
  GPU the allocator's peak during the training steps, on the CPU the growth
  of peak resident memory over them. TF runs as bit_tf2.train runs it
  (engine.deterministic: one inter-op thread, which costs the CPU's step
  about 10% against TF's default); `xla` as in training."""
  strategy, train_step, eval_step, train_batch, eval_batch, rate, xla = (
      training(arch, resolution, batch, precision, batch_split, xla))
  device = engine.device_kind(strategy)
  if device == 'GPU':
    tf.config.experimental.reset_memory_stats('GPU:0')
  else:
    rss = RssPeak()
    rss.start()
  out = {'train_img_s': images_per_sec(
      lambda: float(train_step(train_batch, rate)), batch, steps,
      warmup)}
  out['train_mem_bytes'] = (
      tf.config.experimental.get_memory_info('GPU:0')['peak']
      if device == 'GPU' else rss.growth())
  if evaluate:
    out['eval_img_s'] = images_per_sec(
        lambda: eval_step(eval_batch).numpy(), batch, steps, warmup)
  onednn = os.environ.get('TF_ENABLE_ONEDNN_OPTS') not in ('0', 'false')
  return dict(out, device=device, devices=strategy.num_replicas_in_sync,
              xla=xla, tensorflow=tf.__version__, kernels=', '.join(
                  [f'oneDNN {"on" if onednn else "off"}'] + ['XLA'] * xla))


def convolution(shape, precision, steps, warmup):
  """bench_pytorch.convolution's measurement with TF's kernels as bit_tf2
  trains on the CPU (NHWC, a tf.function without XLA)."""
  _, _, _, _, kernel, stride = shape
  dtype = tf.bfloat16 if precision == 'bf16' else tf.float32
  x, w, dy = (tf.constant(a, dtype) for a in conv_kernels.arrays(shape))

  def conv(x, w):
    return models.padded_conv(x, w, stride, kernel // 2)

  forward = tf.function(conv, jit_compile=False)

  @tf.function(jit_compile=False)
  def train(x, w, dy):
    with tf.GradientTape() as tape:
      tape.watch((x, w))
      y = conv(x, w)
    return tape.gradient(y, (x, w), output_gradients=dy)

  dw = tf.cast(train(x, w, dy)[1], tf.float64)
  onednn = os.environ.get('TF_ENABLE_ONEDNN_OPTS') not in ('0', 'false')
  return {'forward_ms': 1e3 * median_seconds(lambda: forward(x, w), steps,
                                             warmup),
          'train_ms': 1e3 * median_seconds(lambda: train(x, w, dy), steps,
                                           warmup),
          'weight_grad_sum': float(tf.reduce_sum(tf.abs(dw))),
          'kernels': f'oneDNN {"on" if onednn else "off"}',
          'version': tf.__version__}
