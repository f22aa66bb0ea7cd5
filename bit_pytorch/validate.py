"""Evaluates a fine-tuned model on a dataset's validation split, without
training:

  python -m bit_pytorch.validate --ckpt_path runs/cifar10_run/bit.pth.tar \\
      --dataset cifar10 --datadir data

--ckpt_path takes a training checkpoint (bit.pth.tar), a published-layout
.npz (e.g. a run's model.npz) or a registered model name. Prints (and with
--output writes) {"loss", "top1", "top5", "n"} as JSON.
"""
import argparse
import json
import logging
import os
import sys

import torch

import bit_common
import bit_data
import bit_hyperrule
import bit_run
import bit_zoo
from bit_pytorch import data as torch_data
from bit_pytorch import models
from bit_pytorch import train


def argparser():
  parser = argparse.ArgumentParser(
      description='Evaluate a BiT model on a dataset (PyTorch).',
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument('--ckpt_path', required=True,
                      help='A bit.pth.tar checkpoint of bit_pytorch.train, a '
                      '.npz file, a registered model name or hf-hub:ORG/NAME.')
  parser.add_argument('--dataset', default='cifar10',
                      choices=bit_common.TORCH_OR_TFDS_DATASETS +
                      ('imagefolder',) + tuple(bit_data.ARRAY_DATASETS))
  parser.add_argument('--datadir', default=None,
                      help='As for training: the image folder, ImageNet '
                      'root or where torchvision keeps the dataset.')
  parser.add_argument('--bit_pretrained_dir', default='.',
                      help='Where a registered model is looked for (and '
                      'downloaded to when missing).')
  parser.add_argument('--crop_size', type=int, default=None,
                      help='Evaluation resolution (default: the one the '
                      'checkpoint was trained at, else the HyperRule\'s).')
  parser.add_argument('--batch_eval', type=int, default=64)
  parser.add_argument('--workers', type=int, default=min(8, os.cpu_count()))
  parser.add_argument('--precision', default='fp32',
                      choices=tuple(train.DTYPES))
  parser.add_argument('--skip_bad_images', action='store_true')
  parser.add_argument('--output', default=None,
                      help='Also write the result to this JSON file.')
  return parser


def load_model(args, classes):
  """(model, its training resolution or None)."""
  if args.ckpt_path.endswith(('.pth', '.tar')):
    try:
      state = torch.load(args.ckpt_path, map_location='cpu', weights_only=True)
      run = state['run']
    except (OSError, RuntimeError, KeyError) as e:
      raise bit_common.BadInput(f'{args.ckpt_path} is not a readable '
                                f'bit_pytorch checkpoint ({e}).') from e
    if run['classes'] != list(classes):
      raise bit_common.BadInput(
          f'{args.ckpt_path} was trained on {len(run["classes"])} classes '
          f'({", ".join(map(str, run["classes"][:5]))}, ...), but '
          f'{args.dataset} has {len(classes)} '
          f'({", ".join(map(str, classes[:5]))}, ...).')
    net = models.create(run['arch'], head_size=len(classes))
    net.load_state_dict(state['model'])
    return net, run['resolution'][1]
  weights = bit_zoo.load_weights(args.ckpt_path, args.bit_pretrained_dir)
  net = models.create(args.ckpt_path, weights=weights)
  if net.head_size != len(classes):
    raise bit_common.BadInput(f'{args.ckpt_path} has a {net.head_size}-class '
                              f'head, but {args.dataset} has {len(classes)} '
                              'classes.')
  return net, None


def main(args):
  for flag in ('batch_eval', 'crop_size'):
    if getattr(args, flag) is not None and getattr(args, flag) < 1:
      raise bit_common.BadInput(f'--{flag} must be positive.')
  logger = logging.getLogger('bit.validate')
  logger.addHandler(logging.StreamHandler(sys.stderr))
  logger.setLevel(logging.INFO)
  data = torch_data.load(args, logger, check_train=False)
  net, trained_crop = load_model(args, data.classes)
  crop = (args.crop_size or trained_crop or
          bit_hyperrule.get_resolution(data.original_hw)[1])
  device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  net, channels_last = train.to_device(net, device)
  loader = torch.utils.data.DataLoader(
      torch_data.EvalSet(data.val, crop, args.skip_bad_images),
      batch_size=args.batch_eval, num_workers=args.workers,
      pin_memory=device.type == 'cuda')
  logger.info(f'evaluating {args.ckpt_path} on {len(data.val)} '
              f'{args.dataset} images at {crop} px')
  result = train.evaluate(net, loader, device, channels_last,
                          train.autocast_for(device, args.precision))
  print(json.dumps(result))
  if args.output:
    bit_run.write_json(args.output, result)
  return result


def cli(argv=None):
  bit_common.run_cli(lambda: main(argparser().parse_args(argv)))


if __name__ == '__main__':
  cli()
