"""What every JAX program on the run harness (big_transfer.harness) shares:
fine-tuning (train.py) and distillation (distill.py). Joining the processes
of a job, the collectives the harness asks for, the evaluation sums, and the
checkpoint format (orbax).
"""
import contextlib
import itertools
import logging
import os
import re
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from big_transfer import errors, flags, harness, metrics
from bit_jax import models

DTYPES = {'fp32': jnp.float32, 'bf16': jnp.bfloat16}
EVAL_IN_FLIGHT = 2  # evaluation batches queued on the devices at most


# --------------------------------------------------------------------------
# Processes.


class DataParallel:
  """The one-axis mesh of every device of the job ('data'): parameters
  replicated, batches sharded along their first axis."""

  def __init__(self):
    self.devices = jax.devices()
    self.mesh = Mesh(np.array(self.devices), ('data',))
    self.replicated = NamedSharding(self.mesh, P())
    self.sharded = NamedSharding(self.mesh, P('data'))
    # bf16 natively: TPUs, and GPUs of compute capability 8.0 or later.
    first = self.devices[0]
    self.native_bf16 = first.platform == 'tpu' or (
        first.platform == 'gpu' and
        float(getattr(first, 'compute_capability', 0)) >= 8)

  def device_memory(self):
    """(this process's devices, the memory of one of its GPUs or None
    elsewhere), as big_transfer.memory.for_run takes them."""
    first = jax.local_devices()[0]
    return jax.local_device_count(), (
        (first.memory_stats() or {}).get('bytes_limit')
        if first.platform == 'gpu' else None)

  def to_global(self, batch):
    """This process's rows of a batch ({name: array}) as global arrays."""
    return {k: jax.make_array_from_process_local_data(self.sharded, v)
            for k, v in batch.items()}

  def evaluate(self, eval_step, batches, *params):
    """The sums of `eval_step(*params, image, label, mask)` over `batches`
    (this process's share of each evaluation batch), read back once at the
    end, in float64. At most EVAL_IN_FLIGHT batches wait for the device:
    JAX returns before it computes, and the host would otherwise hold
    every batch it reads faster than the device computes (the whole split
    on a CPU)."""
    sums = []
    for batch in batches:
      b = self.to_global(batch)
      sums.append(eval_step(*params, b['image'], b['label'], b['mask']))
      if len(sums) > EVAL_IN_FLIGHT:
        sums[-EVAL_IN_FLIGHT - 1].block_until_ready()
    return np.sum([local(s) for s in sums], axis=0, dtype=np.float64)


def train_images(batch):
  """The images of a training batch of big_transfer.loader, inside the
  compiled step: float32 in [-1, 1], each mixed with its partner by the
  batch's weights where mixup is on."""
  x = models.unit_range(batch['image'])
  if 'partner' not in batch:
    return x
  w = batch['mix'][:, :, None, None, None]
  return w[:, 0] * x + w[:, 1] * models.unit_range(batch['partner'])


def eval_sums(logits, labels, mask):
  """[summed cross-entropy, top-1 hits, top-5 hits, examples] over the rows
  of a batch where `mask` holds, by big_transfer.metrics's rule (ties
  broken by class index)."""
  logits = logits.astype(jnp.float32)
  mine = jnp.take_along_axis(logits, labels[:, None], axis=1)
  lower = jnp.arange(logits.shape[1])[None] < labels[:, None]
  rank = ((logits > mine) | ((logits == mine) & lower)).sum(1)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  m = mask.astype(jnp.float32)
  return jnp.stack([(loss * m).sum(),
                    *(((rank < k) * m).sum() for k in metrics.TOP_K),
                    m.sum()])


def distributed_flags():
  """The JAX flags of fine-tuning and distillation: joining the processes
  of a job (initialize_distributed)."""
  parent, g = flags.group('JAX')
  g.add_argument('--distributed', action='store_true',
                 help='JAX only: join the other processes of the job first '
                 '(jax.distributed.initialize), so every process trains one '
                 'model together. TPU pods, SLURM and Open MPI are detected; '
                 'elsewhere give --coordinator_address, --num_processes and '
                 '--process_id.')
  g.add_argument('--coordinator_address', default=None, metavar='HOST:PORT',
                 help='JAX only, with --distributed: address of process 0, '
                 'where it serves the coordinator (any free port; the same '
                 'on every process).')
  g.add_argument('--num_processes', type=int, default=None,
                 help='JAX only, with --distributed: how many processes the '
                 'job has.')
  g.add_argument('--process_id', type=int, default=None,
                 help='JAX only, with --distributed: this process\'s index, 0 '
                 'to --num_processes - 1.')
  return parent


def initialize_distributed(args):
  """Joins the job's processes (--distributed): the cluster's own settings
  where JAX detects them, else the explicit flags. CPU processes exchange
  their collectives through gloo."""
  explicit = {k: getattr(args, k) for k in ('coordinator_address',
                                            'num_processes', 'process_id')}
  given = {k: v for k, v in explicit.items() if v is not None}
  if given and not args.distributed:
    raise errors.BadInput(
        f'--{next(iter(given))} needs --distributed.')
  if not args.distributed:
    return
  if given and len(given) < 3:
    missing = ', '.join(f'--{k}' for k in explicit if k not in given)
    raise errors.BadInput(
        f'--distributed with {", ".join(f"--{k}" for k in given)} also needs '
        f'{missing} (or none of the three, where JAX detects the cluster: '
        'TPU pods, SLURM, Open MPI).')
  if given:
    n, i = given['num_processes'], given['process_id']
    if n < 1 or not 0 <= i < n:
      raise errors.BadInput(
          f'--process_id {i} is not in 0..{n - 1} (--num_processes {n}).')
    if ':' not in given['coordinator_address']:
      raise errors.BadInput(
          f'--coordinator_address {given["coordinator_address"]!r} is not '
          'HOST:PORT.')
  if jax.config.jax_cpu_collectives_implementation in (None, 'none'):
    # Without it, CPU devices of several processes cannot run one step
    # (newer JAX uses gloo by default; accelerators are not affected).
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  try:
    jax.distributed.initialize(**given)
  except (ValueError, RuntimeError) as e:
    if given:
      raise
    raise errors.BadInput(
        '--distributed found no cluster to join (' +
        str(e).strip().splitlines()[0][:200] + '); outside TPU pods, SLURM '
        'and Open MPI give --coordinator_address HOST:PORT --num_processes N '
        '--process_id I on every process.') from None


