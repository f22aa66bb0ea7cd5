"""BiT ResNet-v2 in Keras 3: pre-activation bottlenecks, GroupNorm and
weight-standardised convolutions. Variable paths mirror the published names
(`resnet/block1/unit01/a/group_norm/gamma`, ...), so loading and exporting
the published `.npz` (and the published Keras-2 `.h5`, which
big_transfer.zoo reads for every backend) is a matter of matching names."""

import functools

import numpy as np
import keras
import tensorflow as tf
from keras import layers, ops
# Not in TF's public API: whether a graph is traced for XLA to compile.
from tensorflow.python.ops import control_flow_util

from big_transfer import zoo

GN_GROUPS = 32
GN_EPS = 1e-5
WS_EPS = 1e-10


class StandardizedConv2D(layers.Layer):
  """Bias-free convolution whose HWIO kernel is standardised (zero mean,
  unit population variance over H, W, I) per output channel on every call.

  `padding` is an explicit symmetric zero padding, as in the PyTorch model
  (TF's 'same' pads strided convolutions asymmetrically).
  """

  def __init__(self, filters, kernel_size, strides=1, padding=0,
               name='standardized_conv2d', **kwargs):
    super().__init__(name=name, **kwargs)
    self.filters, self.kernel_size = filters, kernel_size
    self.strides, self.padding = strides, padding

  def build(self, input_shape):
    k = self.kernel_size
    # Standardised in float32 whatever the compute precision: autocast off.
    self.kernel = self.add_weight(
        name='kernel', shape=(k, k, input_shape[-1], self.filters),
        initializer='he_normal', autocast=False)

  def call(self, x):
    w = ops.cast(standardize(self.kernel), self.compute_dtype)
    return padded_conv(x, w, self.strides, self.padding)


def padded_conv(x, w, strides, p):
  """NHWC `x` convolved with the HWIO kernel `w` after a symmetric zero
  padding of `p` (TF's explicit padding argument would send bf16 backward
  passes to a slow kernel, docs/performance.md). In bf16 on CPUs, a 1x1
  kernel is a matrix product: oneDNN's bf16 products train it faster than
  its NHWC convolution, whose kernel gradient is slow (in fp32 they
  measured no faster)."""
  if w.shape[0] == 1 and not p and x.dtype == tf.bfloat16 and on_cpu():
    if strides > 1:
      x = x[:, ::strides, ::strides]
    shape = tf.shape(x)
    y = tf.matmul(tf.reshape(x, (-1, w.shape[2])), tf.reshape(w, w.shape[2:]))
    return tf.reshape(y, tf.concat([shape[:3], [w.shape[3]]], 0))
  if p and strides == 1 and 2 * p == w.shape[0] - 1:
    padding = 'same'  # the same numbers, without a padding op
  else:
    padding = 'valid'
    if p:
      x = ops.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  return ops.conv(x, w, strides=strides, padding=padding)


def standardize(kernel):
  """The HWIO `kernel` less its mean, over its population standard deviation
  (WS_EPS added to the variance), per output channel: TF's fused batch
  normalisation in training mode over the kernel's H*W*I rows, one op
  forwards and one backwards. Written with mean and variance ops instead,
  the step ran a dozen element-wise passes over every kernel, and trained
  7 to 12% slower on the CPU (docs/performance.md)."""
  channels = kernel.shape[-1]
  ones, zeros = tf.ones([channels]), tf.zeros([channels])
  w = tf.raw_ops.FusedBatchNormV3(
      x=tf.reshape(kernel, (1, 1, -1, channels)), scale=ones, offset=zeros,
      mean=zeros, variance=ones, epsilon=WS_EPS, is_training=True,
      data_format='NHWC')[0]
  return tf.reshape(w, tf.shape(kernel))


def on_cpu():
  """Whether TF computes on the CPU here (it sees no GPU and no TPU)."""
  return not (tf.config.list_logical_devices('GPU') or
              tf.config.list_logical_devices('TPU'))


