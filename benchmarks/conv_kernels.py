"""One convolution's forward pass and its training work (forward and both
gradients) in each backend's kernels, fp32 and bf16, on the CPU:

  python -m benchmarks.conv_kernels --frameworks pytorch,jax,tf2 \\
      --json benchmarks/cpu_amx_conv_kernels.json

It answers, per CPU kind, whether a framework's convolutions gain from the
CPU's bf16 instructions (AVX512_BF16, AMX) at all, which bounds what its
bf16 training step can gain (benchmarks.throughput measures the step).
The shapes are R50x1's at 128 px, batch 16, each framework in its own
process, in its own CPU layout: PyTorch NCHW, JAX and TF2 NHWC.
"""
import argparse
import json

import numpy as np

from benchmarks.measure import call_in_subprocess, chosen
from big_transfer import hardware

# name -> (batch, size, cin, cout, kernel, stride): R50x1 at 128 px.
SHAPES = {
    'stage 1, 3x3, 64 ch, 32 px': (16, 32, 64, 64, 3, 1),
    'stage 1, 1x1, 256 to 64 ch, 32 px': (16, 32, 256, 64, 1, 1),
    'stage 3, 3x3, 256 ch, 8 px': (16, 8, 256, 256, 3, 1),
    'stage 4, 1x1, 2048 to 512 ch, 4 px': (16, 4, 2048, 512, 1, 1),
}
FRAMEWORKS = ('pytorch', 'jax', 'tf2')


def arrays(shape):
  """(x NHWC, w HWIO, dy NHWC): the float32 input, kernel and output
  gradient that every framework's measurement of `shape` uses (each in its
  own layout), so that their results can be compared."""
  batch, size, cin, cout, kernel, stride = shape
  out = (size + 2 * (kernel // 2) - kernel) // stride + 1
  rng = np.random.default_rng(0)
  return (rng.standard_normal((batch, size, size, cin), np.float32),
          rng.standard_normal((kernel, kernel, cin, cout), np.float32),
          rng.standard_normal((batch, out, out, cout), np.float32))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--frameworks', default=','.join(FRAMEWORKS),
                      help='comma-separated, from: ' + ', '.join(FRAMEWORKS))
  parser.add_argument('--precisions', default='fp32,bf16')
  parser.add_argument('--steps', type=int, default=10,
                      help='timed calls per measurement (the median counts)')
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--json', help='write every result to this file')
  args = parser.parse_args(argv)
  frameworks = chosen(parser, args.frameworks, FRAMEWORKS)
  precisions = chosen(parser, args.precisions, ('fp32', 'bf16'), 'precision')

  cpu = hardware.cpu_description()
  print(f'CPU: {cpu["model"]} ({", ".join(cpu["simd_flags"])})')
  results = []
  for fw in frameworks:
    for name, shape in SHAPES.items():
      res = {'framework': fw, 'shape': name, 'dims': shape}
      for precision in precisions:
        out = call_in_subprocess(fw, 'convolution',
                                 (shape, precision, args.steps, args.warmup))
        res[precision] = out
      results.append(res)
      print(line(res, precisions), flush=True)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'cpu': cpu, 'steps': args.steps, 'warmup': args.warmup,
                 'results': results}, f, indent=1)


def line(res, precisions):
  """One printed row: each precision's forward and training times, and
  bf16's gain in training where both were measured."""
  parts = [f'{res["framework"]:>8}  {res["shape"]:<36}']
  for p in precisions:
    out = res[p]
    parts.append(f'{p} error: {out["error"]}' if 'error' in out else
                 f'{p} forward {out["forward_ms"]:7.2f} ms, '
                 f'train {out["train_ms"]:7.2f} ms')
  if all('train_ms' in res.get(p, {}) for p in ('fp32', 'bf16')):
    gain = res['fp32']['train_ms'] / res['bf16']['train_ms']
    parts.append(f'bf16 gain x{gain:.2f}')
  return '  '.join(parts)


if __name__ == '__main__':
  main()
