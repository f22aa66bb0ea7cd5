"""Pre-logit features of every example of a split (TF2):

  python -m bit_tf2.features --model BiT-M-R50x1 --dataset cifar10 \\
      --split {train,eval} --out features.npz

writes `features` (N, D) and `labels` (N,) in dataset order, at the
HyperRule's evaluation resolution (or --resolution), over every local GPU
(MirroredStrategy, XLA) or the CPU. Reads `.npz` and the published `.h5`
files. The shared part is big_transfer.fewshot.
"""
import sys

import numpy as np
import tensorflow as tf

from big_transfer import datasets, fewshot, loader
from bit_tf2 import models

NAME = 'tf2'


def load_data(args, logger):
  return fewshot.splits_of(datasets.load(args, logger))


class FeatureModel:
  """model(images) -> features: NHWC numpy images (uint8, or float32 in
  [-1, 1]) to numpy pre-logits (N, D); the batch is split over the local
  GPUs."""

  def __init__(self, weights, devices=None):
    gpus = [d.name for d in tf.config.list_logical_devices('GPU')]
    devices = devices or gpus
    self.strategy = (tf.distribute.MirroredStrategy(devices)
                     if len(devices) > 1 else tf.distribute.get_strategy())
    self.devices = self.strategy.num_replicas_in_sync
    with self.strategy.scope():
      model = models.create('weights', weights=weights)
    self._features = tf.function(model.features, jit_compile=bool(gpus),
                                 reduce_retracing=True)

  def __call__(self, images):
    images = np.asarray(images)
    if self.devices == 1:
      return self._features(images).numpy()
    n = len(images)
    per = fewshot.round_up(n, self.devices) // self.devices
    images = np.concatenate([images, np.zeros(
        (per * self.devices - n, *images.shape[1:]), images.dtype)])
    shards = self.strategy.experimental_distribute_values_from_function(
        lambda ctx: images[ctx.replica_id_in_sync_group * per:][:per])
    out = self.strategy.run(self._features, args=(shards,))
    return self.strategy.gather(out, axis=0).numpy()[:n]


load_model = FeatureModel


def feature_batches(model, splits, split, crop, batch, args):
  """(features, labels) of `split` in order (big_transfer.loader)."""
  for b in loader.eval_batches(fewshot.source_of(splits, split),
                               fewshot.round_up(batch, model.devices), crop,
                               workers=args.workers):
    yield model(b['image'])[b['mask']], b['label'][b['mask']]


argparser, main, cli = fewshot.features_command(sys.modules[__name__])

if __name__ == '__main__':
  cli()
