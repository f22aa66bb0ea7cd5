"""Seconds of bit_tf2's first training step on the CPU, where XLA compiles
the model's GroupNorm layers: as shipped, every layer calls one compiled
function (bit_tf2.models.group_norm_relu_cpu_xla), compiled once per input
shape, against one compiled function per layer (as before). Each
measurement runs in a fresh process, the two ways in turn; each also gives
the median of the next --steps steps and the loss after them, which must
be the same bits both ways (fp32, weights from one seed).

  python -m benchmarks.tf2_first_step --archs R14x0.5,R50x1 \\
      --resolution 128 --batch 16 --reps 2
"""
import argparse
import contextlib
import json
import statistics

from benchmarks import measure
from benchmarks.timing import seconds
from big_transfer import hardware

WAYS = ('shared', 'per_layer')


@contextlib.contextmanager
def one_function_per_layer(models):
  """Each GroupNormReLU built meanwhile compiles a function of its own, as
  the layers did before they shared one."""
  shipped = models.GroupNormReLU.build

  def build(self, input_shape):
    shipped(self, input_shape)
    self._compiled = models.xla_function(self._uncompiled)  # pylint: disable=protected-access

  models.GroupNormReLU.build = build
  try:
    yield
  finally:
    models.GroupNormReLU.build = shipped


def first_step(arch, resolution, batch, steps, way):
  """{first_step_s, step_ms, loss} of bit_tf2.train's training step (fp32,
  benchmarks.bench_tf2.training) in this process, its GroupNorm layers
  compiled `way` ('shared' or 'per_layer')."""
  from benchmarks import bench_tf2  # pylint: disable=import-outside-toplevel
  from bit_tf2 import models  # pylint: disable=import-outside-toplevel
  with (one_function_per_layer(models) if way == 'per_layer' else
        contextlib.nullcontext()):
    _, train_step, _, train_batch, _, rate, _ = bench_tf2.training(
        arch, resolution, batch, 'fp32')
  first = seconds(lambda: float(train_step(train_batch, rate)))
  times = [seconds(lambda: float(train_step(train_batch, rate)))
           for _ in range(steps)]
  return {'first_step_s': round(first, 3),
          'step_ms': round(1e3 * statistics.median(times), 1),
          'loss': float(train_step(train_batch, rate))}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--archs', default='R14x0.5,R50x1')
  parser.add_argument('--resolution', type=int, default=128)
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--reps', type=int, default=2)
  args = parser.parse_args(argv)
  rows = []
  for arch in args.archs.split(','):
    runs = {way: [] for way in WAYS}
    for _ in range(args.reps):
      for way in WAYS:
        result = measure.run_in_subprocess(
            'tf2_first_step', 'first_step',
            (arch, args.resolution, args.batch, args.steps, way))
        if 'error' in result:
          raise SystemExit(f'{arch}, {way}: {result["error"]}')
        runs[way].append(result)
    row = {'arch': arch, 'resolution': args.resolution, 'batch': args.batch,
           'reps': args.reps, 'cpu': hardware.cpu_description()['model']}
    for way, results in runs.items():
      for key in ('first_step_s', 'step_ms'):
        row[f'{way}_{key}'] = round(
            statistics.median(r[key] for r in results), 3)
    row['first_step_ratio'] = round(row['per_layer_first_step_s'] /
                                    row['shared_first_step_s'], 2)
    row['same_loss'] = len({r['loss'] for rs in runs.values()
                            for r in rs}) == 1
    print(json.dumps(row), flush=True)
    rows.append(row)
  return rows


if __name__ == '__main__':
  main()