def pixel_sums(t):
  """(N, P, C) -> (N, 1, C): the sums over the P pixels, as a product with
  a row of ones. XLA's CPU code runs this reduction as a slow column
  reduction; as a product it is a fast matrix kernel."""
  return tf.linalg.matmul(tf.ones(tf.stack([tf.shape(t)[0], 1,
                                            tf.shape(t)[1]]), t.dtype), t)


@tf.custom_gradient
def group_norm_relu_cpu(x, gamma, beta):
  """GroupNorm of float32 NHWC `x` (GN_GROUPS groups, GN_EPS), then ReLU,
  for XLA on CPUs, its gradient written out: every sum over the pixels
  (statistics, gamma's and beta's gradients, the gradient's group means) is
  `pixel_sums`. Compiled, a layer trains 1.15 to 1.9x faster than Keras's
  GroupNorm compiled, and the ReLU and its gradient cost nothing beside it,
  where as TF ops they took about 60 ms of R50x1's bf16 training step
  (docs/performance.md)."""
  shape = tf.shape(x)
  channels = x.shape[-1]
  size = channels // GN_GROUPS
  x = tf.reshape(x, tf.stack([shape[0], -1, channels]))
  count = tf.cast(tf.shape(x)[1] * size, x.dtype)

  def group_mean(sums):  # (N, 1, C) channel sums -> each channel's group mean
    groups = tf.reduce_sum(tf.reshape(sums, (-1, 1, GN_GROUPS, size)), 3,
                           keepdims=True)
    return tf.reshape(tf.broadcast_to(groups / count, tf.stack(
        [tf.shape(sums)[0], 1, GN_GROUPS, size])), tf.shape(sums))

  centred = x - group_mean(pixel_sums(x))
  rstd = tf.math.rsqrt(group_mean(pixel_sums(centred * centred)) + GN_EPS)
  normal = centred * rstd
  y = tf.nn.relu(normal * gamma + beta)

  def grad(dy):
    dy = tf.where(y > 0, tf.reshape(dy, tf.shape(x)), 0.)
    dgamma, dbeta = pixel_sums(dy * normal), pixel_sums(dy)
    dx = rstd * (dy * gamma - group_mean(dbeta * gamma) -
                 normal * group_mean(dgamma * gamma))
    return (tf.reshape(dx, shape), tf.reduce_sum(dgamma, (0, 1)),
            tf.reduce_sum(dbeta, (0, 1)))

  return tf.reshape(y, shape), grad


def in_xla_function():
  """Whether the function being traced is compiled by XLA as a whole
  (tf.function(jit_compile=True), or inside one)."""
  return control_flow_util.GraphOrParentsInXlaContext(
      tf.compat.v1.get_default_graph())


def xla_function(fn):
  """`fn` as a tf.function compiled by XLA, traced once per input shape.
  TF counts traces per Python function and would warn of "retracing" after
  a few shapes; TF's own restored functions set the same switch."""
  compiled = tf.function(fn, jit_compile=True)
  compiled._omit_frequent_tracing_warning = True  # pylint: disable=protected-access
  return compiled


# The CPU's compiled GroupNorm, one function for every layer of every model,
# compiled once per input shape: the layers of one shape (every unit of a
# block after its first) share one compilation.
group_norm_relu_cpu_xla = xla_function(group_norm_relu_cpu)


