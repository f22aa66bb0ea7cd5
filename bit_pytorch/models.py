"""BiT ResNet-v2 in PyTorch: pre-activation bottlenecks, GroupNorm and
weight-standardised convolutions, loading from and exporting to the published
`.npz` layout."""
import collections

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from big_transfer import zoo

GN_GROUPS = 32
GN_EPS = 1e-5
WS_EPS = 1e-10


class StdConv2d(nn.Conv2d):
  """Conv2d whose kernel is standardised (zero mean, unit variance) per
  output channel on every call."""

  def forward(self, x):
    # (w - mean) / sqrt(var + eps) per output channel, as one fused op:
    # GroupNorm of one example with a group per channel, forwards and
    # backwards about twice as fast on CPUs as batch norm over a batch of
    # one (docs/performance.md), and faster than four separate ops.
    w = F.group_norm(self.weight.reshape(1, self.out_channels, -1),
                     self.out_channels, eps=WS_EPS).reshape_as(self.weight)
    return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation,
                    self.groups)


class MaxPool2d(nn.MaxPool2d):
  """nn.MaxPool2d that pools NCHW CPU tensors channels-last and returns them
  NCHW: PyTorch's NCHW max pool is the slow one on CPUs (16 against 1.4 ms
  for the stem's 16x64x66x66, docs/performance.md). The same numbers, ties
  included (each window's gradient goes to its first maximum)."""

  def forward(self, x):
    if x.device.type != 'cpu' or not x.is_contiguous():
      return super().forward(x)
    return super().forward(
        x.contiguous(memory_format=torch.channels_last)).contiguous()


def conv3x3(cin, cout, stride=1):
  return StdConv2d(cin, cout, kernel_size=3, stride=stride, padding=1,
                   bias=False)


def conv1x1(cin, cout, stride=1):
  return StdConv2d(cin, cout, kernel_size=1, stride=stride, bias=False)


def group_norm(channels):
  return nn.GroupNorm(GN_GROUPS, channels, eps=GN_EPS)


class PreActBottleneck(nn.Module):
  """Pre-activation bottleneck (ResNet-v2); the 3x3 convolution carries the
  stride, and a 1x1 projection serves the residual where shapes change."""

  def __init__(self, cin, cout=None, cmid=None, stride=1):
    super().__init__()
    cout = cout or cin
    cmid = cmid or cout // 4
    self.gn1 = group_norm(cin)
    self.conv1 = conv1x1(cin, cmid)
    self.gn2 = group_norm(cmid)
    self.conv2 = conv3x3(cmid, cmid, stride)
    self.gn3 = group_norm(cmid)
    self.conv3 = conv1x1(cmid, cout)
    self.relu = nn.ReLU(inplace=True)
    if stride != 1 or cin != cout:
      self.downsample = conv1x1(cin, cout, stride)

  def forward(self, x):
    out = self.relu(self.gn1(x))
    residual = self.downsample(out) if hasattr(self, 'downsample') else x
    out = self.conv1(out)
    out = self.conv2(self.relu(self.gn2(out)))
    out = self.conv3(self.relu(self.gn3(out)))
    return out + residual

  # Published name of each parameter, relative to the unit.
  PUBLISHED = {
      'gn1.weight': 'a/group_norm/gamma', 'gn1.bias': 'a/group_norm/beta',
      'conv1.weight': 'a/standardized_conv2d/kernel',
      'gn2.weight': 'b/group_norm/gamma', 'gn2.bias': 'b/group_norm/beta',
      'conv2.weight': 'b/standardized_conv2d/kernel',
      'gn3.weight': 'c/group_norm/gamma', 'gn3.bias': 'c/group_norm/beta',
      'conv3.weight': 'c/standardized_conv2d/kernel',
      'downsample.weight': 'a/proj/standardized_conv2d/kernel',
  }


