"""The data stream: what every trainer (in every backend, on any number of
processes and devices, with any --batch_split) trains on at each step, as
numpy from (seed, step) alone; and the per-example random draws (crop, flip,
Inception crop) that every backend's pre-processing takes from it.
"""
import numpy as np

from big_transfer.errors import BadInput

# Tags that keep the random streams of one seed apart.
_ORDER, _AUG, _MIXUP = 1, 2, 3


class Stream:
  """The examples of every training step, as numpy, from (seed, step) alone.

  Position p of the global batch at step s holds example
  `indices(s)[p]`: epoch e visits the `size` examples in the order of a
  permutation drawn from (seed, e), and the batches cut that endless
  sequence into runs of `batch`; a training set smaller than one batch is
  drawn from with replacement at every step instead (few-shot runs). Each
  position also has an augmentation seed (`aug_seeds(s)[p]`, from which
  `crop_flip` and other augmentations draw), and with mixup on, one lambda
  per step (`lam(s)`) and a partner: positions 2k and 2k+1 are mixed with
  each other (the order is random, so these are random pairs; an odd last
  position keeps itself).

  A process or device that trains on positions [lo, hi) loads `rows(lo,
  hi)`: those positions, then the partners outside them.
  """

  def __init__(self, size, batch, seed=0, mixup_alpha=0.0):
    if size < 1:
      raise BadInput('the training set is empty.')
    self.size, self.batch, self.seed = size, batch, seed
    self.mixup_alpha = float(mixup_alpha or 0.0)
    self._epochs = {}

  def _permutation(self, epoch):
    if epoch not in self._epochs:
      if len(self._epochs) > 1:  # a batch spans at most two epochs
        self._epochs.pop(min(self._epochs))
      self._epochs[epoch] = np.random.default_rng(
          [self.seed, _ORDER, epoch]).permutation(self.size)
    return self._epochs[epoch]

  def indices(self, step):
    """int64 [batch]: the example at each position of step `step`."""
    if self.size < self.batch:
      return np.random.default_rng([self.seed, _ORDER, step]).integers(
          0, self.size, self.batch)
    pos = np.arange(step * self.batch, (step + 1) * self.batch)
    out = np.empty(self.batch, np.int64)
    for epoch in np.unique(pos // self.size):
      sel = pos // self.size == epoch
      out[sel] = self._permutation(int(epoch))[pos[sel] % self.size]
    return out

  def aug_seeds(self, step):
    """uint64 [batch]: each position's augmentation seed."""
    return np.random.default_rng([self.seed, _AUG, step]).integers(
        0, 2**63, self.batch, dtype=np.uint64)

  def lam(self, step):
    """The mixup weight of step `step` (1.0 when mixup is off)."""
    if not self.mixup_alpha:
      return 1.0
    return float(np.random.default_rng([self.seed, _MIXUP, step]).beta(
        self.mixup_alpha, self.mixup_alpha))

  def partner(self, positions):
    """The mixup partner of each of `positions` (itself when mixup is off)."""
    positions = np.asarray(positions, np.int64)
    if not self.mixup_alpha:
      return positions
    other = positions ^ 1
    return np.where(other < self.batch, other, positions)

  def rows(self, lo, hi):
    """(positions to load, row of each own position's partner among them)
    for a share [lo, hi) of the global batch: the own positions first, then
    the partners outside the share."""
    own = np.arange(lo, hi, dtype=np.int64)
    partners = self.partner(own)
    load = np.concatenate([own, np.setdiff1d(partners, own)])
    row = {int(p): r for r, p in enumerate(load)}
    return load, np.array([row[int(p)] for p in partners], np.int64)


def uniforms(seeds, k):
  """The k-th uniform number in [0, 1) of each of `seeds` (uint64 array):
  splitmix64 of the seed and k, the same in every backend."""
  with np.errstate(over='ignore'):
    z = np.asarray(seeds, np.uint64) + np.uint64(k + 1) * np.uint64(
        0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
  return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def crop_flip(seeds, resize, crop):
  """(top, left, flip) of the HyperRule's random crop of a (resize, resize)
  image to (crop, crop) and its random left-right flip, for each seed."""
  top, left = (np.floor(uniforms(seeds, k) * (resize - crop + 1)).astype(
      np.int64) for k in (0, 1))
  return top, left, uniforms(seeds, 2) < 0.5


def inception_crop(seed, height, width, scale=(0.08, 1.0),
                   ratio=(3 / 4, 4 / 3), attempts=10):
  """(top, left, crop height, crop width) of an Inception-style random crop
  of a (height, width) image, drawn from `seed`: a box covering a random
  share `scale` of the area with a random aspect ratio in `ratio` (log
  uniform), tried `attempts` times; else the largest central box whose
  aspect ratio is within `ratio`."""
  area = height * width
  for a in range(attempts):
    u = uniforms([seed], np.arange(4 * a, 4 * a + 4))
    target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
    aspect = np.exp(np.log(ratio[0]) + np.log(ratio[1] / ratio[0]) * u[1])
    w = int(round(np.sqrt(target * aspect)))
    h = int(round(np.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return (int(u[2] * (height - h + 1)), int(u[3] * (width - w + 1)), h, w)
  aspect = width / height
  if aspect < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif aspect > ratio[1]:
    w, h = int(round(height * ratio[1])), height
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w
