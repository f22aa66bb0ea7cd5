"""benchmarks.conv_kernels: each framework times the same convolution and
its two gradients (its weight gradient equals a NumPy sum written out
here), and the command refuses a precision it does not know."""
import importlib
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import conv_kernels
from benchmarks.measure import REPO

# (batch, size, cin, cout, kernel, stride): padded 3x3, strided, and 1x1.
SHAPES = [(2, 6, 4, 5, 3, 1), (2, 7, 3, 4, 3, 2), (2, 5, 6, 3, 1, 1)]


def weight_gradient(shape):
  """sum over n, i, j of x_padded[n, i*s + a, j*s + b, c] dy[n, i, j, o]."""
  _, _, _, _, kernel, stride = shape
  x, w, dy = conv_kernels.arrays(shape)
  p = kernel // 2
  x = np.pad(x.astype(np.float64), ((0, 0), (p, p), (p, p), (0, 0)))
  out = dy.shape[1]
  dw = np.zeros(w.shape)
  for a in range(kernel):
    for b in range(kernel):
      patch = x[:, a:a + stride * out:stride, b:b + stride * out:stride]
      dw[a, b] = np.einsum('nijc,nijo->co', patch, dy)
  return dw


@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('framework', conv_kernels.FRAMEWORKS)
def test_every_framework_times_the_same_convolution(framework, shape):
  bench = importlib.import_module(f'benchmarks.bench_{framework}')
  res = bench.convolution(shape, 'fp32', steps=2, warmup=1)
  assert res['forward_ms'] > 0 and res['train_ms'] > 0
  assert res['weight_grad_sum'] == pytest.approx(
      np.abs(weight_gradient(shape)).sum(), rel=1e-5)


def test_unknown_precision_is_refused():
  proc = subprocess.run(
      [sys.executable, '-m', 'benchmarks.conv_kernels', '--precisions',
       'fp32,fp8'], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert "unknown precision(s) ['fp8']" in proc.stderr
