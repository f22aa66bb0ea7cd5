"""Upstream pre-training from scratch: the other half of BiT.

  python -m bit_pytorch.pretrain --recipe recipes/bit_s_r50x1.yaml \\
      --name bit-s --logdir runs --datadir /data/imagenet

trains a ResNet-v2 (GroupNorm, weight standardisation) from random
initialisation as the recipe file says, writes the same run outputs as
fine-tuning (train.log, config.json, metrics.jsonl, a checkpoint it resumes
from, results.json) and exports the result as a published-layout .npz that
every backend loads (LOGDIR/NAME/model.npz, or --export PATH).
"""
import argparse
import dataclasses
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
import yaml
from torchvision.transforms import v2

import bit_common
import bit_data
import bit_run
import bit_zoo
from bit_pytorch import data as torch_data
from bit_pytorch import models


@dataclasses.dataclass
class Recipe:
  """What a pre-training run does; every field can be set in the YAML file."""
  model: str                     # architecture, e.g. R50x1
  dataset: str                   # imagenet2012, imagefolder, cifar10, digits, ...
  batch: int                     # global batch size
  datadir: str = None            # for imagenet2012 / imagefolder
  epochs: float = None           # length, in epochs ...
  steps: int = None              # ... or in steps (exactly one of the two)
  resize_size: int = 256         # train: resize (crop_flip) then crop
  crop_size: int = 224           # eval: resize to the crop size
  augment: str = 'inception_crop'  # inception_crop | crop_flip | none
  crop_scale: list = dataclasses.field(default_factory=lambda: [0.08, 1.0])
  downsample: list = None        # [min, max]: first shrink to a random size
  rotations: int = 1             # 4: label = class x quarter-turn of the image
  base_lr: float = 0.03          # lr for 256 images; scaled by batch / 256
  momentum: float = 0.9          # SGD momentum
  warmup_steps: int = 0          # linear warm-up from 0
  decay_at: list = dataclasses.field(default_factory=list)  # in epochs or steps
  decay_factor: float = 0.1      # lr multiplier at each decay point
  weight_decay: float = 1e-4     # L2 on convolution kernels only
  loss: str = 'softmax'          # softmax | sigmoid (per-class, summed)
  label_smoothing: float = 0.0
  head_bias: float = 0.0         # initial head bias (-10 suits sigmoid, many classes)
  eval_every: int = None         # steps; default: once per epoch
  batch_eval: int = None         # default: batch

  def __post_init__(self):
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      kind = (int, float) if f.type is float else f.type
      if value is not None and (not isinstance(value, kind) or
                                isinstance(value, bool)):
        raise bit_common.BadInput(f'recipe: {f.name} must be a '
                                  f'{f.type.__name__}, got {value!r}.')
    if (self.epochs is None) == (self.steps is None):
      raise bit_common.BadInput('recipe: give exactly one of epochs and steps.')
    for name in ('batch', 'epochs', 'steps', 'resize_size', 'crop_size',
                 'eval_every', 'batch_eval'):
      value = getattr(self, name)
      if value is not None and value <= 0:
        raise bit_common.BadInput(f'recipe: {name} must be positive, got '
                                  f'{value}.')
    if self.crop_size > self.resize_size:
      raise bit_common.BadInput(f'recipe: crop_size {self.crop_size} is larger '
                                f'than resize_size {self.resize_size}.')
    for name, allowed in (('augment', AUGMENTATIONS), ('loss', LOSSES)):
      if getattr(self, name) not in allowed:
        raise bit_common.BadInput(f'recipe: {name} must be one of {allowed}, '
                                  f'got {getattr(self, name)!r}.')
    datasets = (bit_common.TORCH_OR_TFDS_DATASETS + ('imagefolder',) +
                tuple(bit_data.ARRAY_DATASETS))
    if self.dataset not in datasets:
      raise bit_common.BadInput(f'recipe: dataset must be one of {datasets}, '
                                f'got {self.dataset!r}.')
    if self.dataset in ('imagenet2012', 'imagefolder') and not self.datadir:
      raise bit_common.BadInput(f'{self.dataset} needs --datadir (a folder '
                                'with train/<class>/* and val/<class>/*).')
    bit_zoo.parse_arch(self.model)


AUGMENTATIONS = ('inception_crop', 'crop_flip', 'none')
LOSSES = ('softmax', 'sigmoid')


