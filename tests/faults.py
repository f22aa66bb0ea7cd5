"""Runs a trainer as `python -m` would, with one fault injected at a chosen
point, so that a test sees what a user would see after it:

  python tests/faults.py FAULT -m bit_jax.train ARGS...

FAULT is one of
  full_at_save:N      the disk fills just before the N-th checkpoint save
  full_at_metrics:K   the disk fills after training step K (the next line
                      of metrics.jsonl cannot be written)
  full_at_finish      the disk fills when the trained model is exported
  kill_in_save:N:F    SIGKILL during the N-th checkpoint save, F (0 to 1)
                      of the first save's duration after it began; if that
                      save ends sooner, the kill follows it at once

A full disk is the kernel's own refusal, so the frameworks' writers (torch,
Orbax/TensorStore, TensorFlow's C++) fail as they would on a full disk: the
file-size limit (RLIMIT_FSIZE) drops to 1 byte, and every later write that
would grow a file fails (EFBIG, SIGXFSZ ignored), in this process and the
data workers it starts.
"""
import importlib
import os
import resource
import runpy
import signal
import sys
import threading
import time


def fill_the_disk():
  signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  resource.setrlimit(resource.RLIMIT_FSIZE, (1, hard))


def checkpoint_class(module):
  engine = importlib.import_module(module.split('.')[0] + '.engine')
  return engine.Checkpoint if hasattr(engine, 'Checkpoint') else (
      engine.Checkpoints)


def before_save(module, n, action):
  """Calls action(save, self, step, seconds of the first save) in place
  of the n-th checkpoint save."""
  cls = checkpoint_class(module)
  save, calls = cls.save, []

  def wrapped(self, step):
    calls.append(step)
    if len(calls) == n:
      return action(save, self, step, first[0])
    started = time.perf_counter()
    save(self, step)
    if len(calls) == 1:
      first.append(time.perf_counter() - started)
    return None
  first = []
  cls.save = wrapped


def kill_after(seconds):
  threading.Timer(seconds, os.kill, (os.getpid(), signal.SIGKILL)).start()


def inject(fault, module):
  from big_transfer import harness, progress
  kind, *values = fault.split(':')
  if kind == 'full_at_save':
    def full_then_save(save, self, step, _):
      fill_the_disk()
      return save(self, step)
    before_save(module, int(values[0]), full_then_save)
  elif kind == 'full_at_metrics':
    update, k = progress.Progress.update, int(values[0])

    def update_then_fill(self, step):
      update(self, step)
      if step == k:
        fill_the_disk()
    progress.Progress.update = update_then_fill
  elif kind == 'full_at_finish':
    finish = harness.Run.finish

    def fill_then_finish(self, *a, **kw):
      fill_the_disk()
      return finish(self, *a, **kw)
    harness.Run.finish = fill_then_finish
  elif kind == 'kill_in_save':
    fraction = float(values[1])

    def save_and_die(save, self, step, first_seconds):
      kill_after(fraction * first_seconds)
      save(self, step)
      os.kill(os.getpid(), signal.SIGKILL)
    before_save(module, int(values[0]), save_and_die)
  else:
    raise SystemExit(f'unknown fault {fault}')


def main():
  fault, flag, module, *argv = sys.argv[1:]
  if flag != '-m':
    raise SystemExit('usage: faults.py FAULT -m MODULE [ARGS...]')
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
      __file__))))
  inject(fault, module)
  sys.argv = [module, *argv]
  runpy.run_module(module, run_name='__main__', alter_sys=True)


if __name__ == '__main__':
  main()
