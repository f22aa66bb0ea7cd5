"""Fine-tunes a BiT model with the BiT-HyperRule, in PyTorch.

  python -m bit_pytorch.train --name cifar10_run --model BiT-M-R50x1 \\
      --logdir /tmp/bit_logs --dataset cifar10

On a machine with several GPUs this uses all of them, one process each
(DistributedDataParallel), by starting torchrun itself; under torchrun
(any number of nodes) it joins the group torchrun set up. The same global
batch gives the same update on any number of processes.

The training loop, the run's outputs, checkpoint cadence and signals live in
the shared harness (bit_run.Run); the batches come from the shared data
stream (bit_data.Stream). This file holds what PyTorch needs: processes and
devices, the step, evaluation and the checkpoint format.

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

def world_size():
  return int(os.environ.get('WORLD_SIZE', '1'))


@contextlib.contextmanager
def process_group():
  """(rank, device): joins torchrun's group when there is one."""
  world = world_size()
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
                            device_id=device if cuda else None,
                            **restarted_store())
  try:
    yield dist.get_rank(), device
  finally:
    if own:
      dist.destroy_process_group()


def restarted_store():
  """init_process_group's store after a torchrun restart (--max-restarts):
  the rendezvous store under a prefix of this attempt. torchrun keeps one
  store for every attempt, and without the prefix the new group reads the
  addresses the killed group left there (gloo: 'connectFullMesh failed ...
  Connection refused')."""
  attempt = os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')
  if attempt == '0':
    return {}
  store, rank, world = next(dist.rendezvous('env://'))
  return dict(store=dist.PrefixStore(f'bit_attempt_{attempt}', store),
              rank=rank, world_size=world)


def local_first(fn, *args):
  """fn(*args), run by each node's first process before the others (so a
  download happens once); a BadInput anywhere stops every process."""
  if world_size() == 1:
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
# One run. The loop, outputs, checkpoint cadence and signals are the shared
# harness's (bit_run.Run.fit); this file holds what PyTorch needs.

def main(args):
  """Fine-tunes as `args` say; returns the final evaluation (results.json)."""
  args = bit_common.with_backend_defaults(args, add_torch_flags)
  with process_group() as (rank, device):
    # One process after the other: the checks make and remove folders.
    local_first(bit_common.check_args, args, world_size())
    return _train(args, rank, device)


