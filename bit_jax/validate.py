"""Evaluates a BiT model on a dataset's evaluation split, without training:

  python -m bit_jax.validate --ckpt_path BiT-M-R50x1-run0-dtd \\
      --dataset vtab:dtd --datadir ~/tensorflow_datasets

--ckpt_path takes a published-layout .npz (e.g. a run's model.npz), a
registered model name or hf-hub:ORG/NAME. Prints (and with --output writes)
{"loss", "top1", "top5", "n"} as JSON, as bit_pytorch.validate does.
"""
import bit_common
import bit_validate
import bit_zoo
from bit_jax import predict


def argparser():
  return bit_validate.argparser('JAX', precisions=('fp32',))


def main(args):
  return bit_validate.main_tf_data(args, predict.load_model,
                                   bit_zoo.load_weights)


def cli(argv=None):
  bit_common.run_cli(lambda: main(argparser().parse_args(argv)))


if __name__ == '__main__':
  cli()