class GroupNormReLU(layers.GroupNormalization):
  """GroupNorm compiled by XLA (a few fused passes over the activations,
  forwards and backwards), then ReLU. TF's own kernels ran GroupNorm as
  about twenty element-wise ops and reductions, one pass over memory each,
  a third of the training step's time on the CPU; compiled, the step
  trains 10-20% faster (docs/performance.md). On CPUs it is
  `group_norm_relu_cpu`, in float32 as Keras's GroupNorm computes, ReLU
  included, and every layer calls the one compiled
  `group_norm_relu_cpu_xla`, taking its gamma and beta as arguments: R50x1's
  first training step, where the layers compile, took 7.0 s against 20.1 s
  with a function per layer, and its steps run as fast (docs/performance.md,
  benchmarks/tf2_first_step.py). Where the whole step is
  compiled (GPUs, TPUs) this is simply part of it; elsewhere off the CPU
  each layer compiles its own Keras GroupNorm.

  Called eagerly, the layer runs its ops one by one, uncompiled: eager
  calls are one-offs (the model's first call, which creates its variables;
  a comparison with an export), and every training, evaluation and
  prediction step is a tf.function, in which the layer is compiled at that
  step's shapes; compiling at the first call too was a compilation no step
  reused, most of the time it took to create a model (docs/performance.md,
  benchmarks/tf2_create.py). In a function that XLA compiles whole (the
  steps on GPUs and TPUs, --compile) the layer's ops are part of it: a
  compiled function called there with its gradient (the CPU's) made XLA
  compile the training step again at every step."""

  def build(self, input_shape):
    super().build(input_shape)
    if on_cpu():
      self._uncompiled = self._cpu_call
      self._compiled = functools.partial(self._cpu_call, compiled=True)
    else:
      self._uncompiled = lambda x: ops.relu(
          layers.GroupNormalization.call(self, x))
      self._compiled = xla_function(self._uncompiled)

  def _cpu_call(self, x, compiled=False):
    norm = group_norm_relu_cpu_xla if compiled else group_norm_relu_cpu
    y = norm(tf.cast(x, tf.float32), tf.cast(self.gamma, tf.float32),
             tf.cast(self.beta, tf.float32))
    return tf.cast(y, self.compute_dtype)

  def call(self, x):
    if tf.executing_eagerly() or in_xla_function():
      return self._uncompiled(x)
    return self._compiled(x)


def group_norm(dtype):
  return GroupNormReLU(GN_GROUPS, epsilon=GN_EPS, name='group_norm',
                       dtype=dtype)