def _train(args, rank, device):
  world = world_size()
  run = bit_run.Run(args, rank == 0, any_process(device))
  torch.manual_seed(args.seed)
  data = local_first(torch_data.load, args, run.logger)
  train_src = torch_data.fewshot(data.train, args)
  hyper = bit_run.HyperRule.of(args, len(train_src), data.original_hw)
  weights = local_first(bit_zoo.load_weights, args.model,
                        args.bit_pretrained_dir)
  net = models.create(args.model, head_size=len(data.classes), zero_head=True,
                      weights=weights)
  del weights
  net, channels_last = to_device(net, device)
  opt, scaler = optimizer(net, args.base_lr, args.precision)

  settings = dict(hyper.settings(args, data.classes),
                  arch=net.architecture.name)  # For validate.
  ckpt = Checkpoint(os.path.join(run.dir, CHECKPOINT), settings, run.lead,
                    model=net, optimizer=opt, scaler=scaler)
  step = same_everywhere(run.resume(ckpt, settings))
  run.start(step, dict(hyper.config(), classes=data.classes, devices=world,
                       device=str(device),
                       versions=bit_run.versions(torch, torchvision)),
            f'{args.dataset}: {len(train_src)} training, {len(data.val)} '
            f'validation examples, {len(data.classes)} classes; '
            f'{hyper.describe()}, {world} process(es) on {device.type}, '
            f'{args.precision}')

  fast = torch.compile(net) if args.compile else net
  model = (torch.nn.parallel.DistributedDataParallel(
      fast, device_ids=[device] if device.type == 'cuda' else None)
           if world > 1 else fast)
  stream = hyper.stream(args)
  sampler = torch_data.TrainBatches(stream, step, hyper.total, rank, world,
                                    args.batch_split)
  batches = data_errors_named(iter(loader(
      torch_data.TrainSet(train_src, hyper.resize, hyper.crop), args,
      device, batch_sampler=sampler)))
  lo, hi = (len(data.val) * r // world for r in (rank, rank + 1))
  eval_batch = -(-(args.batch_eval or args.batch // args.batch_split) // world)
  val_loader = loader(torch_data.EvalSet(data.val.subset(np.arange(lo, hi)),
                                         hyper.crop), args, device,
                      batch_size=eval_batch)
  autocast = autocast_for(device, args.precision)

  def train(step, lr):
    for g in opt.param_groups:
      g['lr'] = lr
    micro = mixed(((x, y) for x, y in itertools.islice(batches,
                                                       args.batch_split)),
                  sampler.layout, stream.lam(step), device, channels_last)
    return train_step(model, opt, scaler, micro, args.batch_split, autocast,
                      F.cross_entropy)

  result, step = run.fit(
      step, hyper.total, hyper.lr, train,
      lambda: evaluate(fast, val_loader, device, channels_last, autocast,
                       F.cross_entropy),
      ckpt, fetch=lambda losses: mean_over_processes(losses, device))
  return run.finish(result, step, net.save_npz, model=args.model,
                    dataset=args.dataset, dataset_size=len(train_src),
                    examples_per_class=args.examples_per_class)


# --------------------------------------------------------------------------
# The pieces of a run, shared with pre-training (the benchmark times the
# training step too).

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


def loader(dataset, args, device, **kwargs):
  """A DataLoader of uint8 images with --workers processes."""
  return torch.utils.data.DataLoader(
      dataset, num_workers=args.workers, pin_memory=device.type == 'cuda',
      worker_init_fn=_ignore_sigint, persistent_workers=args.workers > 0,
      **kwargs)


def mixed(micro_batches, layout, lam, device, channels_last=False):
  """(x, y, y_partner, lam) for each micro-batch (uint8 images and labels
  of the rows TrainBatches loads): images in [-1, 1] on `device`, mixed up
  with their partners (layout: bit_data.Stream.rows of each micro-batch)."""
  for (x, y), (rows, partner) in zip(micro_batches, layout):
    x = torch_data.normalize(x, device, channels_last)
    y = y.to(device, non_blocking=True)
    own = slice(0, len(partner))
    if lam == 1.0:
      yield x[own], y[own], y[own], lam
    else:
      partner = torch.as_tensor(partner, device=device)
      yield lam * x[own] + (1 - lam) * x[partner], y[own], y[partner], lam


def train_step(model, opt, scaler, micro_batches, n_micro, autocast, loss_fn):
  """One update from `n_micro` micro-batches (x, y, y_partner, lam) on the
  device, their gradients accumulated (under DDP, synchronised on the last
  one only), so it equals one update on the whole batch; the loss of a
  mixed example is lam * loss(y) + (1 - lam) * loss(y_partner). Returns
  the loss averaged over the batch (a device tensor; nothing is read back)."""
  ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
  loss = 0.0
  for m, (x, y, y2, lam) in enumerate(micro_batches):
    last = m == n_micro - 1
    with model.no_sync() if ddp and not last else contextlib.nullcontext():
      with autocast:
        logits = model(x).float()
      micro_loss = loss_fn(logits, y)
      if lam != 1.0:
        micro_loss = lam * micro_loss + (1 - lam) * loss_fn(logits, y2)
      scaler.scale(micro_loss / n_micro).backward()
    loss += micro_loss.detach() / n_micro
  scaler.step(opt)
  scaler.update()
  opt.zero_grad(set_to_none=True)
  return loss


@torch.no_grad()
def evaluate(model, loader, device, channels_last, autocast, loss_fn):
  """Sums [loss, top-1 hits, top-5 hits, examples] over every example of
  `loader` (uint8 images, labels) and over processes, as numpy."""
  model.eval()
  sums = torch.zeros(4, dtype=torch.float64, device=device)
  for x, y in data_errors_named(iter(loader)):
    x = torch_data.normalize(x, device, channels_last)
    y = y.to(device, non_blocking=True)
    with autocast:
      logits = model(x).float()
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices == y[:, None]
    sums += torch.stack([loss_fn(logits, y).double() * len(y),
                         top[:, 0].sum().double(), top.any(1).sum().double(),
                         torch.tensor(len(y), device=device).double()])
  if world_size() > 1:
    dist.all_reduce(sums)
  model.train()
  return sums.cpu().numpy()


def data_errors_named(batches):
  """Yields from `batches`; an unreadable image found by a data worker
  ends the run with its one-line message, not a worker traceback."""
  try:
    yield from batches
  except bit_common.BadInput as e:
    lines = str(e).strip().splitlines()
    raise bit_common.BadInput(lines[-1].split(': ', 1)[-1]) from None


# --------------------------------------------------------------------------
# Collectives over processes (none with one process).

def any_process(device):
  """flags -> each flag ORed over the processes (None: one process)."""
  if world_size() == 1:
    return None

  def vote(flags):
    t = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(t)
    return (t > 0).tolist()
  return vote


def mean_over_processes(losses, device):
  """Device losses (one per step) -> floats averaged over processes: one
  read-back (and one collective) for all of them."""
  values = torch.stack([torch.as_tensor(l, dtype=torch.float32)
                        for l in losses]).to(device)
  if world_size() > 1:
    dist.all_reduce(values)
    values /= world_size()
  return values.tolist()


def same_everywhere(step):
  """`step` (the step resumed from); refuses to go on when the processes
  found checkpoints of different steps."""
  if world_size() > 1:
    steps = [None] * world_size()
    dist.all_gather_object(steps, step)
    if len(set(steps)) > 1:
      raise bit_common.BadInput(
          f'the processes found checkpoints at different steps {steps}: put '
          '--logdir on a file system every node shares.')
  return step


# --------------------------------------------------------------------------
# Checkpoints: model, optimiser, grad scaler, step, RNG state and the run's
# settings in one file, the newest (bit.pth.tar) and the one before it
# (bit.prev.pth.tar). The data order, crops, flips and mixup follow from
# (--seed, step), so the step is the data-order state.

class Checkpoint:
  """bit_run's checkpoint format for PyTorch: `objects` (name -> object
  with state_dict/load_state_dict) saved by the lead process."""

  def __init__(self, path, settings, lead, **objects):
    self.path, self.settings, self.lead = path, settings, lead
    self.prev = path.replace('.pth.tar', '.prev.pth.tar')
    self.objects, self._state = objects, None

  def newest_first(self):
    return [p for p in (self.path, self.prev) if os.path.exists(p)]

  def read(self, path):
    self._state = torch.load(path, map_location='cpu', weights_only=True)
    return self._state['step'], self._state['run']

  def load(self):
    for name, obj in self.objects.items():
      obj.load_state_dict(self._state[name])
    torch.set_rng_state(self._state['rng'])
    self._state = None

  def set_aside(self, path):
    os.replace(path, path + '.unreadable')

  def save(self, step):
    """Atomic: the new file is complete before it takes the name; the
    previous one stays as bit.prev.pth.tar."""
    if not all(torch.isfinite(p).all() for p in
               self.objects['model'].parameters()):
      raise FloatingPointError('weights are not finite')
    if not self.lead:
      return
    state = {name: obj.state_dict() for name, obj in self.objects.items()}
    state.update(step=step, rng=torch.get_rng_state(), run=self.settings)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(self.path),
                               suffix='.part')
    os.close(fd)
    try:
      torch.save(state, tmp)
      if os.path.exists(self.path):
        os.replace(self.path, self.prev)
      os.replace(tmp, self.path)
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)


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
