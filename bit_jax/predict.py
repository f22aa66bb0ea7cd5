"""Classify images with a BiT model: python -m bit_jax.predict IMAGES..."""
import jax

from big_transfer import errors, predict
from bit_jax import models


def load_model(weights):
  """(head size, logits function) of the model in `weights`, jitted."""
  model, params = models.create('weights', weights=weights)
  apply = jax.jit(model.apply)

  def logits_fn(images):  # NHWC: uint8, or float32 in [-1, 1]
    return jax.device_get(apply({'params': params}, images))

  return int(weights['resnet/head/conv2d/bias'].shape[0]), logits_fn


def main(args):
  return predict.predict(args, load_model)


if __name__ == '__main__':
  errors.run_cli(
      lambda: main(predict.predict_argparser('JAX').parse_args()))
