"""What the three validation commands share: their command line, the
metrics of an evaluation, and how the result is reported.

  python -m bit_{pytorch,tf2,jax}.validate --ckpt_path FILE_OR_NAME \\
      --dataset DATASET [--datadir D] [--eval_split S] [--crop_size N]

print {"loss", "top1", "top5", "n"} as one line of JSON: the mean
cross-entropy and the top-1 / top-5 accuracy over every example of the
evaluation split.
"""
import json
import os

import numpy as np

from big_transfer import datasets, errors, flags, metrics, runfiles, zoo


def argparser(framework, precisions=('fp32', 'bf16', 'fp16'),
              checkpoint_help=''):
  """The validation command line of `framework` ('PyTorch', 'TF2', 'JAX')."""
  parent, g = flags.group('evaluation')
  g.add_argument('--ckpt_path', required=True,
                 help=checkpoint_help + 'A .npz file (a run\'s model.npz), a '
                 'published .h5, a run folder, a registered model name (e.g. '
                 'BiT-M-R50x1-run0-dtd) or hf-hub:ORG/NAME.')
  g.add_argument('--crop_size', type=int, default=None,
                 help='Evaluation resolution (default: the one the checkpoint '
                 'was trained at where known: a run folder, its model.npz, a '
                 'bit.pth.tar; else the HyperRule\'s for the dataset).')
  g.add_argument('--batch_eval', type=int, default=64,
                 help='Evaluation batch size.')
  g.add_argument('--output', default=None,
                 help='Also write the result to this JSON file.')
  parser = flags.parser(
      f'Evaluate a BiT model on a dataset ({framework}).', parent,
      flags.pretrained_dir(), flags.dataset(), flags.loading(),
      flags.precision(precisions))
  # The data loaders read these training flags; validation uses every
  # example of the evaluation split.
  parser.set_defaults(examples_per_class=None, examples_per_class_seed=0)
  return parser


def check(args):
  """Refuses flag values that cannot work (BadInput), and a --ckpt_path that
  names nothing loadable, before the dataset is read."""
  if args.ckpt_path.endswith(('.pth', '.tar')):  # bit_pytorch.train's
    if not os.path.isfile(args.ckpt_path):
      raise errors.BadInput(f'checkpoint {args.ckpt_path} does not exist.')
  else:
    zoo.check_model(args.ckpt_path)
  datasets.check_source(args)
  flags.check_at_least(args, ('batch_eval', 'crop_size'))
  flags.check_at_least(args, ('workers',), 0)
  if args.output:
    runfiles.check_out(args.output, '--output')


def start(args):
  """The command's logger, once `args` pass check and the weights are
  local (zoo.fetch: a failed download is reported before the data is
  read)."""
  check(args)
  zoo.fetch(args.bit_pretrained_dir, args.ckpt_path)
  return runfiles.console_logger('validate')


def check_head(head_size, classes, args):
  if head_size != len(classes):
    raise errors.BadInput(
        f'{args.ckpt_path} has a {head_size}-class head, but {args.dataset} '
        f'has {len(classes)} classes.')


def report(result, args):
  """Prints the result as JSON (and writes it to --output)."""
  print(json.dumps(result), flush=True)
  if getattr(args, 'output', None):
    runfiles.write_json(args.output, result)
  return result


def main_numpy(args, load_model):
  """The validate command of a backend that reads through big_transfer.loader
  and whose model takes its NumPy batches (TF2, JAX), given its
  `load_model(weights)` -> (head size, logits_fn)."""
  import bit_hyperrule  # pylint: disable=import-outside-toplevel
  # Imported here: PyTorch's install has no grain.
  from big_transfer import loader  # pylint: disable=import-outside-toplevel
  log = start(args)
  data = datasets.load(args, log, check_train=False)
  head_size, logits_fn = load_model(zoo.load_weights(args.ckpt_path,
                                                    args.bit_pretrained_dir))
  check_head(head_size, data.classes, args)
  crop = bit_hyperrule.resolution(data.original_hw, crop_size=args.crop_size
                                  or runfiles.trained_crop(args.ckpt_path))[1]
  log.info(f'evaluating {args.ckpt_path} on {len(data.val)} {args.dataset} '
           f'images at {crop} px')
  sums = np.zeros(4)
  for b in loader.eval_batches(data.val, args.batch_eval, crop,
                               workers=args.workers, progress='evaluating'):
    sums += metrics.batch_sums(np.asarray(logits_fn(b['image'])), b['label'],
                               b['mask'])
  return report(metrics.summarize(sums), args)
