"""The run harness (big_transfer.harness) with a stand-in trainer, no
framework: what a resumed run does with files a killed process left, and
that a failing run closes its files and releases its lock."""
import json
import logging
import math
import os
import time

import pytest

import bit_common
from big_transfer import errors, harness, runfiles
from conftest import as_processes


class JsonCheckpoints(harness.Checkpoints):
  """A checkpoint format for the tests: the step and a number, as JSON."""

  def __init__(self, folder, settings):
    self.path = os.path.join(folder, 'ckpt.json')
    self.settings, self.value, self._read = settings, 0.0, None

  def newest_first(self):
    return [self.path] if os.path.exists(self.path) else []

  def read(self, name):
    with open(name) as f:
      self._read = json.load(f)
    return self._read['step'], self._read['settings']

  def load(self):
    self.value = self._read['value']

  def set_aside(self, name):
    os.replace(name, name + '.unreadable')

  def save(self, step):
    runfiles.write_json(self.path, {'step': step, 'value': self.value,
                                    'settings': self.settings})


def args_for(tmp_path, **flags):
  argv = ['--name', 'run', '--logdir', str(tmp_path), '--total_steps', '12']
  for k, v in flags.items():
    argv += [f'--{k}', str(v)]
  return bit_common.argparser().parse_args(argv)


def run(args, losses=lambda step: 1.0 / (step + 1), stop_at=None,
        stop=KeyboardInterrupt, evaluate=lambda: [4.0, 2, 3, 4]):
  """A stand-in fine-tuning: a number that grows each step, the given
  losses, `evaluate` (by default fixed sums); returns (Run, result). At step
  `stop_at` it raises `stop()` (or what calling `stop` raises)."""
  r = harness.Run(args)
  ckpt = JsonCheckpoints(r.dir, {'seed': args.seed})
  step = r.resume(ckpt, {'seed': args.seed})
  r.start(step, {}, 'stand-in run')

  def train(step, lr):
    del lr
    if stop_at is not None and step == stop_at:
      raise stop()  # KeyboardInterrupt: a kill, as far as files can tell
    ckpt.value += 1
    return losses(step)

  result, step = r.fit(step, args.total_steps, lambda s: 0.1, train,
                       evaluate, ckpt)
  return r, r.finish(result, step)


@pytest.mark.parametrize('save', [True, False])
def test_the_last_line_names_the_model_where_it_was_written(tmp_path, save):
  args = args_for(tmp_path)
  args.save = save
  exported = tmp_path / 'elsewhere.npz'  # distillation's --export, say

  def export(path):
    del path  # the run folder's model.npz, which this export does not use
    exported.write_text('weights')
    return str(exported)
  r = harness.Run(args)
  r.start(0, {}, 'a run')
  r.finish({'top1': 0.5}, 12, export)
  last = (tmp_path / 'run' / runfiles.LOG).read_text().splitlines()[-1]
  assert last.endswith('done: top-1 50.00% after 12 steps' + (
      f'; the model is {exported}.' if save else '.'))
  assert exported.exists() == save


def test_a_folder_that_another_command_wrote_is_refused(tmp_path):
  args = args_for(tmp_path)
  with harness.Run(args, command='bit_jax.train') as r:
    r.start(0, {}, 'a run')
  config = json.loads((tmp_path / 'run' / runfiles.CONFIG).read_text())
  assert config['command'] == 'bit_jax.train'
  with pytest.raises(errors.BadInput, match='python -m bit_jax.train'):
    harness.Run(args, command='bit_jax.distill')
  harness.Run(args, command='bit_jax.train').close()
  del config['command']  # a run from before commands were recorded
  runfiles.write_json(str(tmp_path / 'run' / runfiles.CONFIG), config)
  harness.Run(args, command='bit_jax.distill').close()


def test_a_run_refused_before_it_starts_leaves_no_folder_it_made(tmp_path):
  args = args_for(tmp_path / 'new_logdir', name='group/run')
  with pytest.raises(errors.BadInput):
    with harness.Run(args) as r:
      r.logger.warning('written to train.log before the refusal')
      raise errors.BadInput('bad data')
  assert os.listdir(tmp_path) == []
  args = args_for(tmp_path)
  folder = tmp_path / 'run'
  folder.mkdir()
  (folder / 'mine.txt').write_text('the user\'s')
  with pytest.raises(errors.BadInput):
    with harness.Run(args):
      raise errors.BadInput('bad data')
  assert (folder / 'mine.txt').exists()
  args = args_for(tmp_path, name='started')
  with pytest.raises(errors.BadInput):
    with harness.Run(args) as r:
      r.start(0, {}, 'a run')
      raise errors.BadInput('after the start')
  assert (tmp_path / 'started' / runfiles.CONFIG).exists()
  with pytest.raises(ValueError):
    with harness.Run(args_for(tmp_path, name='crashed')):
      raise ValueError('not bad input: a bug, whose log is kept')
  assert (tmp_path / 'crashed' / 'train.log').exists()


def metrics_lines(tmp_path):
  with open(tmp_path / 'run' / runfiles.METRICS) as f:
    return f.read().splitlines()


