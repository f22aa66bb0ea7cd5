"""bit_pytorch's throughput: the training step of bit_pytorch.train (SGD,
autocast, its memory format) and evaluation forward passes, on random data
(the data pipeline is not timed). Each step is timed alone and the median
step counts, so a burst of other work on a shared machine weighs little.
benchmarks.interleaved compares it with timm's peer step by step.
"""
import torch
import torch.nn.functional as F

from benchmarks import conv_kernels
from benchmarks.timing import median_seconds
from benchmarks.torch_timing import time_model
from bit_pytorch import engine, models


def measure(arch, resolution, batch, precision, steps, warmup, batch_split=1,
            evaluate=True, compile=False):  # pylint: disable=redefined-builtin
  """time_model of bit_pytorch's model; with `compile`, through
  torch.compile, as bit_pytorch.train --compile runs it."""
  return time_model(models.create(arch, head_size=1000), resolution, batch,
                    precision, steps, warmup, batch_split=batch_split,
                    evaluate=evaluate, compile=compile)


def convolution(shape, precision, steps, warmup):
  """{forward_ms, train_ms, weight_grad_sum}: one convolution of `shape`
  (batch, size, cin, cout, kernel, stride; zero padding kernel // 2) on the
  CPU, its inputs and weights in `precision` (as autocast hands them to the
  kernel), in bit_pytorch's CPU layout (NCHW); train_ms adds both gradients
  (benchmarks.conv_kernels)."""
  _, _, _, _, kernel, stride = shape
  dtype = engine.DTYPES[precision]
  x, w, dy = (torch.from_numpy(a).to(dtype)
              for a in conv_kernels.arrays(shape))
  x = x.permute(0, 3, 1, 2).contiguous().requires_grad_()
  w = w.permute(3, 2, 0, 1).contiguous().requires_grad_()
  dy = dy.permute(0, 3, 1, 2).contiguous()

  def conv():
    return F.conv2d(x, w, stride=stride, padding=kernel // 2)

  def forward():
    with torch.no_grad():
      conv()

  def train():
    return torch.autograd.grad(conv(), (x, w), dy)

  onednn = torch.backends.mkldnn.enabled
  return {'forward_ms': 1e3 * median_seconds(forward, steps, warmup),
          'train_ms': 1e3 * median_seconds(train, steps, warmup),
          'weight_grad_sum': train()[1].double().abs().sum().item(),
          'kernels': f'oneDNN {"on" if onednn else "off"}',
          'version': torch.__version__}
