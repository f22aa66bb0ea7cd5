"""The pre-processing of one example, in PIL: the same pixels for every
reader that decodes on the host (PyTorch's DataLoader and the JAX loader,
big_transfer.loader). Each view takes a PIL RGB image (train_view also a
held one: a uint8 array resized already) and returns uint8 (height, width,
3); where it is random, the draws are those of the example's augmentation
seed in the data stream (big_transfer.datastream).
train_example and eval_example give the view of a dataset's example.

  train_view      the BiT-HyperRule's: resize to (resize, resize), crop
                  (crop, crop) at the seed's place, flip when it says
  eval_view       resize to (crop, crop)
  inception_view  distillation's: the Inception crop of the seed, resized
                  to (size, size), flipped when the seed's 40th uniform is
                  under 0.5
  upright_size    the (height, width) of an image as the views see it

Resizing is PIL's bilinear filter, which averages over the source pixels
when it shrinks (antialiasing). train_view resizes the whole image, then
crops, so that its views are exactly those of a held image's
(big_transfer.held).
"""
import numpy as np
from PIL import ExifTags, Image

from big_transfer import datastream

# The uniform of an example's seed that decides the Inception view's flip
# (the crop's box draws from the first 40).
INCEPTION_FLIP_UNIFORM = 40


def upright_size(image):
  """(height, width) of an opened PIL `image` as it is seen decoded
  (big_transfer.datasets.decode), upright: swapped where its EXIF
  Orientation tag turns it a quarter (5 to 8). Reads the header only: a
  PNG's EXIF is seen where it comes before the pixels, as PIL writes it
  (to look further, PIL would decode the whole file)."""
  turned = (image.format != 'PNG' or 'exif' in image.info) and (
      image.getexif().get(ExifTags.Base.Orientation) in (5, 6, 7, 8))
  return (image.width, image.height) if turned else (image.height,
                                                      image.width)


def train_view(image, seed, resize, crop):
  (top,), (left,), (flip,) = datastream.crop_flip([seed], resize, crop)
  if isinstance(image, np.ndarray):  # held (big_transfer.held): resized
    view = image[top:top + crop, left:left + crop]
    # A copy even where the crop is the whole image: the held file is
    # mapped read-only, and torch.from_numpy wants memory it may write.
    return np.array(view[:, ::-1] if flip else view, order='C')
  image = image.resize((resize, resize), Image.BILINEAR)
  image = image.crop((left, top, left + crop, top + crop))
  if flip:
    image = image.transpose(Image.FLIP_LEFT_RIGHT)
  return np.array(image, np.uint8)


def eval_view(image, crop):
  return np.array(image.resize((crop, crop), Image.BILINEAR), np.uint8)


def inception_view(image, seed, size, scale):
  top, left, h, w = datastream.inception_crop(seed, image.height, image.width,
                                              tuple(scale))
  image = image.crop((left, top, left + w, top + h)).resize(
      (size, size), Image.BILINEAR)
  if datastream.uniforms([seed], INCEPTION_FLIP_UNIFORM)[0] < 0.5:
    image = image.transpose(Image.FLIP_LEFT_RIGHT)
  return np.array(image, np.uint8)


def train_example(source, i, seed, resize, crop, crop_scale=None):
  """(uint8 (crop, crop, 3), int label): train_view of example i of
  `source` (a datasets.Source), or with `crop_scale` its inception_view."""
  image, label = source.example(i)
  if crop_scale:
    return inception_view(image, seed, crop, crop_scale), label
  return train_view(image, seed, resize, crop), label


def eval_example(source, i, crop):
  """(uint8 (crop, crop, 3), int label): eval_view of example i of
  `source`."""
  image, label = source.example(i)
  return eval_view(image, crop), label
