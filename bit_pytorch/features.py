"""Pre-logit features of every example of a split (PyTorch):

  python -m bit_pytorch.features --model BiT-M-R50x1 --dataset cifar10 \\
      --split {train,eval} --out features.npz

writes `features` (N, D) and `labels` (N,) in dataset order, at the
HyperRule's evaluation resolution (or --resolution), on every local GPU
(DataParallel) or the CPU. The shared part is big_transfer.fewshot.
"""
import sys

import numpy as np
import torch

from big_transfer import fewshot
from bit_pytorch import data as torch_data
from bit_pytorch import engine
from bit_pytorch import models

NAME = 'pytorch'


class _Features(torch.nn.Module):
  """The network's pre-logits as its forward pass (what DataParallel runs)."""

  def __init__(self, net):
    super().__init__()
    self.net = net

  def forward(self, x):
    return self.net.features(x)


class FeatureModel:
  """model(images) -> features: float32 NHWC numpy images in [-1, 1] to
  numpy pre-logits (N, D), on all local GPUs (or the CPU)."""

  def __init__(self, weights):
    self.device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    net = _Features(models.create('weights', weights=weights).eval())
    net, _ = engine.to_device(net, self.device)  # as the trainer evaluates
    self.devices = max(torch.cuda.device_count(), 1)
    if self.devices > 1:
      net = torch.nn.DataParallel(net)
    self.net = net

  @torch.inference_mode()
  def features_of(self, x):
    """Features of a torch NCHW batch already in [-1, 1] on the device."""
    return self.net(engine.for_inference(x)).float().cpu().numpy()

  def __call__(self, images):
    x = torch.from_numpy(np.ascontiguousarray(images, np.float32))
    return self.features_of(x.permute(0, 3, 1, 2).to(self.device))


load_model = FeatureModel


def load_data(args, logger):
  return fewshot.splits_of(torch_data.load(args, logger))


def feature_batches(model, splits, split, crop, batch, args):
  source = fewshot.source_of(splits, split)
  for images, labels in engine.loader(torch_data.EvalSet(source, crop), args,
                                     model.device, batch_size=batch):
    yield (model.features_of(torch_data.normalize(images, model.device)),
           labels.numpy())


argparser, main, cli = fewshot.features_command(sys.modules[__name__])

if __name__ == '__main__':
  cli()
