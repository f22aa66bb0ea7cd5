"""BiT ResNet-v2 in Flax (linen): pre-activation bottlenecks, GroupNorm and
weight-standardised convolutions, loading from and exporting to the published
`.npz` layout.

The parameter tree mirrors the published keys: `resnet/block1/unit01/a/
standardized_conv2d/kernel` is `params['block1']['unit01']['a']
['standardized_conv2d']['kernel']`, so loading and exporting only add or
strip the `resnet/` prefix.
"""
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from big_transfer import zoo

GN_GROUPS = 32
GN_EPS = 1e-5
WS_EPS = 1e-10


class StdConv(nn.Module):
  """Convolution whose HWIO kernel is standardised (zero mean, unit
  population variance over H, W, I) per output channel on every call."""
  features: int
  kernel_size: int
  stride: int = 1
  padding: int = 0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kernel = self.param('kernel', nn.initializers.he_normal(),
                        (k, k, x.shape[-1], self.features))
    flat = kernel.reshape(-1, self.features)
    mean = column_sums(flat) / flat.shape[0]
    var = column_sums(jnp.square(flat - mean)) / flat.shape[0]
    kernel = ((flat - mean) / jnp.sqrt(var + WS_EPS)).reshape(kernel.shape)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    if k == 1 and jax.default_backend() == 'cpu':
      return pointwise_conv(x[:, ::self.stride, ::self.stride], kernel[0, 0])
    return jax.lax.conv_general_dilated(
        x, kernel, (self.stride, self.stride),
        [(self.padding, self.padding)] * 2,
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


# dot_general's dimension numbers of a 1x1 convolution and its gradients
_OVER_CHANNELS = (((3,), (0,)), ((), ()))  # x (N, H, W, I) . kernel (I, O)
_BACK_OVER_CHANNELS = (((3,), (1,)), ((), ()))  # dy . kernel -> dx
_OVER_PIXELS = (((0,), (0,)), ((), ()))  # x (NHW, I) . dy (NHW, O) -> dkernel


@jax.custom_vjp
def pointwise_conv(x, kernel):
  """A 1x1 convolution of stride 1, x (N, H, W, I) by kernel (I, O), for
  CPUs: evaluated alone, XLA's convolution; differentiated, its forward pass
  and both gradients are matrix products (over the channels, and over the
  pixels for the kernel's). XLA's CPU code computes a convolution's kernel
  gradient as another convolution whose operands it first transposes, and
  autodiff of a product measured no faster; written out, R50x1's fp32
  training step gains about 17% (6%, then 10% from the kernel gradient's 2-D
  operands), and its evaluation step keeps its speed (docs/performance.md)."""
  return jax.lax.conv_general_dilated(x, kernel[None, None], (1, 1),
                                      [(0, 0)] * 2,
                                      dimension_numbers=('NHWC', 'HWIO',
                                                         'NHWC'))


def _pointwise_fwd(x, kernel):
  return jax.lax.dot_general(x, kernel, _OVER_CHANNELS), (x, kernel)


def _pointwise_bwd(res, dy):
  x, kernel = res
  # The kernel's gradient from 2-D operands, which XLA's CPU product reads as
  # stored. Given the 4-D ones, XLA first copied x transposed, recomputing
  # the GroupNorm and ReLU before it, at several times a plain copy's cost.
  pixels = lambda a: a.reshape(-1, a.shape[-1])
  return (jax.lax.dot_general(dy, kernel, _BACK_OVER_CHANNELS),
          jax.lax.dot_general(pixels(x), pixels(dy), _OVER_PIXELS))


pointwise_conv.defvjp(_pointwise_fwd, _pointwise_bwd)


class GroupNorm(nn.Module):
  """GroupNorm with 32 groups and the published parameter names
  (gamma, beta); statistics in float32. On CPUs `group_norm_cpu`."""
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    gamma = self.param('gamma', nn.initializers.ones, (c,))
    beta = self.param('beta', nn.initializers.zeros, (c,))
    x = x.astype(jnp.float32)
    if jax.default_backend() == 'cpu':
      return group_norm_cpu(x, gamma, beta).astype(self.dtype)
    g = x.reshape(*x.shape[:-1], GN_GROUPS, c // GN_GROUPS)
    axes = tuple(range(1, g.ndim - 2)) + (g.ndim - 1,)
    mean = jnp.mean(g, axis=axes, keepdims=True)
    var = jnp.var(g, axis=axes, keepdims=True)
    g = (g - mean) / jnp.sqrt(var + GN_EPS)
    return (g.reshape(x.shape) * gamma + beta).astype(self.dtype)


def column_sums(x):
  """Sums over the first axis of a 2-D array. On CPUs as a product with a
  row of ones: XLA's CPU code sums over a leading axis slowly, its matrix
  library does not (docs/performance.md measures it)."""
  if jax.default_backend() != 'cpu':
    return x.sum(0)
  ones = jnp.ones((1, x.shape[0]), x.dtype)
  return jnp.matmul(ones, x, precision=jax.lax.Precision.HIGHEST)[0]


def _pixel_sums(x):
  """(N, P, C) -> (N, C): each example's sums over its P pixels, as a
  product batched over the examples with x first, which XLA's CPU code
  reads as stored (with the ones first it copied x transposed)."""
  ones = jnp.ones(x.shape[:2], x.dtype)
  return jax.lax.dot_general(x, ones, (((1,), (1,)), ((0,), (0,))),
                             precision=jax.lax.Precision.HIGHEST)


def _group_means(sums, count):
  """(N, C) sums over the pixels -> (N, 1, C): each channel's group mean,
  `count` values to a group."""
  n, c = sums.shape
  groups = sums.reshape(n, GN_GROUPS, -1).sum(2, keepdims=True) / count
  return jnp.broadcast_to(groups, (n, GN_GROUPS, c // GN_GROUPS)).reshape(
      n, 1, c)


@jax.custom_vjp
def group_norm_cpu(x, gamma, beta):
  """GroupNorm of float32 NHWC `x` with its gradient written out, for CPUs:
  every sum over the pixels (statistics, gamma's and beta's gradients, the
  gradient's group means) is a product with ones (`column_sums`), where
  XLA's CPU code would reduce slowly. One layer trains 1.3 to 2x faster
  than XLA's own (docs/performance.md)."""
  return _group_norm_fwd(x, gamma, beta)[0]


def _group_norm_fwd(x, gamma, beta):
  n, c = x.shape[0], x.shape[-1]
  flat = x.reshape(n, -1, c)
  count = flat.shape[1] * (c // GN_GROUPS)
  centred = flat - _group_means(_pixel_sums(flat), count)
  rstd = jax.lax.rsqrt(
      _group_means(_pixel_sums(centred * centred), count) + GN_EPS)
  normal = centred * rstd
  return ((normal * gamma + beta).reshape(x.shape),
          (normal.reshape(x.shape), rstd, gamma))


def _group_norm_bwd(res, dy):
  normal, rstd, gamma = res
  n, c = dy.shape[0], dy.shape[-1]
  flat, dy = normal.reshape(n, -1, c), dy.reshape(n, -1, c)
  count = flat.shape[1] * (c // GN_GROUPS)
  dgamma, dbeta = _pixel_sums(dy * flat), _pixel_sums(dy)
  dx = rstd * (dy * gamma - _group_means(dbeta * gamma, count) -
               flat * _group_means(dgamma * gamma, count))
  return dx.reshape(normal.shape), dgamma.sum(0), dbeta.sum(0)


group_norm_cpu.defvjp(_group_norm_fwd, _group_norm_bwd)


def stored(x):
  """x itself (divided by a one that XLA cannot fold), written to memory once
  for all its readers. XLA's CPU code copies cheap element-wise work into
  each operation that reads its result, a division it does not: given
  GroupNorm and ReLU's output, it computed the 3x3 kernel gradient's
  transposed copy of it from GroupNorm's input, several times a plain
  copy's cost (docs/performance.md)."""
  return x / jax.lax.optimization_barrier(jnp.ones((), x.dtype))


class Proj(nn.Module):
  """The residual's 1x1 projection, named as published (proj/
  standardized_conv2d)."""
  features: int
  stride: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    return StdConv(self.features, 1, self.stride, dtype=self.dtype,
                   name='standardized_conv2d')(x)


class PreAct(nn.Module):
  """One part (a, b or c) of a unit: GroupNorm, ReLU, convolution (3x3 ones
  carry `stride`). Part a also projects the residual, with `stride`, when
  `proj` (its output channels) is set, from the same activation."""
  features: int
  kernel_size: int
  stride: int = 1
  proj: int = 0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    y = nn.relu(GroupNorm(self.dtype, name='group_norm')(x))
    residual = (Proj(self.proj, self.stride, self.dtype, name='proj')(y)
                if self.proj else None)
    if self.kernel_size == 3 and jax.default_backend() == 'cpu':
      y = stored(y)  # read as stored by the kernel gradient's transposition
    out = StdConv(self.features, self.kernel_size,
                  1 if self.kernel_size == 1 else self.stride,
                  self.kernel_size // 2, self.dtype,
                  name='standardized_conv2d')(y)
    return out, residual


class Unit(nn.Module):
  """Pre-activation bottleneck; the 3x3 convolution carries the stride."""
  cmid: int
  cout: int
  stride: int = 1
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    proj = self.cout if (self.stride != 1 or x.shape[-1] != self.cout) else 0
    out, residual = PreAct(self.cmid, 1, self.stride, proj, self.dtype,
                           name='a')(x)
    out, _ = PreAct(self.cmid, 3, self.stride, dtype=self.dtype, name='b')(out)
    out, _ = PreAct(self.cout, 1, dtype=self.dtype, name='c')(out)
    return out + (x if residual is None else residual)


class Root(nn.Module):
  features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = StdConv(self.features, 7, 2, 3, self.dtype,
                name='standardized_conv2d')(x)
    x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    if jax.default_backend() == 'cpu':
      return max_pool_3x3_s2(x)
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding='VALID')


@jax.custom_vjp
def max_pool_3x3_s2(x):
  """The stem's 3x3 max pool of stride 2 (no padding) over NHWC `x`, for
  CPUs: XLA's max pool, with an element-wise gradient. XLA's own gradient
  there is a reduction over (value, row, column, ...) tuples of four index
  arrays the size of `x`: about 60 ms of operations in R50x1's fp32 training
  step at 128 px, against about 10 ms for this one; the step gains about 2%
  (docs/performance.md). Both send each window's gradient to its first
  maximum in row-major order, as PyTorch does and as bit_tf2's compiled max
  pool does with the same grids."""
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding='VALID')


def _max_pool_fwd(x):
  y = max_pool_3x3_s2(x)
  return y, (x, y)


def _max_pool_bwd(res, dy):
  x, y = res
  (n, h, w, c), (m, k) = x.shape, y.shape[1:3]
  # Window offset (i, j) reads x[2a + i, 2b + j]: the grid of rows of parity
  # i % 2 and columns of parity j % 2, shifted by (i // 2, j // 2). Each of
  # the four grids, (m + 1, k + 1), collects the gradient of its pixels.
  x = jnp.pad(x, ((0, 0), (0, 2 * m + 2 - h), (0, 2 * k + 2 - w), (0, 0)))
  grids = {}
  taken = jnp.zeros(y.shape, bool)
  for i in range(3):
    for j in range(3):
      a, b, parity = i // 2, j // 2, (i % 2, j % 2)
      hit = (x[:, i % 2::2, j % 2::2][:, a:a + m, b:b + k] == y) & ~taken
      taken = taken | hit
      part = jnp.pad(jnp.where(hit, dy, 0),
                     ((0, 0), (a, 1 - a), (b, 1 - b), (0, 0)))
      grids[parity] = grids[parity] + part if parity in grids else part
  # Interleave the grids: (n, m + 1, row parity, k + 1, column parity, c).
  dx = jnp.stack([jnp.stack([grids[p, 0], grids[p, 1]], 3) for p in (0, 1)],
                 2).reshape(n, 2 * m + 2, 2 * k + 2, c)
  return (dx[:, :h, :w],)


max_pool_3x3_s2.defvjp(_max_pool_fwd, _max_pool_bwd)


class Head(nn.Module):
  num_classes: int
  zero_init: bool = True

  @nn.compact
  def __call__(self, x):
    init = (nn.initializers.zeros if self.zero_init else
            nn.initializers.lecun_normal())
    return nn.Conv(self.num_classes, (1, 1), kernel_init=init,
                   name='conv2d')(x)


def unit_range(images):
  """uint8 images -> float32 in [-1, 1]; float images are taken as already
  in [-1, 1] and returned as they are."""
  if images.dtype != jnp.uint8:
    return images
  return (images.astype(jnp.float32) - 127.5) / 127.5


class ResNetV2(nn.Module):
  """BiT ResNet-v2 of `architecture` (a zoo.Architecture). Takes RGB
  images, NHWC, in [-1, 1] or as uint8 (scaled to [-1, 1] here, on the
  device); returns float32 logits (N, num_classes), or the pre-logits
  (N, C) with `pre_logits=True`."""
  architecture: zoo.Architecture
  num_classes: int
  zero_head: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, pre_logits=False):
    x = unit_range(x)
    wf = self.architecture.width
    x = Root(int(64 * wf), self.dtype, name='root_block')(x)
    for b, units in enumerate(self.architecture.units, start=1):
      cmid = int(64 * wf * 2 ** (b - 1))
      for u in range(1, units + 1):
        x = Unit(cmid, 4 * cmid, (1 if b == 1 else 2) if u == 1 else 1,
                 self.dtype, name=f'block{b}_unit{u:02d}')(x)
    x = nn.relu(GroupNorm(self.dtype, name='group_norm')(x))
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True)
    if pre_logits:
      return x[:, 0, 0]
    x = Head(self.num_classes, self.zero_head, name='head')(x)
    return x[:, 0, 0]

  def init_params(self, rng=None, resolution=32):
    """Fresh float32 parameters (the head zero when zero_head)."""
    rng = jax.random.PRNGKey(0) if rng is None else rng
    x = jnp.zeros((1, resolution, resolution, 3), jnp.float32)
    return jax.jit(self.init)(rng, x)['params']

  def abstract_params(self):
    """The parameter tree's shapes and dtypes, computed without work."""
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    return jax.eval_shape(self.init, jax.random.PRNGKey(0), x)['params']


# --------------------------------------------------------------------------
# Published layout. Flax module names cannot hold '/', so a unit is one
# module named block{b}_unit{NN}; everything below it is named as published.

def _published_key(path):
  return 'resnet/' + '/'.join(path).replace('_unit', '/unit')


def export(params):
  """{published key: float32 numpy array} of a parameter tree."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  return {_published_key(path): np.asarray(v, np.float32)
          for path, v in flat.items()}


def load(model, weights, params=None):
  """Parameters of `model` from published `weights` ({key: array}); strict.

  With `params` given (e.g. from init_params), keys the file does not fill
  (the head when model.zero_head) keep their values there; otherwise every
  key must be in the file. A missing key or wrong shape raises
  errors.BadInput naming the key and both shapes.
  """
  fresh_head = model.zero_head and params is not None
  zoo.check_weights(weights, model.architecture,
                           None if fresh_head else model.num_classes)
  abstract = flax.traverse_util.flatten_dict(model.abstract_params())
  own = flax.traverse_util.flatten_dict(params) if params is not None else {}
  flat = {}
  for path in abstract:
    key = _published_key(path)
    if fresh_head and path[0] == 'head':
      flat[path] = own[path]
    else:
      flat[path] = jnp.asarray(weights[key], jnp.float32)
  return flax.traverse_util.unflatten_dict(flat)


def save_npz(path, params):
  return zoo.save_npz(path, export(params))


def create(model, head_size=None, zero_head=False, weights=None,
           dtype=jnp.float32, rng=None):
  """(ResNetV2, params) for a registered name, an architecture ('R50x1') or
  a weights dict (its architecture read from its shapes), like
  bit_pytorch.models.create.

  `weights`, when given, is loaded strictly; with zero_head the head is new
  (zeros, `head_size` classes), else it comes from the file. Without weights
  the parameters are freshly initialised from `rng`.
  """
  arch, head = zoo.model_arch(model, head_size, weights)
  net = ResNetV2(arch, head, zero_head, dtype)
  if weights is None:
    return net, net.init_params(rng)
  params = None
  if zero_head:
    params = flax.traverse_util.unflatten_dict({
        path: jnp.zeros(v.shape, v.dtype) for path, v in
        flax.traverse_util.flatten_dict(net.abstract_params()).items()
        if path[0] == 'head'})
  return net, load(net, weights, params)


# The original repository's name -> constructor table: KNOWN_MODELS[name](
# head_size=..., zero_head=...) is a ResNetV2 module (its parameters from
# init_params, or load / create with weights).
KNOWN_MODELS = zoo.known_models(ResNetV2)
