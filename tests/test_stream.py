"""The one data stream (datastream.Stream) every backend trains on: the
order, the few-shot draws with replacement, the shares of processes and
micro-batches, mixup partners, and the per-example augmentation draws."""
import numpy as np
import pytest

from big_transfer import datastream
from bit_pytorch import data as torch_data


def test_epochs_are_permutations_and_small_sets_draw_with_replacement():
  full = datastream.Stream(size=10, batch=4, seed=3)
  stream = np.concatenate([full.indices(s) for s in range(5)])
  assert sorted(stream[:10]) == list(range(10))    # epoch 0
  assert sorted(stream[10:20]) == list(range(10))  # epoch 1
  assert not np.array_equal(stream[:10], stream[10:20])
  # The same step asked again, or out of order, is the same batch.
  np.testing.assert_array_equal(full.indices(3), stream[12:16])
  np.testing.assert_array_equal(datastream.Stream(10, 4, 3).indices(3),
                                stream[12:16])
  assert not np.array_equal(datastream.Stream(10, 4, 4).indices(0), stream[:4])
  small = datastream.Stream(size=6, batch=16, seed=3)
  batch = small.indices(0)
  assert len(batch) == 16 and set(batch) <= set(range(6))
  assert not np.array_equal(batch, small.indices(1))


def test_mixup_partners_and_the_rows_a_share_loads():
  stream = datastream.Stream(20, 6, seed=0, mixup_alpha=0.2)
  assert stream.partner(range(6)).tolist() == [1, 0, 3, 2, 5, 4]
  assert datastream.Stream(20, 5, 0, 0.2).partner(range(5)).tolist() == [
      1, 0, 3, 2, 4]  # an odd last position keeps itself
  assert datastream.Stream(20, 6).partner(range(6)).tolist() == list(range(6))
  rows, partner = stream.rows(1, 4)  # positions 1, 2, 3
  assert rows.tolist() == [1, 2, 3, 0] and partner.tolist() == [3, 2, 1]
  rows, partner = stream.rows(0, 6)
  assert rows.tolist() == list(range(6)) and partner.tolist() == [
      1, 0, 3, 2, 5, 4]
  lams = [stream.lam(s) for s in range(50)]
  assert all(0 <= l <= 1 for l in lams) and len(set(lams)) == 50
  assert datastream.Stream(20, 6).lam(3) == 1.0


@pytest.mark.parametrize('world, split', [(1, 1), (2, 1), (2, 3), (1, 6)])
def test_processes_and_micro_batches_load_the_global_batch(world, split):
  stream = datastream.Stream(20, 6, seed=1, mixup_alpha=0.3)
  whole = list(torch_data.TrainBatches(stream, 0, 3))
  for step in range(3):
    own = []
    for rank in range(world):
      sampler = torch_data.TrainBatches(stream, step, step + 1, rank, world,
                                        split)
      for keys, (rows, partner) in zip(sampler, sampler.layout):
        own += keys[:len(partner)]
        # Each example's partner is among the rows loaded with it.
        assert [keys[r] for r in partner] == [
            whole[step][int(p)] for p in stream.partner(rows[:len(partner)])]
    assert own == whole[step]


def test_augmentation_draws_are_uniform_and_in_range():
  seeds = datastream.Stream(100, 4000, seed=0).aug_seeds(7)
  u = datastream.uniforms(seeds, 0)
  assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.02
  assert abs(np.corrcoef(u, datastream.uniforms(seeds, 1))[0, 1]) < 0.05
  top, left, flip = datastream.crop_flip(seeds, 40, 32)
  assert set(top) == set(left) == set(range(9))
  assert 0.45 < flip.mean() < 0.55
  for seed in seeds[:200]:
    t, l, h, w = datastream.inception_crop(int(seed), 60, 80)
    assert 0 <= t and t + h <= 60 and 0 <= l and l + w <= 80 and h * w > 0
  assert datastream.inception_crop(5, 60, 80) == datastream.inception_crop(
      5, 60, 80)
