"""Fine-tunes a BiT model with the BiT-HyperRule, in PyTorch.

  python -m bit_pytorch.train --name cifar10_run --model BiT-M-R50x1 \\
      --logdir /tmp/bit_logs --dataset cifar10

On a machine with several GPUs this uses all of them, one process each
(DistributedDataParallel), by starting torchrun itself; under torchrun
(any number of nodes) it joins the group torchrun set up. The same global
batch gives the same update on any number of processes.

In-process use: `main(args)` with `args = argparser().parse_args([...])` (or
`bit_common.argparser()`'s: the PyTorch-only flags then take their defaults)
runs one fine-tuning and returns the final evaluation.
"""
import argparse
import contextlib
import itertools
import logging
import os
import signal
import sys
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision

import bit_common
import bit_hyperrule
from bit_pytorch import data as bit_data
from bit_pytorch import models

CHECKPOINT = 'bit.pth.tar'
EXPORT = 'model.npz'
DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}
# Settings a resumed run must share with the checkpoint it resumes.
RESUME_KEYS = ('model', 'dataset', 'classes', 'dataset_size', 'batch',
               'schedule', 'resolution', 'seed', 'examples_per_class',
               'examples_per_class_seed', 'base_lr')


def add_torch_flags(parser):
  """Flags of the PyTorch backend only."""
  parser.add_argument('--compile', action='store_true',
                      help='PyTorch only: run the model through '
                      'torch.compile (slow start, faster steps on GPU).')
  return parser


def argparser():
  return add_torch_flags(bit_common.argparser(models.KNOWN_MODELS))


def _with_torch_defaults(args):
  defaults = add_torch_flags(argparse.ArgumentParser()).parse_args([])
  return argparse.Namespace(**{**vars(defaults), **vars(args)})


# --------------------------------------------------------------------------
# Processes and devices.

def _world_size():
  return int(os.environ.get('WORLD_SIZE', '1'))


@contextlib.contextmanager
def _process_group():
  """(rank, device): joins torchrun's group when there is one."""
  world = _world_size()
  cuda = torch.cuda.is_available()
  if world == 1:
    yield 0, torch.device('cuda' if cuda else 'cpu')
    return
  local = int(os.environ['LOCAL_RANK'])
  device = torch.device('cuda', local) if cuda else torch.device('cpu')
  if cuda:
    torch.cuda.set_device(device)
  own = not dist.is_initialized()
  if own:
    dist.init_process_group('nccl' if cuda else 'gloo',
                            device_id=device if cuda else None)
  try:
    yield dist.get_rank(), device
  finally:
    if own:
      dist.destroy_process_group()


def _local_first(fn, *args):
  """fn(*args), run by each node's first process before the others (so a
  download happens once); a BadInput anywhere stops every process."""
  if _world_size() == 1:
    return fn(*args)
  first = os.environ.get('LOCAL_RANK', '0') == '0'
  result, error = None, None
  for turn in (True, False):
    if first == turn:
      try:
        result = fn(*args)
      except bit_common.BadInput as e:
        error = str(e)
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    if any(errors):
      raise bit_common.BadInput(next(e for e in errors if e))
  return result


def _ignore_sigint(worker_id):
  del worker_id  # Data workers leave Ctrl-C to the main process.
  signal.signal(signal.SIGINT, signal.SIG_IGN)


# --------------------------------------------------------------------------
# One run.

def main(args):
  """Fine-tunes as `args` say; returns the final evaluation (results.json)."""
  args = _with_torch_defaults(args)
  bit_common.check_args(args, _world_size())
  with _process_group() as (rank, device):
    return _train(args, rank, device)


