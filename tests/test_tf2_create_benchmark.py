"""benchmarks.tf2_create: both ways of creating bit_tf2's model are timed,
the peer's with each GroupNormReLU compiling a function of its own at the
creating call (as the layers did before) and the shipped one with none,
and the layer's own methods are back in place afterwards."""
from benchmarks import tf2_create


def test_both_creations_are_timed_and_only_the_peer_compiles(monkeypatch):
  from bit_tf2 import models  # pylint: disable=import-outside-toplevel
  shipped = models.GroupNormReLU.call, models.GroupNormReLU.build
  made = []
  create = models.create

  def spy(*args, **kwargs):
    made.append(create(*args, **kwargs))
    return made[-1]

  monkeypatch.setattr(models, 'create', spy)
  shared = models.group_norm_relu_cpu_xla.experimental_get_tracing_count()
  [row] = tf2_create.main(['--archs', 'R14x0.5', '--reps', '1'])
  assert row['arch'] == 'R14x0.5' and row['reps'] == 1
  assert row['shipped_s'] > 0 and row['compiled_at_creation_s'] > 0
  assert row['ratio'] == round(row['compiled_at_creation_s'] /
                               row['shipped_s'], 2)
  assert (models.GroupNormReLU.call, models.GroupNormReLU.build) == shipped
  # The warm-up model, then the shipped one and the peer's, in turn: only
  # the peer's layers traced (each its own function, once), and the
  # shipped layers' shared function was not traced.
  assert len(made) == 3
  assert (models.group_norm_relu_cpu_xla.experimental_get_tracing_count()
          == shared)
  peer = [l._compiled.experimental_get_tracing_count()  # pylint: disable=protected-access
          for l in made[2]._flatten_layers()  # pylint: disable=protected-access
          if isinstance(l, models.GroupNormReLU)]
  assert len(peer) > 5 and set(peer) == {1}
