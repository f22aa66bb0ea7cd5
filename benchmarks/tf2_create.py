"""Seconds to create bit_tf2's model (models.create: its first call, eager,
makes the variables), as shipped, where each GroupNormReLU runs its ops
one by one at that call, against the same model when each layer compiles
its function with XLA at that call (what it did before, a compilation at
the first call's shapes that no step reuses): alternated in one process,
median of --reps, on the CPU.

  python -m benchmarks.tf2_create --archs R50x1,R101x3 --reps 3
"""
import argparse
import contextlib
import json
import statistics
import time

from benchmarks import tf2_first_step
from big_transfer import hardware


@contextlib.contextmanager
def compiled_at_creation(models):
  """GroupNormReLU calls its compiled function eagerly too, each layer a
  function of its own (tf2_first_step.one_function_per_layer), as the
  layers did before."""
  shipped = models.GroupNormReLU.call
  models.GroupNormReLU.call = lambda self, x: self._compiled(x)  # pylint: disable=protected-access
  try:
    with tf2_first_step.one_function_per_layer(models):
      yield
  finally:
    models.GroupNormReLU.call = shipped


def seconds_to_create(models, arch, compiled):
  import keras  # pylint: disable=import-outside-toplevel
  keras.backend.clear_session()
  with compiled_at_creation(models) if compiled else contextlib.nullcontext():
    start = time.perf_counter()
    models.create(arch, head_size=10)
    return time.perf_counter() - start


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--archs', default='R50x1')
  parser.add_argument('--reps', type=int, default=3)
  args = parser.parse_args(argv)
  from bit_tf2 import models  # pylint: disable=import-outside-toplevel
  models.create('R14x0.5', head_size=10)  # TF's own first-use costs
  rows = []
  for arch in args.archs.split(','):
    times = {'shipped': [], 'compiled_at_creation': []}
    for _ in range(args.reps):
      for name in times:
        times[name].append(seconds_to_create(
            models, arch, name == 'compiled_at_creation'))
    row = {'arch': arch, 'reps': args.reps,
           'cpu': hardware.cpu_description()['model']}
    row.update({f'{k}_s': round(statistics.median(v), 3)
                for k, v in times.items()})
    row['ratio'] = round(row['compiled_at_creation_s'] /
                         max(row['shipped_s'], 1e-9), 2)
    print(json.dumps(row), flush=True)
    rows.append(row)
  return rows


if __name__ == '__main__':
  main()
