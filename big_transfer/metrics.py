"""The evaluation rule, one for training evaluation, validation and
distillation in every backend:

  top-k: an example is a hit when fewer than k classes rank above its label,
  a class ranking above another when its logit is larger, or equal with a
  smaller class index (ties broken by index, as argmax does). A model whose
  logits are all equal scores at chance, never 100%.

An evaluation sums, over its examples, [cross-entropy, top-1 hits, top-5
hits, examples]; `summarize` turns the sums into the reported means. Each
engine computes the sums on its device (bit_*/engine.py, `eval_sums`);
`batch_sums` here is the same rule in NumPy, the reference they are tested
against.
"""
import numpy as np

from big_transfer.errors import BadInput

TOP_K = (1, 5)


def label_rank(logits, labels):
  """int [b]: how many classes rank above each label (see the rule)."""
  logits = np.asarray(logits)
  labels = np.asarray(labels, np.int64)
  mine = logits[np.arange(len(labels)), labels][:, None]
  lower_index = np.arange(logits.shape[1])[None, :] < labels[:, None]
  return ((logits > mine) | ((logits == mine) & lower_index)).sum(1)


def batch_sums(logits, labels, mask=None):
  """[summed cross-entropy, top-1 hits, top-5 hits, examples] of logits
  [b, classes] and int labels [b], in float64; rows with mask False left
  out."""
  logits = np.asarray(logits, np.float64)
  labels = np.asarray(labels, np.int64)
  if mask is not None:
    mask = np.asarray(mask, bool)
    logits, labels = logits[mask], labels[mask]
  if not len(labels):
    return np.zeros(4)
  top = logits.max(1, keepdims=True)
  log_z = top[:, 0] + np.log(np.exp(logits - top).sum(1))
  loss = log_z - logits[np.arange(len(labels)), labels]
  rank = label_rank(logits, labels)
  return np.array([loss.sum(), *((rank < k).sum() for k in TOP_K),
                   len(labels)], np.float64)


def summarize(sums):
  """{loss, top1, top5, n} from the sums [loss, top-1 hits, top-5 hits,
  examples] of an evaluation."""
  loss, top1, top5, n = (float(v) for v in sums)
  if not n:
    raise BadInput('the evaluation split has no examples.')
  return dict(loss=loss / n, top1=top1 / n, top5=top5 / n, n=int(n))
