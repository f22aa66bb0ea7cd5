"""Upstream pre-training from scratch: the other half of BiT.

  python -m bit_pytorch.pretrain --recipe bit_s_r50x1 \\
      --name bit-s --logdir runs --datadir /data/imagenet

trains a ResNet-v2 (GroupNorm, weight standardisation) from random
initialisation as the recipe file says, writes the same run outputs as
fine-tuning (train.log, config.json, metrics.jsonl, a checkpoint it resumes
from, results.json) and exports the result as a published-layout .npz that
every backend loads (LOGDIR/NAME/model.npz, or --export PATH). As in
fine-tuning: under torchrun, one process per device
(DistributedDataParallel), and on a machine with several GPUs the command
starts torchrun itself.
"""
import argparse
import dataclasses
import itertools
import os

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from big_transfer import (datasets, datastream, errors, flags, harness,
                          memory, recipes, runfiles, zoo)
import bit_common
from bit_pytorch import data as torch_data
from bit_pytorch import engine
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
    recipes.check_fields(self)
    if (self.epochs is None) == (self.steps is None):
      raise errors.BadInput('recipe: give exactly one of epochs and steps.')
    recipes.check_positive(self, ('batch', 'epochs', 'steps', 'resize_size',
                                  'crop_size', 'eval_every', 'batch_eval',
                                  'base_lr', 'decay_factor', 'rotations'))
    recipes.check_at_least_0(self, ('warmup_steps', 'weight_decay'))
    for name in ('momentum', 'label_smoothing'):
      if not 0 <= getattr(self, name) < 1:
        raise errors.BadInput(f'recipe: {name} must be from 0 to below 1, '
                              f'got {getattr(self, name)}.')
    recipes.check_range('crop_scale', self.crop_scale, 0, 1)
    if self.downsample is not None:
      recipes.check_range('downsample', self.downsample, 0, integers=True)
    if self.crop_size > self.resize_size:
      raise errors.BadInput(f'recipe: crop_size {self.crop_size} is larger '
                                f'than resize_size {self.resize_size}.')
    for name, allowed in (('augment', AUGMENTATIONS), ('loss', LOSSES)):
      if getattr(self, name) not in allowed:
        raise errors.BadInput(f'recipe: {name} must be one of {allowed}, '
                                  f'got {getattr(self, name)!r}.')
    try:
      datasets.dataset_name(self.dataset)
    except argparse.ArgumentTypeError as e:
      raise errors.BadInput(f'recipe: {e}.') from None
    if self.dataset in ('imagenet2012', 'imagefolder') and not self.datadir:
      raise errors.BadInput(f'{self.dataset} needs --datadir (a folder '
                                'with train/<class>/* and val/<class>/*).')
    zoo.parse_arch(self.model)


AUGMENTATIONS = ('inception_crop', 'crop_flip', 'none')
LOSSES = ('softmax', 'sigmoid')


def load_recipe(path, overrides=(), datadir=None):
  """A Recipe from a YAML file, with KEY=VALUE overrides (YAML values)."""
  return recipes.load(Recipe, path, overrides, datadir)


# --------------------------------------------------------------------------
# Data: the shared data stream decides the examples of every step and each
# one's augmentation seed, from which the recipe's augmentation draws.

class Examples(torch.utils.data.Dataset):
  """A split (big_transfer.datasets.Source) as float32 CHW tensors in [-1, 1]
  with labels, augmented as the recipe says. Training examples are indexed
  by (example, augmentation seed) and every random choice (crop, flip,
  down-sampling, quarter-turns) follows from the seed; evaluation examples
  by their index (quarter-turn: index mod k)."""

  def __init__(self, source, recipe, train):
    self.source, self.recipe, self.train = source, recipe, train

  def __len__(self):
    return len(self.source)

  def __getitem__(self, key):
    r = self.recipe
    i, seed = key if self.train else (key, None)
    image, label = self.source.example(i)
    image = v2.functional.pil_to_tensor(image)
    if seed is not None:  # draws past those of the crops
      u = datastream.uniforms([seed], np.arange(40, 43))
    if seed is None or r.augment == 'none':
      image = _resize(image, r.crop_size)
    else:
      if r.downsample:
        lo, hi = r.downsample
        image = _resize(image, lo + int(u[0] * (hi - lo + 1)))
      if r.augment == 'inception_crop':
        top, left, h, w = datastream.inception_crop(
            seed, image.shape[1], image.shape[2], tuple(r.crop_scale))
        image = v2.functional.resized_crop(image, top, left, h, w,
                                           [r.crop_size] * 2, antialias=True)
      else:
        image = _resize(image, r.resize_size)
        (top,), (left,), _ = datastream.crop_flip([seed], r.resize_size,
                                                r.crop_size)
        image = v2.functional.crop(image, int(top), int(left), r.crop_size,
                                   r.crop_size)
      if u[1] < 0.5:
        image = v2.functional.horizontal_flip(image)
    turn = (int(u[2] * r.rotations) if seed is not None else i % r.rotations)
    image = torch.rot90(image, turn, dims=(1, 2))
    label = label * r.rotations + turn
    return (image.float() - 127.5) / 127.5, label


def _resize(image, size):
  return v2.functional.resize(image, [size, size], antialias=True)


def load_data(args, recipe, logger):
  """(train split, eval split, class count), read as fine-tuning reads
  them (bit_pytorch.data.load: unreadable images are refused up front);
  with `rotations: k`, k times the classes (class x quarter-turn)."""
  data = torch_data.load(argparse.Namespace(
      dataset=recipe.dataset, datadir=recipe.datadir,
      skip_bad_images=args.skip_bad_images), logger)
  return data.train, data.val, len(data.classes) * recipe.rotations


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
                         lr=0.0, momentum=recipe.momentum, fused=True)


