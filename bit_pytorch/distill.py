"""Knowledge distillation in PyTorch (see big_transfer.distill for the
method, the recipe and the flags):

  python -m bit_pytorch.distill --recipe distill_digits_small \\
      --name student --logdir runs --teacher runs/teacher

The teacher runs in evaluation mode, without gradients, on the student's
device(s), on exactly the images the student gets in the step (after crop,
flip and mixup); only the student is trained, checkpointed and exported
(LOGDIR/NAME/model.npz, or --export, in the published layout). As in
fine-tuning: under torchrun, one process per device
(DistributedDataParallel), and on a machine with several GPUs the command
starts torchrun itself; the same global batch gives the same update. Both
networks go through torch.compile where fine-tuning's would (--compile,
engine.compiles).
"""
import functools
import itertools
import os

import numpy as np
import torch
import torch.nn.functional as F

from big_transfer import (distill, flags, harness, memory, recipes, runfiles,
                          zoo)
import bit_common
from bit_pytorch import data as torch_data
from bit_pytorch import models
from bit_pytorch import engine

CHECKPOINT = runfiles.DISTILL_CHECKPOINT
DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16}


def kl_loss(student_logits, teacher_logits, temperature=1.0):
  """distill.kl_loss in torch: T^2 * mean KL(p_teacher || q_student)."""
  t = float(temperature)
  log_p = F.log_softmax(teacher_logits.float() / t, dim=-1)
  log_q = F.log_softmax(student_logits.float() / t, dim=-1)
  return t * t * (log_p.exp() * (log_p - log_q)).sum(-1).mean()


class Adam(torch.optim.AdamW):
  """The optimiser of big_transfer.distill (big_vision's chain) as torch's
  fused AdamW: the gradient clipped to global norm `clip`, then
  w <- w - f * (lr * m_hat / (sqrt(v_hat) + eps) + wd * w), which is AdamW
  at the learning rate lr * f with the weight decay wd / lr; the factor f
  set per step (`set_factor`), `weight_decay` (wd) per parameter group
  (kernels only). One fused update instead of a dozen operations per
  parameter: R50x1's 0.12-0.18 s -> 0.02 s on 2 CPU cores
  (docs/performance.md)."""

  def __init__(self, groups, lr, clip):
    super().__init__(
        [dict(g, weight_decay=g['weight_decay'] / lr) for g in groups],
        lr=0.0, betas=(distill.ADAM_B1, distill.ADAM_B2),
        eps=distill.ADAM_EPS, fused=True)
    self.base_lr, self.clip = lr, clip

  def set_factor(self, factor):
    for g in self.param_groups:
      g['lr'] = self.base_lr * factor

  @torch.no_grad()
  def step(self, closure=None):
    if self.clip:
      grads = [p.grad for g in self.param_groups for p in g['params']
               if p.grad is not None]
      norm = torch.nn.utils.get_total_norm(grads, foreach=True)
      torch._foreach_mul_(grads, torch.where(norm < self.clip, 1.0,
                                              self.clip / norm))
    return super().step(closure)

  def load_state_dict(self, state_dict):
    """Also the checkpoint of this optimiser before it was torch's AdamW:
    moments 'm' and 'v', learning rate and weight decay of its own (the
    recipe's, as now)."""
    if any('m' in s for s in state_dict['state'].values()):
      state_dict = {
          'state': {i: {'step': s['step'], 'exp_avg': s['m'],
                        'exp_avg_sq': s['v']}
                    for i, s in state_dict['state'].items()},
          'param_groups': [dict(now, params=old['params']) for now, old in zip(
              self.state_dict()['param_groups'],
              state_dict['param_groups'])]}
    super().load_state_dict(state_dict)


def optimizer(net, recipe):
  kernels = [p for p in net.parameters() if p.ndim > 1]
  others = [p for p in net.parameters() if p.ndim <= 1]
  return Adam([{'params': kernels, 'weight_decay': recipe.weight_decay},
               {'params': others, 'weight_decay': 0.0}],
              recipe.base_lr, recipe.grad_clip_norm)


