"""Pre-logit features of every example of a split (TF2):

  python -m bit_tf2.features --model BiT-M-R50x1 --dataset cifar10 \\
      --split {train,eval} --out features.npz

writes `features` (N, D) and `labels` (N,) in dataset order, at the
HyperRule's evaluation resolution (or --resolution), over the devices the
trainer uses (every local GPU, with XLA, or the CPU). Reads `.npz` and the
published `.h5` files. The shared part is big_transfer.fewshot.
"""
import sys

import tensorflow as tf

from big_transfer import datasets, fewshot
from bit_tf2 import engine, models

NAME = 'tf2'


def load_data(args, logger):
  return fewshot.splits_of(datasets.load(args, logger))


class FeatureModel:
  """model(images) -> features: NHWC numpy images (uint8, or float32 in
  [-1, 1]) to numpy pre-logits (N, D); the batch is split over the
  replicas of the trainer's strategy on this process's own devices
  (bit_tf2.engine.make_strategy: every local GPU, or the logical CPU
  devices; TF_CONFIG's other workers are not joined), XLA-compiled on
  GPUs."""

  def __init__(self, weights):
    self.strategy = engine.make_strategy(workers=False)
    self.devices = self.strategy.num_replicas_in_sync
    with self.strategy.scope():
      model = models.create('weights', weights=weights)
    features = tf.function(
        model.features,
        jit_compile=engine.device_kind(self.strategy) != 'CPU')
    self._features = tf.function(lambda batch: self.strategy.run(
        features, args=(batch['image'],)), reduce_retracing=True)

  def __call__(self, images):
    batch = {'image': fewshot.padded(images, self.devices)}
    out = self._features(engine.to_replicas(self.strategy, batch))
    return self.strategy.gather(out, axis=0).numpy()[:len(images)]


load_model = FeatureModel
feature_batches = fewshot.loader_feature_batches


argparser, main, cli = fewshot.features_command(sys.modules[__name__])

if __name__ == '__main__':
  cli()
