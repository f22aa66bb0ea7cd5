"""What every PyTorch program on the run harness (big_transfer.harness) shares:
fine-tuning (train.py), pre-training (pretrain.py) and distillation
(distill.py). Processes and devices (torchrun, DDP), the --compile
choice, data loaders, the training step with gradient accumulation and
mixup, evaluation, the collectives the harness asks for, and the
checkpoint format.
"""
import contextlib
import os
import signal
import sys

import torch
import torch.distributed as dist

from big_transfer import errors, flags, harness, metrics, progress, runfiles
from bit_pytorch import data as torch_data

DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}


# --------------------------------------------------------------------------
# Processes and devices.

def world_size():
  return int(os.environ.get('WORLD_SIZE', '1'))


def run_command(module, parser, main, check, argv=None):
  """`python -m module argv` (sys.argv where None) of a command on the run
  harness: `main(parser.parse_args(argv))` in this process, bad input as
  one line and exit status 2. On a machine with several GPUs, in a process
  that torchrun did not start, `check(args, gpus)` first, then this process
  becomes torchrun, running the same command once per GPU."""
  argv = sys.argv[1:] if argv is None else argv
  args = parser.parse_args(argv)
  gpus = torch.cuda.device_count()
  if gpus > 1 and 'WORLD_SIZE' not in os.environ:
    errors.run_cli(check, args, gpus)
    os.execv(sys.executable, [
        sys.executable, '-m', 'torch.distributed.run', '--standalone',
        f'--nproc_per_node={gpus}', '-m', module, *argv])
  errors.run_cli(main, args)