@tf.custom_gradient
def max_pool_3x3_s2(x):
  """The stem's 3x3 max pool of stride 2 (no padding) over NHWC `x`: TF's
  max pool. XLA has no deterministic gradient for it, and every TF2 run
  asks for op determinism, so without this the XLA training step (on GPUs,
  and with --compile) could not run. Compiled by XLA, the gradient is made
  of element-wise ops; elsewhere it is TF's own. Both send each window's
  gradient to its first maximum in row-major order, as PyTorch does."""
  y = tf.nn.max_pool2d(x, 3, 2, 'VALID')

  def grad(dy):
    if tf.__internal__.get_enclosing_xla_context() is None:
      return tf.raw_ops.MaxPoolGrad(orig_input=x, orig_output=y, grad=dy,
                                    ksize=[1, 3, 3, 1], strides=[1, 2, 2, 1],
                                    padding='VALID')
    h, w = tf.shape(x)[1], tf.shape(x)[2]
    m, n = tf.shape(y)[1], tf.shape(y)[2]
    # Window offset (i, j) reads x[2a + i, 2b + j]: the grid of rows of
    # parity i % 2 and columns of parity j % 2, shifted by (i // 2, j // 2).
    # The four grids, (m + 1, n + 1) each, are the channel blocks of
    # space_to_depth (after padding x to an even size).
    grids = tf.split(tf.nn.space_to_depth(
        tf.pad(x, [[0, 0], [0, 2 * m + 2 - h], [0, 2 * n + 2 - w], [0, 0]]),
        2), 4, axis=3)
    parts = [tf.zeros_like(grids[0]) for _ in range(4)]
    taken = tf.zeros_like(y, tf.bool)
    for i in range(3):
      for j in range(3):
        k, (a, b) = 2 * (i % 2) + j % 2, (i // 2, j // 2)
        hit = (grids[k][:, a:a + m, b:b + n] == y) & ~taken
        taken |= hit
        parts[k] += tf.pad(tf.where(hit, dy, tf.zeros_like(dy)),
                           [[0, 0], [a, 1 - a], [b, 1 - b], [0, 0]])
    return tf.nn.depth_to_space(tf.concat(parts, axis=3), 2)[:, :h, :w]

  return y, grad


class Container(layers.Layer):
  """A layer made of layers, which create their variables on first call.

  (Keras would otherwise build a container by tracing it symbolically
  first, which costs seconds for a deep ResNet.)
  """

  def build(self, input_shape):
    del input_shape


class Scope(Container):
  """Puts one layer under a name, e.g. proj/standardized_conv2d/kernel."""

  def __init__(self, layer, name, **kwargs):
    super().__init__(name=name, **kwargs)
    self.layer = layer

  def call(self, x):
    return self.layer(x)


class Head(layers.Layer):
  """The classifier, a 1x1 convolution by its published variables
  (conv2d/kernel of (1, 1, C, classes), conv2d/bias) computed as the
  matrix product it is on the pooled (N, C) features. As a convolution of
  a 1x1 image, TF's oneDNN kernels reordered R50x1's 2048x1000 kernel twice
  a training step on the CPU and its gradient once, about 24 ms
  (docs/performance.md)."""

  def __init__(self, classes, kernel_initializer, name='conv2d', **kwargs):
    super().__init__(name=name, **kwargs)
    self.classes, self.kernel_initializer = classes, kernel_initializer

  def build(self, input_shape):
    self.kernel = self.add_weight(
        name='kernel', shape=(1, 1, input_shape[-1], self.classes),
        initializer=self.kernel_initializer)
    self.bias = self.add_weight(name='bias', shape=(self.classes,),
                                initializer='zeros')

  def call(self, x):
    return ops.matmul(x, ops.reshape(self.kernel, self.kernel.shape[2:])
                      ) + self.bias


class PreActConv(Container):
  """GroupNorm and ReLU, then a standardised convolution: part a, b or c of a
  unit. Part a also holds the unit's projection, which reads the same
  normalised input; `call` then returns (out, projected residual)."""

  def __init__(self, filters, kernel_size, strides=1, proj=None, **kwargs):
    super().__init__(**kwargs)
    dtype = self.dtype_policy
    self.group_norm = group_norm(dtype)
    self.conv = StandardizedConv2D(filters, kernel_size, strides,
                                   kernel_size // 2, dtype=dtype)
    self.proj = None
    if proj:
      self.proj = Scope(StandardizedConv2D(proj[0], 1, proj[1], dtype=dtype),
                        'proj', dtype=dtype)

  def call(self, x):
    x = self.group_norm(x)
    if self.proj is None:
      return self.conv(x)
    return self.conv(x), self.proj(x)


class PreActBottleneck(Container):
  """Pre-activation bottleneck (ResNet-v2); the 3x3 convolution carries the
  stride, and a 1x1 projection serves the residual on a block's first unit."""

  def __init__(self, cout, cmid, stride=1, proj=False, **kwargs):
    super().__init__(**kwargs)
    dtype = self.dtype_policy
    self.a = PreActConv(cmid, 1, proj=(cout, stride) if proj else None,
                        name='a', dtype=dtype)
    self.b = PreActConv(cmid, 3, stride, name='b', dtype=dtype)
    self.c = PreActConv(cout, 1, name='c', dtype=dtype)

  def call(self, x):
    if self.a.proj is None:
      out, residual = self.a(x), x
    else:
      out, residual = self.a(x)
    return self.c(self.b(out)) + residual


class Block(Container):
  """Units applied in turn (a Sequential without the functional tracing)."""

  def __init__(self, units, **kwargs):
    super().__init__(**kwargs)
    self.units = units

  def call(self, x):
    for unit in self.units:
      x = unit(x)
    return x


def unit_range(images):
  """uint8 images -> float32 in [-1, 1]; float images are taken as already
  in [-1, 1] and returned as they are."""
  if images.dtype != tf.uint8:
    return images
  return (tf.cast(images, tf.float32) - 127.5) / 127.5


class ResNetV2(keras.Model):
  """BiT ResNet-v2 with `block_units` units per block and width factor
  `width_factor`. Takes RGB images, NHWC, in [-1, 1] or as uint8 (scaled
  to [-1, 1] here, on the device); returns float32 logits.

  `dtype` is a Keras dtype policy ('float32', 'mixed_bfloat16',
  'mixed_float16'); variables stay float32.
  """

  def __init__(self, block_units, width_factor, head_size=21843,
               zero_head=False, dtype=None):
    super().__init__(name='resnet', dtype=dtype)
    self.architecture = zoo.Architecture(tuple(block_units),
                                                width_factor)
    self.head_size, self.zero_head = head_size, zero_head
    dtype = self.dtype_policy
    root = int(64 * width_factor)
    self.root_block = Scope(StandardizedConv2D(root, 7, 2, 3, dtype=dtype),
                            'root_block', dtype=dtype)
    self.pad = layers.ZeroPadding2D(1, dtype=dtype)
    self.blocks = []
    for b, units in enumerate(block_units, start=1):
      cmid = int(64 * width_factor * 2 ** (b - 1))
      self.blocks.append(Block([
          PreActBottleneck(4 * cmid, cmid, 1 if b == 1 or u > 1 else 2,
                           proj=u == 1, name=f'unit{u:02d}', dtype=dtype)
          for u in range(1, units + 1)], name=f'block{b}', dtype=dtype))
    self.group_norm = group_norm(dtype)
    init = 'zeros' if zero_head else 'glorot_uniform'
    self.head = Scope(Head(head_size, init, dtype=dtype), 'head',
                      dtype=dtype)
    self(np.zeros((1, 32, 32, 3), np.float32))  # creates the variables

  def build(self, input_shape):
    del input_shape  # the layers create their variables on first call

  def features(self, x):
    """Pre-logits: the pooled, normalised representation (N, C)."""
    x = max_pool_3x3_s2(self.pad(self.root_block(unit_range(
        tf.convert_to_tensor(x)))))
    for block in self.blocks:
      x = block(x)
    return ops.mean(self.group_norm(x), axis=(1, 2))

  def call(self, x):
    return ops.cast(self.head(self.features(x)), 'float32')

  def published_variables(self, with_head=True):
    """{published key: variable}; the paths are the published names."""
    out = {v.path: v for v in self.weights}
    if not with_head:
      out = {k: v for k, v in out.items() if not k.startswith('resnet/head/')}
    return out

  def load_from(self, weights):
    """Loads published weights ({key: array}); strict.

    The head is kept (zero or random) when the model was built with
    `zero_head=True`, and loaded otherwise. A missing key or a wrong shape
    raises errors.BadInput naming the key and both shapes.
    """
    with_head = not self.zero_head
    zoo.check_weights(weights, self.architecture,
                             self.head_size if with_head else None)
    for key, v in self.published_variables(with_head).items():
      v.assign(np.asarray(weights[key], np.float32))

  def export_weights(self):
    """{published key: numpy array}: the inverse of `load_from`."""
    return {k: np.asarray(v.numpy(), np.float32)
            for k, v in self.published_variables().items()}

  def save_npz(self, path):
    return zoo.save_npz(path, self.export_weights())

  def export_saved_model(self, path):
    """A SavedModel for serving: `serve(images)` takes float32 NHWC images
    of any size in [-1, 1] and returns float32 logits."""
    archive = keras.export.ExportArchive()
    archive.track(self)
    archive.add_endpoint(
        'serve', self.call,
        [keras.InputSpec(shape=(None, None, None, 3), dtype='float32')])
    archive.write_out(path, verbose=False)
    return path


def create(model, head_size=None, zero_head=False, weights=None, dtype=None):
  """A ResNetV2 for a registered name, an architecture ('R50x1') or a
  weights dict (its architecture read from its shapes).

  `weights`, when given, is loaded (strictly); `head_size` defaults to the
  file's (or registry's) head.
  """
  arch, head = zoo.model_arch(model, head_size, weights)
  net = ResNetV2(arch.units, arch.width, head, zero_head, dtype)
  if weights is not None:
    net.load_from(weights)
  return net


# The original repository's tables: KNOWN_MODELS[name](head_size=...,
# zero_head=...) is a Keras ResNetV2 for that model (load its weights with
# load_from), NUM_UNITS[name] its units per block.
KNOWN_MODELS = zoo.known_models(
    lambda arch, head, zero: ResNetV2(arch.units, arch.width, head, zero))
NUM_UNITS = {name: info.architecture.units
             for name, info in zoo.MODELS.items()}