def test_a_torn_last_metrics_line_is_cut_off_at_resume(tmp_path):
  args = args_for(tmp_path, save_every=4)
  with pytest.raises(KeyboardInterrupt):
    run(args, stop_at=6)
  lines = metrics_lines(tmp_path)
  # Rows are written as the losses are read back: at the checkpoint of 4.
  assert [json.loads(l)['step'] for l in lines][-1] == 4
  # The process was killed in the middle of writing step 5's line.
  with open(tmp_path / 'run' / runfiles.METRICS, 'a') as f:
    f.write('{"step": 5, "split": "tra')
  _, result = run(args)
  assert result['step'] == 12
  steps = [json.loads(l)['step'] for l in metrics_lines(tmp_path)
           if json.loads(l)['split'] == 'train']
  assert steps == list(range(1, 13))  # resumed at 4, each step once
  assert 'half-written' in (tmp_path / 'run' / runfiles.LOG).read_text()


def test_a_damaged_line_before_the_last_is_refused(tmp_path):
  args = args_for(tmp_path, save_every=4)
  with pytest.raises(KeyboardInterrupt):
    run(args, stop_at=6)
  lines = metrics_lines(tmp_path)
  lines[1] = lines[1][:10]
  (tmp_path / 'run' / runfiles.METRICS).write_text('\n'.join(lines) + '\n')
  with pytest.raises(errors.BadInput, match='line 2, is not JSON'):
    run(args)


def test_leftover_temporary_files_are_removed_at_start(tmp_path):
  folder = tmp_path / 'run'
  folder.mkdir()
  leftover = folder / f'.{runfiles.RESULTS}.abc123.part'
  leftover.write_text('{"top1": ')
  mine = folder / 'notes.part'  # not a name of runfiles.replaced
  mine.write_text('kept')
  run(args_for(tmp_path))
  assert not leftover.exists() and mine.exists()


def test_a_failing_run_closes_its_files_and_lock(tmp_path):
  args = args_for(tmp_path)
  with pytest.raises(errors.Diverged):
    run(args, losses=lambda step: math.nan if step == 3 else 1.0)
  lock = os.path.abspath(tmp_path / 'run' / runfiles.LOCK)
  assert lock not in harness._LOCKS  # pylint: disable=protected-access
  logger = logging.getLogger('bit.run')
  assert not [h for h in logger.handlers
              if isinstance(h, logging.FileHandler)]
  # The same command again runs (the lock was released, nothing is open).
  _, result = run(args)
  assert result['step'] == 12


def test_in_turn_the_first_process_then_the_others():
  calls = []

  def check(where, fail=None):
    calls.append(where)
    if fail:
      raise fail
    return where
  ends = as_processes(3, lambda i, votes: errors.in_turn(
      i == 0, votes, check, f'p{i}'))
  assert ends == {'p0': 'p0', 'p1': 'p1', 'p2': 'p2'}
  assert calls[0] == 'p0' and sorted(calls[1:]) == ['p1', 'p2']

  # A refusal in a later turn ends every process; the first with a line
  # pointing to it.
  ends = as_processes(2, lambda i, votes: errors.in_turn(
      i == 0, votes, check, f'p{i}',
      errors.BadInput('no such folder') if i == 1 else None))
  assert str(ends['p1']) == 'no such folder'
  assert isinstance(ends['p0'], errors.BadInput)
  assert 'another process refused its input' in str(ends['p0'])

  # Any other error in the first turn: the others never start theirs.
  calls.clear()
  ends = as_processes(2, lambda i, votes: errors.in_turn(
      i == 0, votes, check, f'p{i}', MemoryError() if i == 0 else None))
  assert calls == ['p0'] and isinstance(ends['p0'], MemoryError)
  assert isinstance(ends['p1'], errors.RunFailed)
  # One process: no vote.
  assert errors.in_turn(True, None, check, 'alone') == 'alone'


@pytest.mark.parametrize('processes', [1, 2])
def test_slow_steps_are_read_back_at_once_by_one_process(tmp_path,
                                                         monkeypatch,
                                                         processes):
  """Losses are read back every LOG_EVERY steps (the first step at once).
  One process alone also reads back once progress.LINE_SECONDS have passed
  since the last read-back, so that a CPU's steps of minutes show their
  progress; several processes keep the agreed cadence (their read-back may
  be a collective). Every step keeps its metrics row either way."""
  clock = [1000.0]
  monkeypatch.setattr(time, 'time', lambda: clock[0])
  vote = None if processes == 1 else (lambda flags: flags)
  read = {}
  for name, seconds in (('fast', 1), ('slow', 40)):
    args = args_for(tmp_path, name=name, total_steps=25)
    r = harness.Run(args, True, vote)
    ckpt = JsonCheckpoints(r.dir, {})
    r.start(r.resume(ckpt, {}), {}, 'stand-in run')

    def train(step, lr, seconds=seconds):
      del lr
      clock[0] += seconds
      return 1.0 / (step + 1)
    read[name] = []
    r.fit(0, 25, lambda s: 0.1, train, lambda: [4.0, 2, 3, 4], ckpt,
          fetch=lambda losses: read[name].append(len(losses)) or losses)
    r.close()
    rows = [json.loads(l) for l in open(tmp_path / name / runfiles.METRICS)]
    assert [row['step'] for row in rows if row['split'] == 'train'] == list(
        range(1, 26))
  assert read['fast'] == [1, 9, 10, 5]
  assert read['slow'] == ([1] * 25 if processes == 1 else [1, 9, 10, 5])