@contextlib.contextmanager
def process_group():
  """(rank, device): joins torchrun's group when there is one."""
  world = world_size()
  cuda = torch.cuda.is_available()
  if world == 1:
    yield 0, torch.device('cuda' if cuda else 'cpu')
    return
  if 'LOCAL_RANK' not in os.environ:
    raise errors.BadInput(f'WORLD_SIZE is {world} but LOCAL_RANK is not set: '
                          'start several processes with torchrun, or unset '
                          'WORLD_SIZE for one.')
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
  download happens once; errors.in_turn)."""
  return errors.in_turn(os.environ.get('LOCAL_RANK', '0') == '0',
                        any_process(), fn, *args)


def _ignore_sigint(worker_id):
  del worker_id  # Data workers leave Ctrl-C to the main process.
  signal.signal(signal.SIGINT, signal.SIG_IGN)


# --------------------------------------------------------------------------
# Devices, data loaders, the training step and evaluation (the benchmark
# times the same step).

def to_device(net, device):
  """(net on `device`, whether inputs go channels-last): channels-last
  where it is faster, which is on GPUs."""
  channels_last = device.type == 'cuda'
  fmt = torch.channels_last if channels_last else torch.preserve_format
  return net.to(device, memory_format=fmt), channels_last


# torch.compile more than doubles the training rate on a GPU (H200, R50x1,
# bf16: 4771 against 2165 img/s; docs/gpu.md) and takes about a minute
# first; a run shorter than the HyperRule's shortest schedule does not
# repay it. On the CPU it was slower (docs/performance.md).
COMPILE_MIN_STEPS = 500


def torch_flags():
  """Flags of the PyTorch backend only, for every command that trains."""
  parent, g = flags.group('PyTorch')
  flags.add_compile(g, 'PyTorch', 'run the networks through torch.compile '
                    '(a slow first step, then faster steps)',
                    f'on a GPU for runs of at least {COMPILE_MIN_STEPS} '
                    'steps, off on the CPU (slower there)')
  return parent


def compiles(flag, device, steps):
  """Whether to run the networks through torch.compile: as --compile or
  --no-compile say, else on CUDA for `steps` >= COMPILE_MIN_STEPS."""
  if flag is not None:
    return flag
  return device.type == 'cuda' and steps >= COMPILE_MIN_STEPS


def for_inference(x):
  """NCHW images `x` channels-last, as every forward pass without gradients
  takes them on every device. On GPUs the model is channels-last too; on
  CPUs, where training stays NCHW (PyTorch's channels-last GroupNorm
  backward is the slow one), an NCHW model evaluated 13-27% faster on
  channels-last images (docs/performance.md)."""
  return x.contiguous(memory_format=torch.channels_last)


def native_bf16(device):
  """Whether `device` computes bf16 natively: a CUDA GPU of compute
  capability 8.0 (Ampere) or later."""
  return (device.type == 'cuda' and
          torch.cuda.get_device_capability(device)[0] >= 8)


def device_memory(device):
  """(this process's devices, the memory of its GPU or None on a CPU), as
  big_transfer.memory.for_run takes them."""
  return 1, (torch.cuda.get_device_properties(device).total_memory
             if device.type == 'cuda' else None)


def autocast_for(device, precision):
  return torch.autocast(device.type, DTYPES[precision],
                        enabled=precision != 'fp32')


# Frameworks that start threads of their own: a process forked from one may
# inherit a lock that one of them held, and hang.
THREADED_FRAMEWORKS = ('jax', 'tensorflow')


def loader(dataset, args, device, **kwargs):
  """A DataLoader of uint8 images with --workers processes. They are forks
  of this process, unless JAX or TensorFlow runs in it too (a notebook or
  program with two backends): then they come from a fork server, a clean
  process started for them."""
  threaded = args.workers and any(m in sys.modules
                                  for m in THREADED_FRAMEWORKS)
  return torch.utils.data.DataLoader(
      dataset, num_workers=args.workers, pin_memory=device.type == 'cuda',
      worker_init_fn=_ignore_sigint, persistent_workers=args.workers > 0,
      multiprocessing_context='forkserver' if threaded else None, **kwargs)


def mixed(micro_batches, layout, lam, device, channels_last=False):
  """(x, y, y_partner, lam) for each micro-batch (uint8 images and labels
  of the rows TrainBatches loads): images in [-1, 1] on `device`, mixed up
  with their partners (layout: datastream.Stream.rows of each micro-batch)."""
  for (x, y), (rows, partner) in zip(micro_batches, layout):
    x = torch_data.normalize(x, device, channels_last)
    y = y.to(device, non_blocking=True)
    own = slice(0, len(partner))
    if lam == 1.0:
      yield x[own], y[own], y[own], lam
    else:
      # Without waiting for the device (a blocking copy to a GPU waits for
      # the work queued before it).
      partner = torch.as_tensor(partner).to(device, non_blocking=True)
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


def eval_sums(logits, labels, loss_fn):
  """[summed loss, top-1 hits, top-5 hits, examples] of a batch of logits
  and int labels, float64 on their device, by big_transfer.metrics's rule
  (ties broken by class index); `loss_fn(logits, labels)` is a mean."""
  logits = logits.float()
  mine = logits.gather(1, labels[:, None])
  lower = (torch.arange(logits.shape[1], device=logits.device)[None] <
           labels[:, None])
  rank = ((logits > mine) | ((logits == mine) & lower)).sum(1)
  n = len(labels)
  return torch.stack([loss_fn(logits, labels).double() * n,
                      *((rank < k).sum().double() for k in metrics.TOP_K),
                      torch.tensor(n, dtype=torch.float64,
                                   device=logits.device)])


@torch.no_grad()
def evaluate(model, loader, device, autocast, loss_fn, pad=False):
  """Sums [loss, top-1 hits, top-5 hits, examples] over every example of
  `loader` (uint8 images, labels) and over processes, as numpy. `pad`: as
  eval_batches's, for a compiled `model`."""
  model.eval()
  sums = torch.zeros(4, dtype=torch.float64, device=device)
  for x, y in eval_batches(loader, pad):
    x = for_inference(torch_data.normalize(x, device))
    y = y.to(device, non_blocking=True)
    with autocast:
      logits = model(x)[:len(y)].float()
    sums += eval_sums(logits, y, loss_fn)
  if world_size() > 1:
    dist.all_reduce(sums)
  model.train()
  return sums.cpu().numpy()


def eval_batches(loader, pad=False):
  """The batches of an evaluation's `loader` (this process's examples),
  shown as they are used (big_transfer.progress.images) by the first
  process, an unreadable image named (data_errors_named). With `pad`, a
  last batch smaller than the loader's has its first image repeated up to
  that size, so that a compiled network meets one shape: torch.compile
  compiles again for another (39 s for R14x0.5 on 2 busy CPU cores). Its
  labels are not padded: the first len(labels) outputs are the batch's."""
  batches = progress.images(data_errors_named(iter(loader)),
                            len(loader.dataset), lambda batch: len(batch[1]),
                            'evaluating',
                            show=os.environ.get('RANK', '0') == '0')
  if not pad:
    return batches
  return ((_padded(x, loader.batch_size), y) for x, y in batches)


def _padded(x, rows):
  if len(x) >= rows:
    return x
  return torch.cat([x, x[:1].expand(rows - len(x), *x.shape[1:])])


def data_errors_named(batches):
  """Yields from `batches`; an unreadable image found by a data worker
  ends the run with its one-line message, not a worker traceback."""
  try:
    yield from batches
  except errors.BadInput as e:
    lines = str(e).strip().splitlines()
    raise errors.BadInput(lines[-1].split(': ', 1)[-1]) from None


# --------------------------------------------------------------------------
# Collectives over processes (none with one process).

def any_process():
  """flags -> each flag ORed over the processes (None: one process)."""
  if world_size() == 1:
    return None
  device = torch.device('cuda' if dist.get_backend() == 'nccl' else 'cpu')

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
      raise errors.BadInput(
          f'the processes found checkpoints at different steps {steps}: put '
          '--logdir on a file system every node shares.')
  return step


# --------------------------------------------------------------------------
# Checkpoints: model, optimiser, grad scaler, step, RNG state and the run's
# settings in one file, the newest (bit.pth.tar) and the one before it
# (bit.prev.pth.tar). The data order, crops, flips and mixup follow from
# (--seed, step), so the step is the data-order state.

class Checkpoint(harness.Checkpoints):
  """The checkpoint format (harness.Checkpoints) of PyTorch: `objects`
  (name -> object with state_dict/load_state_dict) saved by the lead
  process."""

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
    """Whole or not at all (runfiles.replaced); the previous checkpoint
    stays as *.prev.pth.tar."""
    if not all(torch.isfinite(p).all() for p in
               self.objects['model'].parameters()):
      raise FloatingPointError('weights are not finite')
    if not self.lead:
      return
    state = {name: obj.state_dict() for name, obj in self.objects.items()}
    state.update(step=step, rng=torch.get_rng_state(), run=self.settings)
    with runfiles.replaced(self.path, 'wb', keep=self.prev) as f:
      torch.save(state, f)


