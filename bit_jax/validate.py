"""Evaluates a BiT model on a dataset's evaluation split, without training:

  python -m bit_jax.validate --ckpt_path BiT-M-R50x1-run0-dtd \\
      --dataset vtab:dtd --datadir ~/tensorflow_datasets

--ckpt_path takes a published-layout .npz (e.g. a run's model.npz), a
registered model name or hf-hub:ORG/NAME. Prints (and with --output writes)
{"loss", "top1", "top5", "n"} as JSON, as bit_pytorch.validate does.
"""
from big_transfer import errors, validate
from bit_jax import predict


def argparser():
  return validate.argparser('JAX', precisions=('fp32',))


def main(args):
  return validate.main_numpy(args, predict.load_model)


def cli(argv=None):
  errors.run_cli(lambda: main(argparser().parse_args(argv)))


if __name__ == '__main__':
  cli()
