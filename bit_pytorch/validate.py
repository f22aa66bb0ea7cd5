"""Evaluates a fine-tuned model on a dataset's validation split, without
training:

  python -m bit_pytorch.validate --ckpt_path runs/cifar10_run/bit.pth.tar \\
      --dataset cifar10 --datadir data

--ckpt_path takes a training checkpoint (bit.pth.tar), a published-layout
.npz (e.g. a run's model.npz) or a registered model name. Prints (and with
--output writes) {"loss", "top1", "top5", "n"} as JSON.
"""
import torch

import bit_hyperrule
from big_transfer import errors, metrics, runfiles, validate, zoo
from bit_pytorch import data as torch_data
from bit_pytorch import engine
from bit_pytorch import models


def argparser():
  return validate.argparser(
      'PyTorch', precisions=tuple(engine.DTYPES),
      checkpoint_help='A bit.pth.tar checkpoint of bit_pytorch.train. ')


def load_model(args, classes):
  """(model, its training resolution or None)."""
  if args.ckpt_path.endswith(('.pth', '.tar')):
    try:
      state = torch.load(args.ckpt_path, map_location='cpu', weights_only=True)
      run = state['run']
    except (OSError, RuntimeError, KeyError) as e:
      raise errors.BadInput(f'{args.ckpt_path} is not a readable '
                                f'bit_pytorch checkpoint ({e}).') from e
    if run['classes'] != list(classes):
      raise errors.BadInput(
          f'{args.ckpt_path} was trained on {len(run["classes"])} classes '
          f'({", ".join(map(str, run["classes"][:5]))}, ...), but '
          f'{args.dataset} has {len(classes)} '
          f'({", ".join(map(str, classes[:5]))}, ...).')
    net = models.create(run['arch'], head_size=len(classes))
    net.load_state_dict(state['model'])
    return net, run['resolution'][1]
  weights = zoo.load_weights(args.ckpt_path, args.bit_pretrained_dir)
  net = models.create(args.ckpt_path, weights=weights)
  validate.check_head(net.head_size, classes, args)
  return net, None


def main(args):
  logger = validate.start(args)
  data = torch_data.load(args, logger, check_train=False)
  net, trained_crop = load_model(args, data.classes)
  crop = bit_hyperrule.resolution(
      data.original_hw, crop_size=args.crop_size or trained_crop or
      runfiles.trained_crop(args.ckpt_path))[1]
  device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  net, _ = engine.to_device(net, device)
  loader = engine.loader(torch_data.EvalSet(data.val, crop), args, device,
                         batch_size=args.batch_eval)
  logger.info(f'evaluating {args.ckpt_path} on {len(data.val)} '
              f'{args.dataset} images at {crop} px')
  sums = engine.evaluate(net, loader, device,
                        engine.autocast_for(device, args.precision),
                        torch.nn.functional.cross_entropy)
  return validate.report(metrics.summarize(sums), args)


def cli(argv=None):
  errors.run_cli(lambda: main(argparser().parse_args(argv)))


if __name__ == '__main__':
  cli()
