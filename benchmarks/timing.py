"""How every bench_<framework> module times a step."""
import statistics
import time


def seconds(fn):
  """Wall time of one call of `fn` (which must wait for its work)."""
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


def images_per_sec(fn, batch, steps, warmup):
  """`batch` / the median time of `steps` calls of `fn`, after `warmup`
  untimed calls."""
  for _ in range(warmup):
    fn()
  return batch / statistics.median(seconds(fn) for _ in range(steps))
