"""BiT-HyperRule, value for value, against hand-computed numbers."""
import pytest

import bit_hyperrule as hr


@pytest.mark.parametrize('hw, expected', [
    ((32, 32), (160, 128)),
    ((95, 96), (160, 128)),     # 9120 < 9216
    ((96, 96), (512, 480)),     # exactly 96x96: large
    ((48, 192), (512, 480)),    # area 9216 with a different shape
    ((224, 224), (512, 480)),
])
def test_resolution_boundary(hw, expected):
  assert hr.get_resolution(hw) == expected


def test_resolution_of_known_datasets():
  assert hr.get_resolution_from_dataset('cifar10') == (160, 128)
  assert hr.get_resolution_from_dataset('oxford_iiit_pet') == (512, 480)
  with pytest.raises(ValueError):
    hr.get_resolution_from_dataset('mnist')


def test_resolution_from_image_sizes_uses_the_median():
  small = [(32, 32)] * 5 + [(1000, 1000)] * 2
  assert hr.get_resolution_from_image_sizes(small) == (160, 128)
  assert hr.get_resolution_from_image_sizes([(300, 200)] * 3) == (512, 480)
  assert hr.typical_size([(10, 20), (30, 40), (1000, 1000)]) == (30, 40)
  with pytest.raises(ValueError):
    hr.typical_size([])


@pytest.mark.parametrize('size, mixup, schedule', [
    (1, 0.0, [100, 200, 300, 400, 500]),
    (19_999, 0.0, [100, 200, 300, 400, 500]),
    (20_000, 0.1, [500, 3000, 6000, 9000, 10_000]),
    (499_999, 0.1, [500, 3000, 6000, 9000, 10_000]),
    (500_000, 0.1, [500, 6000, 12_000, 18_000, 20_000]),
    (1_281_167, 0.1, [500, 6000, 12_000, 18_000, 20_000]),
])
def test_schedule_and_mixup_boundaries(size, mixup, schedule):
  assert hr.get_mixup(size) == mixup
  assert hr.get_schedule(size) == schedule


def test_lr_warmup_steps_and_end():
  base = 0.003
  n = 50_000   # medium schedule [500, 3000, 6000, 9000, 10000]
  assert hr.get_lr(0, n, base) == 0
  assert hr.get_lr(250, n, base) == pytest.approx(0.0015)
  assert hr.get_lr(499, n, base) == pytest.approx(0.003 * 499 / 500)
  assert hr.get_lr(500, n, base) == pytest.approx(0.003)
  # A decay point takes effect on the step after it (`s < step`).
  assert hr.get_lr(3000, n, base) == pytest.approx(0.003)
  assert hr.get_lr(3001, n, base) == pytest.approx(0.0003)
  assert hr.get_lr(6000, n, base) == pytest.approx(0.0003)
  assert hr.get_lr(6001, n, base) == pytest.approx(0.00003)
  assert hr.get_lr(9001, n, base) == pytest.approx(0.000003)
  assert hr.get_lr(9999, n, base) == pytest.approx(0.000003)
  assert hr.get_lr(10_000, n, base) is None
  assert hr.get_lr(12_345, n, base) is None
  assert hr.get_lr(50, 100, 0.01) == pytest.approx(0.005)  # small schedule


def test_total_steps_keeps_the_shape():
  assert hr.get_schedule(1000, total_steps=1000) == [200, 400, 600, 800, 1000]
  assert hr.get_schedule(50_000, total_steps=100) == [5, 30, 60, 90, 100]
  assert hr.get_schedule(1000, total_steps=3) == [1, 1, 2, 2, 3]
  assert hr.get_lr(99, 50_000, 1.0, total_steps=100) == pytest.approx(0.001)
  assert hr.get_lr(100, 50_000, 1.0, total_steps=100) is None
  with pytest.raises(ValueError):
    hr.get_schedule(1000, total_steps=0)
