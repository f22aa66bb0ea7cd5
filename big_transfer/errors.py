"""The errors that end a command, the wrapper that turns them into one
line and an exit status, and how an error in one process of a run ends all
of them. This module imports nothing of the project, so that every other
module can use it.

  BadInput   something the user gave is wrong: exit status 2
  RunFailed  a run could not go on (a write failed, the loss diverged): 3
  Diverged   the training loss is not a number (a RunFailed)
  out_of_memory(error)        whether a framework's error is a failed
                              allocation
  together(vote, work)        work done in every process, an error in one
                              ending them all
  in_turn(first, vote, fn, *args)
                              fn in the first processes, then the others
"""
import os
import signal
import sys


class BadInput(Exception):
  """Something the user gave is wrong; the message says what to do."""


class RunFailed(Exception):
  """A run could not go on (a write failed, the loss diverged); the message
  says what happened and what is left."""


class Diverged(RunFailed):
  """The training loss is not a number; the message names the step and the
  newest good checkpoint."""


def run_cli(main, *args, **kwargs):
  """Runs `main`; a BadInput becomes one line on stderr and exit status 2, a
  failed run (RunFailed) one line and exit status 3, and Ctrl-C that
  reaches it (KeyboardInterrupt) the line "interrupted" instead of a
  traceback, the process then ending by SIGINT as Python's own ending
  would (a shell loop around it stops too)."""
  try:
    return main(*args, **kwargs)
  except BadInput as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  except RunFailed as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(3)
  except KeyboardInterrupt:
    print('interrupted', file=sys.stderr, flush=True)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)
    sys.exit(128 + signal.SIGINT)  # where the signal could not end it


# How each framework reports an allocation that failed: torch's
# OutOfMemoryError (CUDA) and its CPU allocator's RuntimeError, XLA's
# RESOURCE_EXHAUSTED status (JAX's JaxRuntimeError), TensorFlow's
# ResourceExhaustedError; Python's MemoryError.
OUT_OF_MEMORY_TYPES = ('OutOfMemoryError', 'ResourceExhaustedError')
OUT_OF_MEMORY_TEXTS = ('RESOURCE_EXHAUSTED', 'DefaultCPUAllocator')


def out_of_memory(error):
  """Whether `error` says that memory could not be allocated."""
  return (isinstance(error, MemoryError)
          or type(error).__name__ in OUT_OF_MEMORY_TYPES
          or any(text in str(error) for text in OUT_OF_MEMORY_TEXTS))


def together(vote, work=None):
  """work() (None: no work in this process), returned once every process of
  the run has done its own. `vote` (flags -> each ORed over the processes,
  a collective; None: one process) joins them, so that an error in any
  process ends them all: that one with its own error, the others with one
  line that points to it (BadInput where the error was one, else
  RunFailed)."""
  vote = vote or (lambda flags: flags)
  try:
    result = work() if work else None
  except BaseException as e:
    vote([isinstance(e, BadInput), not isinstance(e, BadInput)])
    raise
  bad, failed = vote([False, False])
  if bad:
    raise BadInput('another process refused its input (its error says '
                   'why).')
  if failed:
    raise RunFailed('another process failed (its error says why).')
  return result


def in_turn(first, vote, fn, *args):
  """fn(*args) in the first processes (`first`: whether this is one of
  them), then in the others, each turn `together`: checks that make and
  remove folders, or downloads, which processes doing them at once would
  race on."""
  results = [together(vote, (lambda: fn(*args)) if first == turn else None)
             for turn in (True, False)]
  return results[0] if first else results[1]