# --------------------------------------------------------------------------
# Data: one view per example (bit_pytorch.data.TrainSet: the recipe's crop
# and flip, or its Inception crop, from the example's stream seed), at the
# teacher's resolution; mixup on the device (engine.mixed), then the student
# gets the same images (resized when its resolution differs).

def load_data(args, recipe, logger):
  """(train split (the few-shot subset where the recipe asks), eval split,
  class count, class names)."""
  data = torch_data.load(distill.data_args(args, recipe), logger)
  return data.train, data.val, len(data.classes), data.classes


def build_nets(args, recipe, classes, device):
  """(teacher, student, whether inputs go channels-last) on `device`
  (engine.to_device): the teacher as its weights say (in evaluation mode,
  no gradients; its head must fit the classes), the student from scratch or
  from weights under a zero head."""
  load = functools.partial(engine.local_first, zoo.load_weights)
  teacher, _ = engine.to_device(models.create(
      recipe.teacher, weights=distill.teacher_weights(recipe, args, classes,
                                                      load)).eval(), device)
  teacher.requires_grad_(False)
  torch.manual_seed(args.seed)  # the student's initialisation
  student, channels_last = engine.to_device(models.create(
      recipe.student, head_size=classes, zero_head=True,
      weights=distill.student_weights(recipe, args, load)), device)
  return teacher, student, channels_last


def distill_batches(micro_batches, teacher, size, autocast):
  """(student images, teacher logits, teacher logits, 1.0) per mixed
  micro-batch (x, y, y2, lam) of engine.mixed: the teacher's logits of the
  very images the student gets, computed without gradients. Shaped for
  engine.train_step, whose loss_fn(student logits, teacher logits) is the KL
  loss."""
  for x, _, _, _ in micro_batches:
    with torch.no_grad(), autocast:
      target = teacher(engine.for_inference(x)).float()
    yield student_view(x, size), target, target, 1.0


def student_view(x, size):
  """Images `x` (N, C, H, W) at the teacher's resolution, at the student's
  `size` px: resized (bilinear, antialiased) where the two differ."""
  if x.shape[-1] == size:
    return x
  return F.interpolate(x, size=(size, size), mode='bilinear', antialias=True,
                       align_corners=False)


@torch.no_grad()
def evaluate(student, teacher, loader, device, autocast, temperature,
             size, pad=False):
  """Sums [loss, top-1, top-5, n, agreement, teacher top-1, kl] over
  `loader` (images at the teacher's resolution; the student's `size`) and
  the processes (distill.eval_sums). `pad`: as engine.eval_batches's, for
  compiled networks."""
  student.eval()
  sums = torch.zeros(7, dtype=torch.float64, device=device)
  for x, y in engine.eval_batches(loader, pad):
    x = torch_data.normalize(x, device)
    y = y.to(device, non_blocking=True)
    n = len(y)
    with autocast:
      t = teacher(engine.for_inference(x))[:n].float()
      s = student(engine.for_inference(student_view(x, size)))[:n].float()
    sums += torch.cat([
        engine.eval_sums(s, y, F.cross_entropy), torch.stack([
            (s.argmax(1) == t.argmax(1)).sum().double(),
            (t.argmax(1) == y).sum().double(),
            kl_loss(s, t, temperature).double() * len(y)])])
  if engine.world_size() > 1:
    torch.distributed.all_reduce(sums)
  student.train()
  return sums.cpu().numpy()


# --------------------------------------------------------------------------
# The run.

def argparser():
  return distill.argparser('pytorch', engine.torch_flags())


def main(args):
  """Distils as the recipe says; returns the final evaluation."""
  args = bit_common.with_backend_defaults(args, engine.torch_flags())
  recipe = distill.load_recipe(args)
  world = engine.world_size()
  recipes.check_args(args, recipe.batch, world)
  with engine.process_group() as (rank, device):
    flags.resolve_precision(args, engine.native_bf16(device))
    return _distill(args, recipe, rank, world, device)


