"""How every bench_<framework> module times a step and reads the memory it
took."""
import os
import statistics
import time


def seconds(fn):
  """Wall time of one call of `fn` (which must wait for its work)."""
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


def median_seconds(fn, steps, warmup):
  """The median wall time of `steps` calls of `fn`, after `warmup` untimed
  calls."""
  for _ in range(warmup):
    fn()
  return statistics.median(seconds(fn) for _ in range(steps))


def images_per_sec(fn, batch, steps, warmup):
  """`batch` / the median time of `steps` calls of `fn`, after `warmup`
  untimed calls."""
  return batch / median_seconds(fn, steps, warmup)


def cpu_seconds():
  """CPU seconds (user and system) used so far by this process and all its
  threads (exact), and by its child processes still running (PyTorch's data
  workers; from /proc, in clock ticks of 1/100 s on most systems)."""
  me, ticks = os.getpid(), 0
  for entry in os.listdir('/proc'):
    if not entry.isdigit() or int(entry) == me:
      continue
    try:
      with open(f'/proc/{entry}/stat') as f:
        # After "pid (name)": state, ppid, ... utime and stime are the 12th
        # and 13th fields.
        fields = f.read().rsplit(')', 1)[1].split()
    except OSError:  # it ended meanwhile
      continue
    if int(fields[1]) == me:
      ticks += int(fields[11]) + int(fields[12])
  return time.process_time() + ticks / os.sysconf('SC_CLK_TCK')


def _status_bytes(field):
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith(field + ':'):
        return int(line.split()[1]) * 1024
  raise KeyError(field)


class RssPeak:
  """Growth of this process's peak resident memory (Linux VmHWM) over its
  resident memory at the start: what the work between start() and
  growth() held in host memory at its peak, beyond what was already there.
  """

  def start(self):
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')  # resets VmHWM to the current resident size
    self._base = _status_bytes('VmRSS')

  def growth(self):
    return _status_bytes('VmHWM') - self._base