def load_recipe(path, overrides=(), datadir=None):
  """A Recipe from a YAML file, with KEY=VALUE overrides (YAML values)."""
  try:
    with open(path) as f:
      values = yaml.safe_load(f) or {}
  except (OSError, yaml.YAMLError) as e:
    raise bit_common.BadInput(f'cannot read recipe {path} ({e}).') from e
  if not isinstance(values, dict):
    raise bit_common.BadInput(f'recipe {path} is not a mapping of keys.')
  for item in overrides:
    key, sep, value = item.partition('=')
    if not sep:
      raise bit_common.BadInput(f'--set {item!r}: write KEY=VALUE.')
    values[key] = yaml.safe_load(value)
  if datadir:
    values['datadir'] = datadir
  known = {f.name for f in dataclasses.fields(Recipe)}
  unknown = sorted(set(values) - known)
  if unknown:
    raise bit_common.BadInput(f'recipe {path}: unknown key(s) {unknown}; '
                              f'known: {sorted(known)}.')
  try:
    return Recipe(**values)
  except TypeError as e:  # a required key is missing
    raise bit_common.BadInput(f'recipe {path}: {e}.') from e


# --------------------------------------------------------------------------
# Data.

class Examples(torch.utils.data.Dataset):
  """A split (bit_pytorch.data.Source) as uint8 CHW tensors, transformed."""

  def __init__(self, source, transform):
    self.source, self.transform = source, transform

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    image = v2.functional.pil_to_tensor(self.source.load(i))
    return self.transform(image), int(self.source.labels[i])


def transforms(recipe, train):
  """uint8 CHW image -> float32 CHW in [-1, 1], augmented for training."""
  crop = recipe.crop_size
  if not train or recipe.augment == 'none':
    steps = [v2.Resize((crop, crop), antialias=True)]
  elif recipe.augment == 'inception_crop':
    steps = [v2.RandomResizedCrop(crop, scale=tuple(recipe.crop_scale),
                                  antialias=True),
             v2.RandomHorizontalFlip()]
  else:
    steps = [v2.Resize((recipe.resize_size, recipe.resize_size),
                       antialias=True),
             v2.RandomCrop(crop), v2.RandomHorizontalFlip()]
  if train and recipe.downsample:
    steps.insert(0, v2.RandomChoice([
        v2.Resize((s, s), antialias=True)
        for s in range(recipe.downsample[0], recipe.downsample[1] + 1)]))
  return v2.Compose(steps + [v2.ToDtype(torch.float32),
                             v2.Normalize([127.5] * 3, [127.5] * 3)])


class RotationLabels(torch.utils.data.Dataset):
  """Turns each image by r quarter-turns and labels it class * k + r: k
  times more upstream classes, which must tell orientation apart (r is
  random in training, i % k in evaluation)."""

  def __init__(self, dataset, k, train):
    self.dataset, self.k, self.train = dataset, k, train

  def __len__(self):
    return len(self.dataset)

  def __getitem__(self, i):
    image, label = self.dataset[i]
    r = int(torch.randint(self.k, ())) if self.train else i % self.k
    return torch.rot90(image, r, dims=(1, 2)), label * self.k + r


def datasets(recipe, logger):
  """(train dataset, eval dataset, class count), read as fine-tuning reads
  them (bit_pytorch.data.load: unreadable images are refused up front)."""
  data = torch_data.load(argparse.Namespace(
      dataset=recipe.dataset, datadir=recipe.datadir, skip_bad_images=False),
                       logger)
  train = Examples(data.train, transforms(recipe, True))
  val = Examples(data.val, transforms(recipe, False))
  classes = len(data.classes)
  if recipe.rotations > 1:
    train = RotationLabels(train, recipe.rotations, True)
    val = RotationLabels(val, recipe.rotations, False)
  return train, val, classes * recipe.rotations


class StepBatches(torch.utils.data.Sampler):
  """Index batches for steps [start, total): epoch e is a permutation drawn
  from (seed, e), so a resumed run sees exactly the batches it would have."""

  def __init__(self, size, batch, seed, start, total):
    self.size, self.batch, self.seed = size, batch, seed
    self.start, self.total = start, total

  def __len__(self):
    return self.total - self.start

  def __iter__(self):
    position = self.start * self.batch
    epoch, offset = divmod(position, self.size)
    pending = []
    for _ in range(len(self)):
      while len(pending) < self.batch:
        order = np.random.default_rng([self.seed, epoch]).permutation(self.size)
        pending.extend(order[offset:].tolist())
        epoch, offset = epoch + 1, 0
      yield pending[:self.batch]
      pending = pending[self.batch:]


# --------------------------------------------------------------------------
# Optimisation.

@dataclasses.dataclass
class Schedule:
  total_steps: int
  warmup_steps: int
  decay_steps: list
  peak_lr: float
  decay_factor: float
  steps_per_epoch: float

  def lr(self, step):
    if step < self.warmup_steps:
      return self.peak_lr * step / self.warmup_steps
    return self.peak_lr * self.decay_factor ** sum(
        step >= d for d in self.decay_steps)