def _distill(args, recipe, rank, world, device):
  with distill.Run(args, rank == 0, engine.any_process(),
                   command='bit_pytorch.distill') as run:
    run.logger.info(f'recipe {args.recipe}: {recipe}')
    torch.manual_seed(args.seed)
    engine.local_first(distill.fetch_weights, recipe, args)
    train_src, val_src, classes, names = engine.local_first(
        load_data, args, recipe, run.logger)
    sched = distill.schedule(recipe, len(train_src))
    teacher, student, channels_last = build_nets(args, recipe, classes,
                                                 device)
    memory.for_run(run, args, student.architecture, recipe.crop_size, world,
                   engine.device_memory(device), recipe.batch,
                   teacher.architecture)
    opt = optimizer(student, recipe)
    scaler = torch.amp.GradScaler(device.type, enabled=False)

    settings = distill.settings(recipe, args, sched)
    ckpt = engine.Checkpoint(os.path.join(run.dir, CHECKPOINT), settings,
                            run.lead, model=student, optimizer=opt)
    step = engine.same_everywhere(run.resume(ckpt, settings))
    export = distill.export_path(args, run)
    compiled = engine.compiles(args.compile, device, sched.total_steps - step)
    run.start(step, distill.config(
        recipe, sched, len(train_src), len(val_src), names, export,
        device=str(device), devices=world, compiled=compiled,
        versions=harness.versions('torch', 'torchvision')),
              distill.describe(recipe, sched, len(train_src), classes) +
              f'; {world} process(es) on {device.type}, {args.precision}',
              device.type, 'pytorch')

    fast, teacher = ((torch.compile(student), torch.compile(teacher))
                     if compiled else (student, teacher))
    model = (torch.nn.parallel.DistributedDataParallel(
        fast, device_ids=[device] if device.type == 'cuda' else None)
             if world > 1 else fast)
    stream = distill.stream(recipe, args, len(train_src))
    sampler = torch_data.TrainBatches(stream, step, sched.total_steps, rank,
                                      world, args.batch_split)
    batches = engine.data_errors_named(iter(engine.loader(
        torch_data.TrainSet(train_src, recipe.resize_size, recipe.teacher_size,
                            distill.inception_scale(recipe)), args, device,
        batch_sampler=sampler)))
    lo, hi = (len(val_src) * r // world for r in (rank, rank + 1))
    val_loader = engine.loader(
        torch_data.EvalSet(val_src.subset(np.arange(lo, hi)),
                           recipe.teacher_size),
        args, device,
        batch_size=flags.eval_batch(recipe.batch_eval, recipe.batch,
                                    world) // world)
    autocast = engine.autocast_for(device, args.precision)

    def loss_fn(student_logits, teacher_logits):
      return kl_loss(student_logits, teacher_logits, recipe.temperature)

    def step_fn(step, lr):
      del lr  # the optimiser takes the schedule's factor
      opt.set_factor(sched.factor(step))
      micro = engine.mixed(itertools.islice(batches, args.batch_split),
                          sampler.layout, stream.lam(step), device,
                          channels_last)
      if recipe.targets == 'labels':  # the baseline: no teacher
        micro = ((student_view(x, recipe.crop_size), *rest)
                 for x, *rest in micro)
        return engine.train_step(model, opt, scaler, micro, args.batch_split,
                                autocast, F.cross_entropy)
      return engine.train_step(
          model, opt, scaler,
          distill_batches(micro, teacher, recipe.crop_size, autocast),
          args.batch_split, autocast, loss_fn)

    result, step = run.fit(
        step, sched.total_steps, sched.lr, step_fn,
        lambda: evaluate(fast, teacher, val_loader, device, autocast,
                         recipe.temperature, recipe.crop_size, compiled),
        ckpt, eval_every=distill.eval_every(recipe, sched),
        batch=recipe.batch,
        fetch=lambda losses: engine.mean_over_processes(losses, device))
    return run.finish(result, step, lambda _: student.save_npz(export),
                      teacher=recipe.teacher, student=recipe.student,
                      exported_to=export)


def cli(argv=None):
  """python -m bit_pytorch.distill (torchrun started for the user on
  several GPUs, as fine-tuning: engine.run_command)."""
  engine.run_command(
      'bit_pytorch.distill', argparser(), main,
      lambda args, gpus: recipes.check_args(
          args, distill.load_recipe(args).batch, gpus), argv)


if __name__ == '__main__':
  cli()
