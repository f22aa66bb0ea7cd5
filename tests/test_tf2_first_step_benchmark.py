"""benchmarks.tf2_first_step: bit_tf2's first training step timed both
ways, its GroupNorm layers sharing one compiled function (as shipped) and
each compiling its own, in turn, each in a process of its own (here, in
this one), with the loss both ways."""
from benchmarks import measure, tf2_first_step


def test_both_ways_are_timed_in_turn_and_train_alike(monkeypatch):
  from bit_tf2 import models  # pylint: disable=import-outside-toplevel
  shipped = models.GroupNormReLU.build
  calls = []

  def in_this_process(module, function, args, options=None, **kwargs):
    del options, kwargs
    calls.append((module, function, args[-1]))
    return getattr(tf2_first_step, function)(*args)

  monkeypatch.setattr(measure, 'run_in_subprocess', in_this_process)
  [row] = tf2_first_step.main(['--archs', 'R14x0.5', '--resolution', '32',
                               '--batch', '4', '--steps', '2', '--reps', '1'])
  assert calls == [('tf2_first_step', 'first_step', way)
                   for way in tf2_first_step.WAYS]
  assert models.GroupNormReLU.build is shipped
  assert row['arch'] == 'R14x0.5' and row['reps'] == 1
  for way in tf2_first_step.WAYS:
    assert row[f'{way}_first_step_s'] > row[f'{way}_step_ms'] / 1e3 > 0
  assert row['first_step_ratio'] == round(
      row['per_layer_first_step_s'] / row['shared_first_step_s'], 2)
  assert row['same_loss'] is True