def schedule(recipe, dataset_size):
  per_epoch = dataset_size / recipe.batch
  if recipe.epochs is not None:
    total = max(1, round(recipe.epochs * per_epoch))
    decays = [round(e * per_epoch) for e in recipe.decay_at]
  else:
    total, decays = recipe.steps, [int(d) for d in recipe.decay_at]
  return Schedule(total, min(recipe.warmup_steps, total), decays,
                  recipe.base_lr * recipe.batch / 256, recipe.decay_factor,
                  per_epoch)


def loss_fn(recipe, classes):
  def loss(logits, labels):
    if recipe.loss == 'softmax':
      return F.cross_entropy(logits, labels,
                             label_smoothing=recipe.label_smoothing)
    eps = recipe.label_smoothing
    targets = F.one_hot(labels, classes).float() * (1 - eps) + eps / classes
    return F.binary_cross_entropy_with_logits(
        logits, targets, reduction='sum') / len(labels)
  return loss


def optimizer(model, recipe):
  kernels = [p for p in model.parameters() if p.ndim > 1]
  others = [p for p in model.parameters() if p.ndim <= 1]
  return torch.optim.SGD([{'params': kernels,
                           'weight_decay': recipe.weight_decay},
                          {'params': others, 'weight_decay': 0.0}],
                         lr=0.0, momentum=recipe.momentum)


@torch.inference_mode()
def evaluate(model, loader, loss, device, autocast):
  model.eval()
  total_loss, top1, top5, n = 0.0, 0, 0, 0
  for x, y in loader:
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    with autocast():
      logits = model(x).float()
    total_loss += float(loss(logits, y)) * len(y)
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    top1 += int((top[:, 0] == y).sum())
    top5 += int((top == y[:, None]).any(dim=1).sum())
    n += len(y)
  model.train()
  return {'loss': total_loss / n, 'top1': top1 / n, 'top5': top5 / n, 'n': n}


# --------------------------------------------------------------------------
# The run.

