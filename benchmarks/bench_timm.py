"""The peer: timm's resnetv2_50x1_bit (with the chosen architecture's units
and width), trained and evaluated the way bench_pytorch runs ours
(torch_timing: an SGD step on cross-entropy; forward passes without
gradients), in timm's default memory format unless `channels_last` (as
timm's training script runs on GPUs with --channels-last), in training and
evaluation alike."""
import functools

import timm
from timm.models import resnetv2

from benchmarks import torch_timing
from big_transfer import zoo


def create(arch):
  a = zoo.parse_arch(arch)
  if a == zoo.parse_arch('R50x1'):
    return timm.create_model('resnetv2_50x1_bit', num_classes=1000)
  # The same construction as timm's *_bit models, at other sizes.
  return resnetv2.ResNetV2(
      list(a.units), num_classes=1000, width_factor=a.width,
      stem_type='fixed',
      conv_layer=functools.partial(resnetv2.StdConv2d, eps=1e-8))


def measure(arch, resolution, batch, precision, steps, warmup, batch_split=1,
            evaluate=True, channels_last=False):
  return torch_timing.time_model(create(arch), resolution, batch, precision,
                                 steps, warmup, channels_last=channels_last,
                                 batch_split=batch_split, evaluate=evaluate,
                                 eval_channels_last=channels_last)
