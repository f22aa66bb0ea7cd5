"""TensorBoard event files for every run, whatever its backend.

One writer serves PyTorch, TF2 and JAX runs alike: it writes the records
with the `tensorboard` package's own protobufs and record framing, without
TensorFlow (which the PyTorch backend does not need). The files go into the
run folder, so

  tensorboard --logdir LOGDIR

shows every run under LOGDIR by its name, with tags `train/loss`,
`train/lr`, `val/top1`, ... (one per numeric value of a metrics.jsonl row).

Also a command that writes the event files of finished runs from their
metrics.jsonl (for runs made before this writer existed):

  python -m big_transfer.events RUN_DIR...
"""
import itertools
import json
import os
import socket
import sys
import time

from tensorboard.compat.proto import event_pb2
from tensorboard.compat.proto import summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

from big_transfer import flags, runfiles
from big_transfer.errors import BadInput, run_cli

EVENTS_PREFIX = 'events.out.tfevents.'


class TensorBoard:
  """Writes scalars of one run as a TensorBoard event file in `run_dir`.

  `resume_step`: the step a resumed run starts again from. TensorBoard then
  drops the events after it that an earlier process wrote (as metrics.jsonl
  drops its lines), so the curves read as one uninterrupted run.
  """

  def __init__(self, run_dir, resume_step=0):
    os.makedirs(run_dir, exist_ok=True)
    # TensorBoard's own naming (time, host, pid), then a count that keeps
    # the files of one process in one second apart, in the order written:
    # a file is only ever created, never overwritten.
    stem = (f'{EVENTS_PREFIX}{int(time.time()):010d}.{socket.gethostname()}'
            f'.{os.getpid()}')
    for n in itertools.count():
      self.path = os.path.join(run_dir, f'{stem}.{n:03d}.bit')
      try:
        self._file = open(self.path, 'xb')
        break
      except FileExistsError:
        continue
    self._writer = RecordWriter(self._file)
    self._write(event_pb2.Event(wall_time=time.time(),
                                file_version='brain.Event:2'))
    if resume_step:
      self._write(event_pb2.Event(
          wall_time=time.time(), step=int(resume_step) + 1,
          session_log=event_pb2.SessionLog(
              status=event_pb2.SessionLog.START)))
    self._file.flush()

  def _write(self, event):
    self._writer.write(event.SerializeToString())

  def scalars(self, step, split, values, wall_time=None):
    """One event at `step` holding `{split}/{name}` for every numeric value
    (booleans, strings and None are left out)."""
    summary = summary_pb2.Summary(value=[
        summary_pb2.Summary.Value(tag=f'{split}/{name}',
                                  simple_value=float(value))
        for name, value in values.items() if is_scalar(value)])
    if summary.value:
      self._write(event_pb2.Event(
          wall_time=time.time() if wall_time is None else wall_time,
          step=int(step), summary=summary))
      self._file.flush()

  def close(self):
    if not self._file.closed:
      self._file.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def is_scalar(value):
  try:
    import numpy as np
    if isinstance(value, np.generic) and value.size == 1:
      value = value.item()
  except ImportError:
    pass
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_metrics(run_dir):
  """The rows of a run's metrics.jsonl, in order."""
  path = os.path.join(run_dir, runfiles.METRICS)
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def write_from_metrics(run_dir):
  """Replaces a run's event files by ones written from its metrics.jsonl."""
  rows = read_metrics(run_dir)
  for name in os.listdir(run_dir):
    if name.startswith(EVENTS_PREFIX):
      os.remove(os.path.join(run_dir, name))
  with TensorBoard(run_dir) as tb:
    for row in rows:
      values = {k: v for k, v in row.items() if k not in ('step', 'split')}
      tb.scalars(row['step'], row['split'], values)
  return tb.path


def main(argv=None):
  parser = flags.parser(
      'Write TensorBoard event files of runs from their metrics.jsonl (runs '
      'write them themselves as they go).')
  parser.add_argument('run_dirs', nargs='+', metavar='RUN_DIR',
                      help='Run folders (LOGDIR/NAME), each with a '
                      'metrics.jsonl; the events go beside it.')
  args = parser.parse_args(argv)
  for run_dir in args.run_dirs:
    if not os.path.isfile(os.path.join(run_dir, runfiles.METRICS)):
      raise BadInput(f'{run_dir} has no metrics.jsonl.')
  for run_dir in args.run_dirs:
    print(write_from_metrics(run_dir))


if __name__ == '__main__':
  run_cli(main, sys.argv[1:])
