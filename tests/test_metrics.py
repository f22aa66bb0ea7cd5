"""The evaluation rule (big_transfer.metrics): top-k with ties broken by
class index, the same in NumPy and in each engine's kernel."""
import numpy as np
import pytest

from big_transfer import metrics

# 7 classes; rows chosen for ties: all equal, the label tied with classes
# before and after it, a clear hit, a clear miss, and ties around rank 5.
LOGITS = np.array([
    [0., 0., 0., 0., 0., 0., 0.],
    [0., 0., 0., 0., 0., 0., 0.],
    [1., 3., 3., 3., 0., 0., 0.],
    [1., 3., 3., 3., 0., 0., 0.],
    [9., 1., 2., 3., 4., 5., 6.],
    [9., 1., 2., 3., 4., 5., 6.],
    [2., 2., 2., 2., 2., 2., 1.],
    [2., 2., 2., 2., 2., 2., 1.],
], np.float32)
LABELS = np.array([0, 3, 1, 3, 0, 1, 4, 5])
# Classes ranking above each label, counted by hand from the rule.
RANKS = [0, 3, 0, 2, 0, 6, 4, 5]
MASK = np.array([True, True, True, True, True, True, True, False])


def test_rank_by_hand():
  np.testing.assert_array_equal(metrics.label_rank(LOGITS, LABELS), RANKS)


def test_equal_logits_score_at_chance():
  logits = np.zeros((10, 10))
  sums = metrics.batch_sums(logits, np.arange(10))
  result = metrics.summarize(sums)
  assert result['top1'] == pytest.approx(0.1)
  assert result['top5'] == pytest.approx(0.5)
  assert result['loss'] == pytest.approx(np.log(10))


def test_batch_sums_by_hand():
  sums = metrics.batch_sums(LOGITS, LABELS, MASK)
  ranks = np.array(RANKS)[MASK]
  log_z = np.log(np.exp(LOGITS[MASK].astype(np.float64)).sum(1))
  loss = log_z - LOGITS[MASK][np.arange(MASK.sum()), LABELS[MASK]]
  np.testing.assert_allclose(
      sums, [loss.sum(), (ranks < 1).sum(), (ranks < 5).sum(), MASK.sum()])


def _engine_sums(backend):
  if backend == 'pytorch':
    import torch  # pylint: disable=import-outside-toplevel
    import torch.nn.functional as F  # pylint: disable=import-outside-toplevel
    from bit_pytorch import engine  # pylint: disable=import-outside-toplevel
    keep = np.flatnonzero(MASK)  # PyTorch's loaders have no padding rows
    return engine.eval_sums(torch.tensor(LOGITS[keep]),
                            torch.tensor(LABELS[keep]),
                            F.cross_entropy).numpy()
  if backend == 'tf2':
    from bit_tf2 import engine  # pylint: disable=import-outside-toplevel
    return engine.eval_sums(LOGITS, LABELS, MASK).numpy()
  import jax  # pylint: disable=import-outside-toplevel
  from bit_jax import engine  # pylint: disable=import-outside-toplevel
  return np.asarray(jax.jit(engine.eval_sums)(LOGITS, LABELS, MASK))


@pytest.mark.parametrize('backend', ['pytorch', 'tf2', 'jax'])
def test_each_engine_follows_the_rule(backend):
  np.testing.assert_allclose(_engine_sums(backend),
                             metrics.batch_sums(LOGITS, LABELS, MASK),
                             rtol=1e-6)
