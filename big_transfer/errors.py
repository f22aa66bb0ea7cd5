"""The errors that end a command, and the wrapper that turns them into one
line and an exit status. This module imports nothing of the project, so that
every other module can use it.

  BadInput   something the user gave is wrong: exit status 2
  RunFailed  a run could not go on (a write failed, the loss diverged): 3
  Diverged   the training loss is not a number (a RunFailed)
"""
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
  failed run (RunFailed) one line and exit status 3."""
  try:
    return main(*args, **kwargs)
  except BadInput as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  except RunFailed as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(3)
