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
import contextlib
import itertools
import os
import signal
import sys
import tempfile

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision

import bit_common
import bit_run
import bit_zoo
from bit_pytorch import data as torch_data
from bit_pytorch import models

CHECKPOINT = 'bit.pth.tar'
EXPORT = 'model.npz'
DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}


def add_torch_flags(parser):
  """Flags of the PyTorch backend only."""
  parser.add_argument('--compile', action='store_true',
                      help='PyTorch only: run the model through '
                      'torch.compile (slow start, faster steps on GPU).')
  return parser


def argparser():
  return bit_common.backend_argparser(add_torch_flags)


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
  args = bit_common.with_backend_defaults(args, add_torch_flags)
  bit_common.check_args(args, _world_size())
  with _process_group() as (rank, device):
    return _train(args, rank, device)


def _train(args, rank, device):
  world = _world_size()
  logger = bit_common.run_logger(args, rank == 0)
  torch.manual_seed(args.seed)
  data = _local_first(torch_data.load, args, logger)
  train_src = torch_data.fewshot(data.train, args)
  n_train = len(train_src)
  resize, crop, schedule, mixup = bit_run.hyperrule(args, n_train,
                                                       data.original_hw)
  total = schedule[-1]
  path = _local_first(bit_zoo.weights_path, args.model,
                      args.bit_pretrained_dir)
  net = models.create(args.model, head_size=len(data.classes), zero_head=True,
                      weights=bit_zoo.load_npz(path))
  cuda = device.type == 'cuda'
  net, channels_last = to_device(net, device)
  opt, scaler = optimizer(net, args.base_lr, args.precision)

  run = dict(bit_run.run_settings(args, data.classes, n_train, schedule,
                                     resize, crop),
             arch=net.architecture.name)  # For validate.
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
                versions=bit_run.versions(torch, torchvision))
  if rank == 0:
    bit_run.write_json(os.path.join(bit_common.run_dir(args),
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
  sampler = torch_data.TrainBatches(n_train, args.batch, args.seed, step, total,
                                  rank, world, args.batch_split)
  train_loader = torch.utils.data.DataLoader(
      torch_data.TrainSet(train_src, resize, crop, args.skip_bad_images),
      batch_sampler=sampler, **loader_kw)
  lo, hi = (len(data.val) * r // world for r in (rank, rank + 1))
  eval_batch = -(-(args.batch_eval or args.batch // args.batch_split) // world)
  val_loader = torch.utils.data.DataLoader(
      torch_data.EvalSet(data.val.subset(np.arange(lo, hi)), crop,
                       args.skip_bad_images),
      batch_size=eval_batch, **loader_kw)

  metrics = bit_run.Metrics(args, step) if rank == 0 else None
  autocast = autocast_for(device, args.precision)

  def save(step):
    if rank == 0 and args.save:
      _save(ckpt, net, opt, scaler, step, run)

  def evaluate_and_save(step):
    result = evaluate(fast, val_loader, device, channels_last, autocast)
    bit_run.log_validation(logger, step, result)
    if rank == 0:
      metrics.write(step, 'val', **result)
    save(step)
    return result

  batches = _data_errors_named(iter(train_loader))

  def train_one(step, lr):
    for g in opt.param_groups:
      g['lr'] = lr
    lam = (float(np.random.default_rng([args.seed, step, 1]).beta(
        mixup, mixup)) if mixup else None)
    micro = ((torch_data.normalize(x, device, channels_last),
              y.to(device, non_blocking=True))
             for x, y in itertools.islice(batches, args.batch_split))
    loss = train_step(model, opt, scaler, micro, args.batch_split, autocast,
                      lam)
    return _mean_over_processes(loss, device)

  result, step = bit_run.fine_tune_loop(
      args, step, n_train, train_one, evaluate_and_save, save, logger,
      metrics, lambda stop: _agree_to_stop(stop, device))
  if rank == 0:
    metrics.close()
    if args.save:
      net.save_npz(os.path.join(bit_common.run_dir(args), EXPORT))
    bit_run.write_results(args, result, step, n_train, logger)
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
  mixed up with its partners (torch_data.mixup_partner). Returns the loss
  averaged over the batch (a tensor)."""
  ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
  loss = 0.0
  for m, (x, y) in enumerate(micro_batches):
    last = m == n_micro - 1
    with model.no_sync() if ddp and not last else contextlib.nullcontext():
      if lam is not None:
        partner = torch_data.mixup_partner(len(y), x.device)
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


def _agree_to_stop(stop, device):
  """Whether any process was asked to stop (all stop at the same step)."""
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
    x = torch_data.normalize(x, device, channels_last)
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
  bit_run.check_same_run(state['run'], run, path)
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
