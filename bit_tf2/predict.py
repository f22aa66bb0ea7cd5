"""Classify images with a BiT model: python -m bit_tf2.predict IMAGES...

Reads `.npz` and the published Keras-2 `.h5` files (--model may be a path
to either)."""
import tensorflow as tf

from big_transfer import errors, predict
from bit_tf2 import models


def load_model(weights):
  """(head size, logits function) of the model in `weights`."""
  model = models.create('weights', weights=weights)

  @tf.function(reduce_retracing=True,
               jit_compile=bool(tf.config.list_logical_devices('GPU')))
  def logits(images):  # NHWC: float32 in [-1, 1], or uint8
    return model(images, training=False)

  return model.head_size, lambda images: logits(images).numpy()


def main(args):
  return predict.predict(args, load_model)


if __name__ == '__main__':
  errors.run_cli(
      lambda: main(predict.predict_argparser('TF2').parse_args()))
