"""BiT-HyperRule: the one fine-tuning recipe of the BiT paper.

Given only the dataset's size and its images' resolution, it fixes the input
resolution, the schedule length and learning-rate steps, and whether mixup is
used. Every backend asks this module; none re-implements it.
"""
import statistics

# Original image resolution (height, width) of the datasets the CLI knows.
KNOWN_DATASET_RESOLUTIONS = {
    'cifar10': (32, 32),
    'cifar100': (32, 32),
    'oxford_iiit_pet': (224, 224),
    'oxford_flowers102': (224, 224),
    'imagenet2012': (224, 224),
}

SMALL_AREA = 96 * 96     # below this, images are "small"
SMALL_DATA = 20_000      # below this many examples: short schedule, no mixup
MEDIUM_DATA = 500_000    # below this: medium schedule, from here: long one
MIXUP_ALPHA = 0.1


def get_resolution(original_resolution):
  """(resize, crop) for images of the given (height, width)."""
  area = original_resolution[0] * original_resolution[1]
  return (160, 128) if area < SMALL_AREA else (512, 480)


def resolution(original_resolution, resize_size=None, crop_size=None):
  """(resize, crop) for images of (height, width) `original_resolution`,
  with the --resize_size/--crop_size overrides: a crop given alone keeps
  the HyperRule's ratio of resize to crop. Evaluation uses the crop."""
  resize, crop = get_resolution(original_resolution)
  if crop_size and not resize_size:
    resize = max(crop_size, round(crop_size * resize / crop))
  return resize_size or resize, crop_size or crop


def get_resolution_from_dataset(dataset):
  if dataset not in KNOWN_DATASET_RESOLUTIONS:
    raise ValueError(f'Unknown dataset {dataset!r}: give its images\' sizes '
                     'to get_resolution_from_image_sizes instead.')
  return get_resolution(KNOWN_DATASET_RESOLUTIONS[dataset])


def typical_size(sizes):
  """The median height and width of images of (height, width) `sizes`, so
  that a few odd images do not decide."""
  sizes = list(sizes)
  if not sizes:
    raise ValueError('No image sizes given.')
  return (statistics.median(s[0] for s in sizes),
          statistics.median(s[1] for s in sizes))


def get_resolution_from_image_sizes(sizes):
  """(resize, crop) for a custom dataset, from its images' (height, width)s."""
  return get_resolution(typical_size(sizes))


def get_mixup(dataset_size):
  return 0.0 if dataset_size < SMALL_DATA else MIXUP_ALPHA


def get_schedule(dataset_size, total_steps=None):
  """Steps at which the lr changes: [end of warm-up, decays..., end].

  With `total_steps`, the published schedule is stretched or compressed to
  end there, keeping its shape.
  """
  if dataset_size < SMALL_DATA:
    supports = [100, 200, 300, 400, 500]
  elif dataset_size < MEDIUM_DATA:
    supports = [500, 3000, 6000, 9000, 10_000]
  else:
    supports = [500, 6000, 12_000, 18_000, 20_000]
  if total_steps is None:
    return supports
  if total_steps < 1:
    raise ValueError(f'total_steps must be positive, got {total_steps}.')
  scaled = [max(1, round(s * total_steps / supports[-1])) for s in supports[:-1]]
  return scaled + [total_steps]


def get_lr(step, dataset_size, base_lr=0.003, total_steps=None):
  """Learning rate at `step`, or None once training is over.

  Linear warm-up to `base_lr`, then divided by 10 after each decay point.
  """
  supports = get_schedule(dataset_size, total_steps)
  if step < supports[0]:
    return base_lr * step / supports[0]
  if step >= supports[-1]:
    return None
  for s in supports[1:]:
    if s < step:
      base_lr /= 10
  return base_lr