def lead_first(fn, *args):
  """fn(*args) on process 0, then on the others (errors.in_turn)."""
  return errors.in_turn(jax.process_index() == 0,
                        any_process if jax.process_count() > 1 else None,
                        fn, *args)


def local(x):
  """A replicated array as numpy (this process's copy is the whole)."""
  return np.asarray(x.addressable_data(0))


def any_process(flags):
  """Each flag ORed over the processes."""
  from jax.experimental import multihost_utils
  return np.any(multihost_utils.process_allgather(np.array(flags)), axis=0)


# --------------------------------------------------------------------------
# Gradient accumulation.

def accumulate(grad_fn, params, images, labels, batch_split, mesh):
  """(loss, grads) of `grad_fn(params, images, labels)` averaged over
  `batch_split` micro-batches (a lax.scan inside the compiled step): the
  same update as one big batch. Micro-batch j holds rows j, j + split, ...:
  every device keeps its own rows, so splitting moves no data between
  devices."""
  if batch_split == 1:
    return grad_fn(params, images, labels)

  def micro(x):
    x = x.reshape(-1, batch_split, *x.shape[1:]).swapaxes(0, 1)
    return jax.lax.with_sharding_constraint(
        x, NamedSharding(mesh, P(None, 'data')))

  def add(acc, xy):
    loss, grads = grad_fn(params, *xy)
    return jax.tree.map(jnp.add, acc, (loss, grads)), None

  zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
  (loss, grads), _ = jax.lax.scan(add, zeros, (micro(images), micro(labels)))
  return jax.tree.map(lambda v: v / batch_split, (loss, grads))


# --------------------------------------------------------------------------
# Checkpoints (orbax): parameters, optimiser state and the run's settings,
# the newest two, each written to a temporary folder and renamed when
# complete. The data order, crops, flips and mixup follow from (--seed,
# step), so the step is the data state.

@contextlib.contextmanager
def _quiet_until_a_write_fails(*names):
  """Loggers `names` silent in the block, and only the main thread writing
  on stderr. If it raises an OSError (a full disk), both stay so: the
  write fails in each of Orbax's and TensorStore's threads, and each
  would print it with a traceback, while the save fails and also after
  the run has ended with its one line."""
  loggers = [logging.getLogger(name) for name in names]
  levels = [logger.level for logger in loggers]
  stderr = sys.stderr
  for logger in loggers:
    logger.setLevel(logging.CRITICAL)
  sys.stderr = _MainThreadOnly(stderr)
  failed = False
  try:
    yield
  except OSError:
    failed = True
    raise
  finally:
    if not failed:
      for logger, level in zip(loggers, levels):
        logger.setLevel(level)
      sys.stderr = stderr


class _MainThreadOnly:
  """A stream that passes on what the main thread writes, and drops what
  the other threads write."""

  def __init__(self, stream):
    self.stream = stream

  def write(self, text):
    if threading.current_thread() is threading.main_thread():
      return self.stream.write(text)
    return len(text)

  def __getattr__(self, name):
    return getattr(self.stream, name)


class Checkpoints(harness.Checkpoints):
  """The checkpoint format (harness.Checkpoints) of JAX; `state` is the
  run's state (the trainer updates it at every step; `load` puts a
  checkpoint's there)."""

  def __init__(self, path, settings, state):
    self.settings, self.state = settings, state
    self.manager = ocp.CheckpointManager(
        os.path.abspath(path), options=ocp.CheckpointManagerOptions(
            max_to_keep=2, create=True, cleanup_tmp_directories=True))
    self._read = None

  def newest_first(self):
    return [os.path.join(self.manager.directory, str(s))
            for s in sorted(self.manager.all_steps(), reverse=True)]

  def read(self, name):
    step = int(os.path.basename(name))
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, self.state)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract),
        run=ocp.args.JsonRestore()))
    self._read = restored['state']
    saved = dict(restored['run'])
    return step, dict(saved, schedule=list(saved['schedule']))

  def load(self):
    self.state, self._read = self._read, None

  def set_aside(self, name):
    aside = name + '.unreadable'
    for n in itertools.count(1):  # earlier ones set aside stay
      if not os.path.exists(aside):
        break
      aside = f'{name}.unreadable-{n}'
    os.replace(name, aside)
    self.manager.reload()

  def save(self, step):
    if not all(np.isfinite(local(p)).all()
               for p in jax.tree.leaves(self.state['params'])):
      raise FloatingPointError('weights are not finite')
    with _quiet_until_a_write_fails('absl', 'asyncio'):
      try:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(self.state),
            run=ocp.args.JsonSave(self.settings)))
        self.manager.wait_until_finished()
      except ValueError as e:  # TensorStore's write errors carry the errno
        code = re.search(r"os_error_code='(\d+)'", str(e))
        if not code:
          raise
        raise OSError(int(code[1]), os.strerror(int(code[1]))) from e

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