# --------------------------------------------------------------------------
# The run.

def argparser():
  return flags.parser(
      'Pre-train a BiT ResNet-v2 from scratch with a recipe.',
      flags.recipe('architecture, data, length, batch, lr, warm-up, decays, '
                   'weight decay, loss, augmentation'),
      flags.run(), flags.batch_split(), flags.loading(),
      flags.precision(('fp32', 'bf16'), training=True), engine.torch_flags())


CHECKPOINT = runfiles.PRETRAIN_CHECKPOINT


def main(args):
  """Pre-trains as the recipe says; returns the final evaluation. Under
  torchrun, one process per device (DistributedDataParallel), and through
  torch.compile where fine-tuning would (engine.compiles)."""
  args = bit_common.with_backend_defaults(args, engine.torch_flags())
  recipe = load_recipe(args.recipe, args.overrides, args.datadir)
  world = engine.world_size()
  recipes.check_args(args, recipe.batch, world)
  with engine.process_group() as (rank, device):
    flags.resolve_precision(args, engine.native_bf16(device))
    return _pretrain(args, recipe, rank, world, device)


def _pretrain(args, recipe, rank, world, device):
  with harness.Run(args, rank == 0, engine.any_process(),
                   command='bit_pytorch.pretrain') as run:
    run.logger.info(f'recipe {args.recipe}: {recipe}')
    torch.manual_seed(args.seed)
    train_src, val_src, classes = engine.local_first(load_data, args, recipe,
                                                    run.logger)
    sched = schedule(recipe, len(train_src))
    arch = zoo.parse_arch(recipe.model)
    net = models.ResNetV2(arch.units, arch.width, classes, zero_head=True)
    torch.nn.init.constant_(net.head.conv.bias, recipe.head_bias)
    net, channels_last = engine.to_device(net, device)
    memory.for_run(run, args, arch, recipe.crop_size, world,
                   engine.device_memory(device), recipe.batch)
    optim = optimizer(net, recipe)
    scaler = torch.amp.GradScaler(device.type, enabled=False)

    settings = dict(recipe=dataclasses.asdict(recipe), seed=args.seed)
    ckpt = engine.Checkpoint(os.path.join(run.dir, CHECKPOINT), settings,
                            run.lead, model=net, optimizer=optim)
    step = engine.same_everywhere(run.resume(ckpt, settings))
    export = args.export or os.path.join(run.dir, runfiles.MODEL)
    compiled = engine.compiles(args.compile, device, sched.total_steps - step)
    run.start(step, {
        'recipe': dataclasses.asdict(recipe),
        'schedule': dataclasses.asdict(sched), 'dataset_size': len(train_src),
        'eval_size': len(val_src), 'classes': classes, 'export': export,
        'device': str(device), 'devices': world, 'compiled': compiled,
        'versions': harness.versions('torch', 'torchvision')},
              f'{len(train_src)} training images, {classes} classes, '
              f'{sched.total_steps} steps of {recipe.batch} '
              f'({sched.total_steps / sched.steps_per_epoch:.3g} epochs), '
              f'peak lr {sched.peak_lr:g}, decays at {sched.decay_steps}, '
              f'{world} process(es) on {device.type}', device.type,
              'pytorch')

    fast = torch.compile(net) if compiled else net
    model = (torch.nn.parallel.DistributedDataParallel(
        fast, device_ids=[device] if device.type == 'cuda' else None)
             if world > 1 else fast)
    stream = datastream.Stream(len(train_src), recipe.batch, args.seed)
    sampler = torch_data.TrainBatches(stream, step, sched.total_steps, rank,
                                      world, args.batch_split)
    batches = engine.data_errors_named(iter(engine.loader(
        Examples(train_src, recipe, True), args, device,
        batch_sampler=sampler)))
    lo, hi = (len(val_src) * r // world for r in (rank, rank + 1))
    val_loader = engine.loader(
        Examples(val_src.subset(np.arange(lo, hi)), recipe, False), args,
        device, batch_size=flags.eval_batch(recipe.batch_eval, recipe.batch,
                                            world) // world)
    autocast = engine.autocast_for(device, args.precision)
    loss = loss_fn(recipe, classes)
    layout = torch.channels_last if channels_last else torch.preserve_format

    def step_fn(step, lr):
      del step  # The sampler yields the batches of each step in turn.
      for group in optim.param_groups:
        group['lr'] = lr
      micro = ((x.to(device, non_blocking=True, memory_format=layout),
                y.to(device, non_blocking=True))
               for x, y in itertools.islice(batches, args.batch_split))
      return engine.train_step(model, optim, scaler,
                              ((x, y, y, 1.0) for x, y in micro),
                              args.batch_split, autocast, loss)

    result, step = run.fit(
        step, sched.total_steps, sched.lr, step_fn,
        lambda: engine.evaluate(fast, val_loader, device, autocast, loss,
                                pad=compiled),
        ckpt, eval_every=recipe.eval_every or max(
            1, round(sched.steps_per_epoch)), batch=recipe.batch,
        fetch=lambda losses: engine.mean_over_processes(losses, device))
    return run.finish(result, step, lambda _: net.save_npz(export),
                      model=recipe.model, exported_to=export)


def cli(argv=None):
  """python -m bit_pytorch.pretrain (torchrun started for the user on
  several GPUs, as fine-tuning: engine.run_command)."""
  engine.run_command(
      'bit_pytorch.pretrain', argparser(), main,
      lambda args, gpus: recipes.check_args(args, load_recipe(
          args.recipe, args.overrides, args.datadir).batch, gpus), argv)


if __name__ == '__main__':
  cli()
