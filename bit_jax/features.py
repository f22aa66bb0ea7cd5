"""Pre-logit features of every example of a split (JAX):

  python -m bit_jax.features --model BiT-M-R50x1 --dataset cifar10 \\
      --split {train,eval} --out features.npz

writes `features` (N, D) and `labels` (N,) in dataset order, at the
HyperRule's evaluation resolution (or --resolution), the batch sharded over
every local device. The shared part is big_transfer.fewshot.
"""
import sys

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from big_transfer import datasets, fewshot
from bit_jax import models

NAME = 'jax'


def load_data(args, logger):
  return fewshot.splits_of(datasets.load(args, logger))


class FeatureModel:
  """model(images) -> features: NHWC numpy images (uint8, or float32 in
  [-1, 1]) to numpy pre-logits (N, D), jitted, the batch sharded over local
  devices."""

  def __init__(self, weights):
    module, params = models.create('weights', weights=weights)
    self.devices = len(jax.local_devices())
    mesh = Mesh(np.array(jax.local_devices()), ('data',))
    replicated = NamedSharding(mesh, P())
    self.params = jax.device_put(params, replicated)
    self._apply = jax.jit(
        lambda p, x: module.apply({'params': p}, x, pre_logits=True),
        in_shardings=(replicated, NamedSharding(mesh, P('data'))),
        out_shardings=replicated)

  def __call__(self, images):
    features = self._apply(self.params, fewshot.padded(images, self.devices))
    return np.asarray(jax.device_get(features))[:len(images)]


load_model = FeatureModel
feature_batches = fewshot.loader_feature_batches


argparser, main, cli = fewshot.features_command(sys.modules[__name__])

if __name__ == '__main__':
  cli()