class ResNetV2(nn.Module):
  """BiT ResNet-v2 with `block_units` units per block and width factor
  `width_factor`. Takes RGB images in [-1, 1], NCHW; returns logits."""

  def __init__(self, block_units, width_factor, head_size=21843,
               zero_head=False):
    super().__init__()
    self.architecture = zoo.Architecture(tuple(block_units),
                                                width_factor)
    self.head_size = head_size
    self.zero_head = zero_head
    wf = width_factor
    root = int(64 * wf)
    self.root = nn.Sequential(collections.OrderedDict([
        ('conv', StdConv2d(3, root, kernel_size=7, stride=2, padding=3,
                           bias=False)),
        ('pad', nn.ConstantPad2d(1, 0)),
        ('pool', MaxPool2d(kernel_size=3, stride=2, padding=0)),
    ]))
    blocks = []
    cin = root
    for b, units in enumerate(block_units, start=1):
      cmid = int(64 * wf * 2 ** (b - 1))
      cout = 4 * cmid
      stride = 1 if b == 1 else 2
      unit_list = [(f'unit{u:02d}', PreActBottleneck(
          cin if u == 1 else cout, cout, cmid, stride if u == 1 else 1))
                   for u in range(1, units + 1)]
      blocks.append((f'block{b}', nn.Sequential(
          collections.OrderedDict(unit_list))))
      cin = cout
    self.body = nn.Sequential(collections.OrderedDict(blocks))
    self.head = nn.Sequential(collections.OrderedDict([
        ('gn', group_norm(cin)),
        ('relu', nn.ReLU(inplace=True)),
        ('avg', nn.AdaptiveAvgPool2d(output_size=1)),
        ('conv', nn.Conv2d(cin, head_size, kernel_size=1, bias=True)),
    ]))
    if zero_head:
      nn.init.zeros_(self.head.conv.weight)
      nn.init.zeros_(self.head.conv.bias)

  def features(self, x):
    """Pre-logits: the pooled, normalised representation (N, C)."""
    x = self.head.avg(self.head.relu(self.head.gn(self.body(self.root(x)))))
    return torch.flatten(x, 1)

  def forward(self, x):
    x = self.head(self.body(self.root(x)))
    assert x.shape[-2:] == (1, 1)  # 1x1 after global average pooling.
    return x[..., 0, 0]

  def published_parameters(self, with_head=True):
    """(published key, tensor) for every weight, in published layout order."""
    yield 'resnet/root_block/standardized_conv2d/kernel', self.root.conv.weight
    for bname, block in self.body.named_children():
      for uname, unit in block.named_children():
        prefix = f'resnet/{bname}/{uname}'
        for pname, p in unit.named_parameters():
          yield f'{prefix}/{PreActBottleneck.PUBLISHED[pname]}', p
    yield 'resnet/group_norm/gamma', self.head.gn.weight
    yield 'resnet/group_norm/beta', self.head.gn.bias
    if with_head:
      yield 'resnet/head/conv2d/kernel', self.head.conv.weight
      yield 'resnet/head/conv2d/bias', self.head.conv.bias

  def load_from(self, weights, prefix='resnet/'):
    """Loads published `.npz` weights ({key: array}); strict.

    The head is kept (zero or random) when the model was built with
    `zero_head=True`, and loaded otherwise. A missing key or a wrong shape
    raises errors.BadInput naming the key and both shapes.
    """
    if prefix != 'resnet/':
      weights = {'resnet/' + k[len(prefix):]: v for k, v in weights.items()
                 if k.startswith(prefix)}
    with_head = not self.zero_head
    zoo.check_weights(weights, self.architecture,
                             self.head_size if with_head else None)
    with torch.no_grad():
      for key, p in self.published_parameters(with_head):
        p.copy_(tf2th(weights[key]))

  def export(self):
    """{published key: numpy array}: the inverse of `load_from`."""
    return {key: th2tf(p) for key, p in self.published_parameters()}

  def save_npz(self, path):
    return zoo.save_npz(path, self.export())


def tf2th(array):
  """Published array to torch layout: kernels HWIO -> OIHW."""
  t = torch.from_numpy(np.asarray(array, dtype=np.float32))
  return t.permute(3, 2, 0, 1) if t.ndim == 4 else t


def th2tf(tensor):
  """Torch tensor to published layout: kernels OIHW -> HWIO."""
  t = tensor.detach().float().cpu()
  return (t.permute(2, 3, 1, 0) if t.ndim == 4 else t).contiguous().numpy()


def th2tf_shape(tensor):
  """Shape `tensor` has in the published layout."""
  shape = tuple(tensor.shape)
  return shape[2:] + shape[1::-1] if len(shape) == 4 else shape


KNOWN_MODELS = zoo.known_models(
    lambda arch, head, zero: ResNetV2(arch.units, arch.width, head, zero))


def create(model, head_size=None, zero_head=False, weights=None):
  """A ResNetV2 for a registered name, an architecture ('R50x1') or a
  weights dict (its architecture read from its shapes).

  `weights`, when given, is loaded (strictly); `head_size` defaults to the
  file's (or registry's) head.
  """
  arch, head = zoo.model_arch(model, head_size, weights)
  net = ResNetV2(arch.units, arch.width, head, zero_head)
  if weights is not None:
    net.load_from(weights)
  return net