def argparser():
  parser = argparse.ArgumentParser(
      description='Pre-train a BiT ResNet-v2 from scratch with a recipe file.',
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument('--recipe', required=True,
                      help='YAML recipe (see recipes/): architecture, data, '
                      'length, batch, lr, warm-up, decays, weight decay, loss, '
                      'augmentation.')
  parser.add_argument('--name', required=True,
                      help='Name of this run; outputs go to LOGDIR/NAME, and '
                      'a run started again with the same name resumes.')
  parser.add_argument('--logdir', required=True,
                      help='Where the log, metrics and checkpoints go.')
  parser.add_argument('--datadir', default=None,
                      help='Dataset folder (overrides the recipe\'s).')
  parser.add_argument('--set', dest='overrides', action='append', default=[],
                      metavar='KEY=VALUE',
                      help='Override a recipe value, e.g. --set steps=100.')
  parser.add_argument('--export', default=None,
                      help='Where to write the .npz (default LOGDIR/NAME/'
                      'model.npz).')
  parser.add_argument('--seed', type=int, default=0,
                      help='Seed of initialisation, data order and '
                      'augmentation.')
  parser.add_argument('--batch_split', type=int, default=1,
                      help='Split each batch into this many micro-batches and '
                      'accumulate their gradients (saves memory).')
  parser.add_argument('--workers', type=int, default=min(8, os.cpu_count()),
                      help='Data-loading worker processes.')
  parser.add_argument('--precision', default='fp32', choices=('fp32', 'bf16'),
                      help='Compute precision (bf16 autocast on GPU).')
  return parser


CHECKPOINT = 'pretrain.pth.tar'


def save_checkpoint(path, model, optim, step):
  tmp = path + '.part'
  torch.save({'step': step, 'model': model.state_dict(),
              'optim': optim.state_dict()}, tmp)
  os.replace(tmp, path)


def main(args):
  recipe = load_recipe(args.recipe, args.overrides, args.datadir)
  if args.batch_split < 1 or recipe.batch % args.batch_split:
    raise bit_common.BadInput(f'batch {recipe.batch} is not divisible by '
                              f'--batch_split {args.batch_split}.')
  export = args.export or os.path.join(bit_common.run_dir(args), 'model.npz')
  logger = bit_common.setup_logger(args)
  logger.info(f'recipe {args.recipe}: {recipe}')

  torch.manual_seed(args.seed)
  device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  train_set, eval_set, classes = datasets(recipe, logger)
  sched = schedule(recipe, len(train_set))
  arch = bit_zoo.parse_arch(recipe.model)
  model = models.ResNetV2(arch.units, arch.width, classes, zero_head=True)
  torch.nn.init.constant_(model.head.conv.bias, recipe.head_bias)
  optim = optimizer(model, recipe)

  ckpt_path = os.path.join(bit_common.run_dir(args), CHECKPOINT)
  step = 0
  if os.path.exists(ckpt_path):
    state = torch.load(ckpt_path, map_location='cpu', weights_only=True)
    try:
      model.load_state_dict(state['model'])
    except RuntimeError as e:
      raise bit_common.BadInput(
          f'{ckpt_path} is a checkpoint of another model ({str(e)[:200]}...); '
          'use a new --name.') from e
    optim.load_state_dict(state['optim'])
    step = state['step']
    logger.info(f'resuming from {ckpt_path} at step {step}')
  model = model.to(device)
  if torch.cuda.device_count() > 1:
    model = torch.nn.DataParallel(model)

  bit_run.write_json(os.path.join(bit_common.run_dir(args), 'config.json'), {
      **vars(args), 'recipe': dataclasses.asdict(recipe),
      'schedule': dataclasses.asdict(sched), 'dataset_size': len(train_set),
      'eval_size': len(eval_set), 'classes': classes, 'export': export,
      'device': str(device), 'devices': max(1, torch.cuda.device_count()),
      'versions': bit_run.versions(torch, torchvision)})
  logger.info(f'{len(train_set)} training images, {classes} classes, '
              f'{sched.total_steps} steps of {recipe.batch} '
              f'({sched.total_steps / sched.steps_per_epoch:.3g} epochs), '
              f'peak lr {sched.peak_lr:g}, decays at {sched.decay_steps}')

  cuda = device.type == 'cuda'
  train_loader = torch.utils.data.DataLoader(
      train_set, batch_sampler=StepBatches(len(train_set), recipe.batch,
                                           args.seed, step, sched.total_steps),
      num_workers=args.workers, pin_memory=cuda,
      generator=torch.Generator().manual_seed(args.seed * 100003 + step),
      persistent_workers=False)
  eval_loader = torch.utils.data.DataLoader(
      eval_set, batch_size=recipe.batch_eval or recipe.batch,
      num_workers=args.workers, pin_memory=cuda)
  loss = loss_fn(recipe, classes)
  use_bf16 = args.precision == 'bf16'
  def autocast():
    return torch.autocast(device.type, torch.bfloat16, enabled=use_bf16)
  eval_every = recipe.eval_every or max(1, round(sched.steps_per_epoch))
  metrics = bit_run.Metrics(args, step)
  progress = bit_run.Progress(sched.total_steps, step, logger)
  model.train()
  t0, seen = time.time(), 0
  for x, y in train_loader:
    lr = sched.lr(step)
    for group in optim.param_groups:
      group['lr'] = lr
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    optim.zero_grad(set_to_none=True)
    value = 0.0
    for xs, ys in zip(x.chunk(args.batch_split), y.chunk(args.batch_split)):
      with autocast():
        part = loss(model(xs).float(), ys) * (len(ys) / len(y))
      part.backward()
      value += part.item()
    if not np.isfinite(value):
      raise RuntimeError(f'loss is {value} at step {step}; lower base_lr or '
                         'lengthen warmup_steps.')
    optim.step()
    step += 1
    seen += len(y)
    rate = seen / max(time.time() - t0, 1e-9)
    metrics.write(step, 'train', loss=value, lr=lr, images_per_sec=rate)
    progress.update(step, rate, loss=value, lr=lr)
    if step % eval_every == 0 and step < sched.total_steps:
      result = evaluate(model, eval_loader, loss, device, autocast)
      metrics.write(step, 'val', **result)
      logger.info(f'step {step}: val top1 {result["top1"]:.4f} '
                  f'loss {result["loss"]:.4f}')
      save_checkpoint(ckpt_path, _unwrap(model), optim, step)
      t0, seen = time.time(), 0
  progress.close()
  save_checkpoint(ckpt_path, _unwrap(model), optim, step)

  result = evaluate(model, eval_loader, loss, device, autocast)
  metrics.write(step, 'val', **result)
  metrics.close()
  _unwrap(model).save_npz(export)
  logger.info(f'final val top1 {result["top1"]:.4f} top5 {result["top5"]:.4f}'
              f'; exported {export}')
  bit_run.write_json(os.path.join(bit_common.run_dir(args), 'results.json'),
                        {'step': step, 'split': 'val', **result,
                         'model': recipe.model, 'export': export})
  return result


def _unwrap(model):
  return getattr(model, 'module', model)


if __name__ == '__main__':
  bit_common.run_cli(lambda: main(argparser().parse_args()))
