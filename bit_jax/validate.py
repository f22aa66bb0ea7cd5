"""Evaluates a BiT model on a dataset's evaluation split, without training:

  python -m bit_jax.validate --ckpt_path BiT-M-R50x1-run0-dtd \\
      --dataset vtab:dtd --datadir ~/tensorflow_datasets

--ckpt_path takes a published-layout .npz (e.g. a run's model.npz), a
registered model name or hf-hub:ORG/NAME. Prints (and with --output writes)
{"loss", "top1", "top5", "n"} as JSON, as bit_pytorch.validate does.
"""
import numpy as np

import bit_common
import bit_hyperrule
import bit_validate
import bit_zoo
import input_pipeline_tf2_or_jax as pipeline
from bit_jax import predict


def argparser():
  return bit_validate.argparser('JAX', precisions=('fp32',))


def evaluate(logits_fn, data, batch, crop):
  """[summed loss, top-1 hits, top-5 hits, n] over the evaluation split."""
  sums = np.zeros(4)
  for b in pipeline.named_errors(pipeline.eval_batches(
      data, batch, crop).as_numpy_iterator(), pipeline.eval_files(data)):
    sums += bit_validate.batch_sums(logits_fn(b['image']), b['label'],
                                    b['mask'])
  return sums


def main(args):
  bit_validate.check(args)
  logger = bit_validate.logger()
  data = pipeline.load(args, logger)
  weights = bit_zoo.load_weights(args.ckpt_path, args.bit_pretrained_dir)
  head_size, logits_fn = predict.load_model(weights)
  bit_validate.check_head(head_size, data.classes or range(data.num_classes),
                          args)
  crop = args.crop_size or bit_hyperrule.get_resolution(data.original_hw)[1]
  logger.info(f'evaluating {args.ckpt_path} on {data.eval_size} '
              f'{args.dataset} images at {crop} px')
  result = bit_validate.summarize(evaluate(logits_fn, data, args.batch_eval,
                                           crop))
  return bit_validate.report(result, args)


def cli(argv=None):
  bit_common.run_cli(lambda: main(argparser().parse_args(argv)))


if __name__ == '__main__':
  cli()