def _train(args, rank, device):
  world = _world_size()
  logger = (bit_common.setup_logger(args) if rank == 0 else
            logging.getLogger('bit.quiet'))
  torch.manual_seed(args.seed)
  data = _local_first(bit_data.load, args, logger)
  train_src = bit_data.fewshot(data.train, args)
  n_train = len(train_src)
  resize, crop = bit_common.resolution(args, data.original_hw)
  schedule = bit_hyperrule.get_schedule(n_train, args.total_steps)
  total = schedule[-1]
  mixup = bit_hyperrule.get_mixup(n_train)
  path = _local_first(bit_common.weights_path, args.model,
                      args.bit_pretrained_dir)
  net = models.create(args.model, head_size=len(data.classes), zero_head=True,
                      weights=bit_common.load_npz(path))
  cuda = device.type == 'cuda'
  net, channels_last = to_device(net, device)
  opt, scaler = optimizer(net, args.base_lr, args.precision)

  run = dict(model=args.model, arch=net.architecture.name,
             dataset=args.dataset, classes=data.classes,
             dataset_size=n_train, batch=args.batch, schedule=schedule,
             resolution=[resize, crop], seed=args.seed,
             examples_per_class=args.examples_per_class,
             examples_per_class_seed=args.examples_per_class_seed,
             base_lr=args.base_lr)
  ckpt = os.path.join(bit_common.run_dir(args), CHECKPOINT)
  step = _resume(ckpt, run, net, opt, scaler, logger) if args.save else 0
  if world > 1:
    steps = [None] * world
    dist.all_gather_object(steps, step)
    if len(set(steps)) > 1:
      raise bit_common.BadInput(
          f'the processes found checkpoints at different steps {steps}: put '
          '--logdir on a file system every node shares.')

  config = dict(vars(args), resolution=[resize, crop], schedule=schedule,
                mixup=mixup, dataset_size=n_train, classes=data.classes,
                devices=world, device=str(device), resumed_from_step=step,
                versions=bit_common.versions(torch, torchvision))
  if rank == 0:
    bit_common.write_json(os.path.join(bit_common.run_dir(args),
                                       'config.json'), config)
  logger.info(f'{args.dataset}: {n_train} training, {len(data.val)} '
              f'validation examples, {len(data.classes)} classes; '
              f'resolution {resize}->{crop}, {total} steps, mixup {mixup}, '
              f'{world} process(es) on {device.type}, {args.precision}')

  fast = torch.compile(net) if args.compile else net
  model = (torch.nn.parallel.DistributedDataParallel(
      fast, device_ids=[device] if cuda else None) if world > 1 else fast)
  loader_kw = dict(num_workers=args.workers, pin_memory=cuda,
                   worker_init_fn=_ignore_sigint,
                   persistent_workers=args.workers > 0)
  sampler = bit_data.TrainBatches(n_train, args.batch, args.seed, step, total,
                                  rank, world, args.batch_split)
  train_loader = torch.utils.data.DataLoader(
      bit_data.TrainSet(train_src, resize, crop, args.skip_bad_images),
      batch_sampler=sampler, **loader_kw)
  lo, hi = (len(data.val) * r // world for r in (rank, rank + 1))
  eval_batch = -(-(args.batch_eval or args.batch // args.batch_split) // world)
  val_loader = torch.utils.data.DataLoader(
      bit_data.EvalSet(data.val.subset(np.arange(lo, hi)), crop,
                       args.skip_bad_images),
      batch_size=eval_batch, **loader_kw)

  metrics = bit_common.Metrics(args, step) if rank == 0 else None
  autocast = autocast_for(device, args.precision)

  def evaluate_and_save():
    result = evaluate(fast, val_loader, device, channels_last, autocast)
    logger.info(f'step {step}: validation loss {result["loss"]:.4f}, '
                f'top-1 {result["top1"]:.2%}, top-5 {result["top5"]:.2%} '
                f'({result["n"]} examples)')
    if rank == 0:
      metrics.write(step, 'val', **result)
      if args.save:
        _save(ckpt, net, opt, scaler, step, run)
    return result

  progress = bit_common.Progress(total, step, logger) if rank == 0 else None
  result = None
  batches = _data_errors_named(iter(train_loader))
  with bit_common.StopSignals() as signals:
    t0 = time.time()
    while step < total and not _agree_to_stop(signals, device):
      lr = bit_hyperrule.get_lr(step, n_train, args.base_lr, args.total_steps)
      for g in opt.param_groups:
        g['lr'] = lr
      lam = (float(np.random.default_rng([args.seed, step, 1]).beta(
          mixup, mixup)) if mixup else None)
      micro = ((bit_data.normalize(x, device, channels_last),
                y.to(device, non_blocking=True))
               for x, y in itertools.islice(batches, args.batch_split))
      loss = train_step(model, opt, scaler, micro, args.batch_split,
                        autocast, lam)
      step += 1
      loss = _mean_over_processes(loss, device)
      t1 = time.time()
      speed = args.batch / max(t1 - t0, 1e-9)
      t0 = t1
      if rank == 0:
        metrics.write(step, 'train', loss=loss, lr=lr, images_per_sec=speed)
        progress.update(step, speed, loss=loss, lr=lr)
      if args.eval_every and step % args.eval_every == 0 or step == total:
        result = evaluate_and_save()
        t0 = time.time()
    if step < total:
      if rank == 0 and args.save:
        _save(ckpt, net, opt, scaler, step, run)
      logger.info(f'stopped by signal at step {step}/{total}'
                  + ('; run again with the same --name to resume.'
                     if args.save else '.'))
      raise SystemExit(128 + (signals.signum or signal.SIGTERM))
  if progress:
    progress.close()
  if result is None:  # Resumed after the last step: evaluate once more.
    result = evaluate_and_save()
  if rank == 0:
    metrics.close()
    results = dict(result, step=step, split='val', name=args.name,
                   model=args.model, dataset=args.dataset,
                   dataset_size=n_train,
                   examples_per_class=args.examples_per_class)
    if args.save:
      net.save_npz(os.path.join(bit_common.run_dir(args), EXPORT))
    bit_common.write_json(os.path.join(bit_common.run_dir(args),
                                       'results.json'), results)
    logger.info(f'done: top-1 {result["top1"]:.2%} after {step} steps.')
  return dict(result, step=step)


# --------------------------------------------------------------------------
# The pieces of a training step (the benchmark times the same ones).

def to_device(net, device):
  """(net on `device`, whether inputs go channels-last): channels-last
  where it is faster, which is on GPUs."""
  channels_last = device.type == 'cuda'
  fmt = torch.channels_last if channels_last else torch.preserve_format
  return net.to(device, memory_format=fmt), channels_last


def optimizer(net, lr, precision):
  """(SGD with momentum 0.9 and no weight decay, in one fused kernel;
  grad scaler for fp16)."""
  device = next(net.parameters()).device
  return (torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, fused=True),
          torch.amp.GradScaler(device.type, enabled=precision == 'fp16'))


def autocast_for(device, precision):
  return torch.autocast(device.type, DTYPES[precision],
                        enabled=precision != 'fp32')


def train_step(model, opt, scaler, micro_batches, n_micro, autocast,
               lam=None):
  """One update from `n_micro` micro-batches (x, y) on the device, their
  gradients accumulated (under DDP, synchronised on the last one only), so
  it equals one update on the whole batch. With `lam`, each micro-batch is
  mixed up with its partners (bit_data.mixup_partner). Returns the loss
  averaged over the batch (a tensor)."""
  ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
  loss = 0.0
  for m, (x, y) in enumerate(micro_batches):
    last = m == n_micro - 1
    with model.no_sync() if ddp and not last else contextlib.nullcontext():
      if lam is not None:
        partner = bit_data.mixup_partner(len(y), x.device)
        x = lam * x + (1 - lam) * x[partner]
      with autocast:
        logits = model(x).float()
      micro_loss = F.cross_entropy(logits, y)
      if lam is not None:
        micro_loss = (lam * micro_loss +
                      (1 - lam) * F.cross_entropy(logits, y[partner]))
      scaler.scale(micro_loss / n_micro).backward()
    loss += micro_loss.detach() / n_micro
  scaler.step(opt)
  scaler.update()
  opt.zero_grad(set_to_none=True)
  return loss


def _agree_to_stop(signals, device):
  """Whether any process was asked to stop (all stop at the same step)."""
  stop = signals.signum is not None
  if _world_size() == 1:
    return stop
  flag = torch.tensor([float(stop)], device=device)
  dist.all_reduce(flag)
  return bool(flag.item())


def _mean_over_processes(value, device):
  value = torch.as_tensor(value, dtype=torch.float32, device=device)
  if _world_size() > 1:
    dist.all_reduce(value)
    value /= _world_size()
  return value.item()


def _data_errors_named(batches):
  """Yields from `batches`; an unreadable image found by a data worker
  ends the run with its one-line message, not a worker traceback."""
  try:
    yield from batches
  except bit_common.BadInput as e:
    lines = str(e).strip().splitlines()
    raise bit_common.BadInput(lines[-1].split(': ', 1)[-1]) from None


@torch.no_grad()
def evaluate(model, loader, device, channels_last, autocast):
  """Loss, top-1, top-5 over every example of `loader` (uint8 images,
  labels), summed over processes."""
  model.eval()
  sums = torch.zeros(4, dtype=torch.float64, device=device)
  for x, y in _data_errors_named(iter(loader)):
    x = bit_data.normalize(x, device, channels_last)
    y = y.to(device, non_blocking=True)
    with autocast:
      logits = model(x).float()
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices == y[:, None]
    sums += torch.stack([F.cross_entropy(logits, y, reduction='sum').double(),
                         top[:, 0].sum().double(), top.any(1).sum().double(),
                         torch.tensor(len(y), device=device).double()])
  if _world_size() > 1:
    dist.all_reduce(sums)
  model.train()
  loss, top1, top5, n = sums.tolist()
  return dict(loss=loss / n, top1=top1 / n, top5=top5 / n, n=int(n))


# --------------------------------------------------------------------------
# Checkpoints: model, optimiser, grad scaler, step and RNG state. The data
# order, crops, flips and mixup follow from (--seed, step), so the step is
# the data-order state.

def _save(path, net, opt, scaler, step, run):
  state = dict(step=step, model=net.state_dict(), optimizer=opt.state_dict(),
               scaler=scaler.state_dict(), rng=torch.get_rng_state(), run=run)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix='.part')
  os.close(fd)
  try:
    torch.save(state, tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _resume(path, run, net, opt, scaler, logger):
  """Loads the checkpoint at `path` when there is one; returns its step."""
  if not os.path.exists(path):
    return 0
  try:
    state = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise bit_common.BadInput(f'cannot read checkpoint {path} ({e}); delete '
                              'it to start the run afresh.') from e
  differ = [k for k in RESUME_KEYS if state['run'].get(k) != run[k]]
  if differ:
    raise bit_common.BadInput(
        f'{path} belongs to a run with other settings ('
        + ', '.join(f'{k}: {state["run"].get(k)!r} there, {run[k]!r} now'
                    for k in differ)[:500]
        + '); choose another --name or delete that folder.')
  net.load_state_dict(state['model'])
  opt.load_state_dict(state['optimizer'])
  scaler.load_state_dict(state['scaler'])
  torch.set_rng_state(state['rng'])
  logger.info(f'resuming from {path} at step {state["step"]}')
  return state['step']


def cli(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  args = argparser().parse_args(argv)
  gpus = torch.cuda.device_count()
  if gpus > 1 and 'WORLD_SIZE' not in os.environ:
    # All local GPUs, one process each: start torchrun for the user.
    bit_common.run_cli(bit_common.check_args, args, gpus)
    os.execv(sys.executable, [
        sys.executable, '-m', 'torch.distributed.run', '--standalone',
        f'--nproc_per_node={gpus}', '-m', 'bit_pytorch.train', *argv])
  bit_common.run_cli(main, args)


if __name__ == '__main__':
  cli()
