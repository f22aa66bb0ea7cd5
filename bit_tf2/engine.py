"""What every TF2 program on the run harness (big_transfer.harness) shares:
fine-tuning (train.py) and distillation (distill.py). The tf.distribute
strategy for the machine, batches as per-replica values, the collectives
the harness asks for, the evaluation sums, and the checkpoint format.
"""
import atexit
import glob
import json
import os
import shutil

import numpy as np
import tensorflow as tf

from big_transfer import errors, flags, hardware, harness, metrics, runfiles
from bit_tf2 import models

POLICIES = {'fp32': 'float32', 'bf16': 'mixed_bfloat16',
            'fp16': 'mixed_float16'}


# --------------------------------------------------------------------------
# Devices and processes.


def eval_sums(logits, labels, mask):
  """[summed cross-entropy, top-1 hits, top-5 hits, examples] over the rows
  of a batch where `mask` holds, by big_transfer.metrics's rule (ties
  broken by class index)."""
  logits = tf.cast(logits, tf.float32)
  labels = tf.cast(labels, tf.int32)
  mine = tf.gather(logits, labels, batch_dims=1)[:, None]
  lower = tf.range(tf.shape(logits)[1])[None] < labels[:, None]
  rank = tf.reduce_sum(tf.cast((logits > mine) | ((logits == mine) & lower),
                               tf.int32), 1)
  m = tf.cast(mask, tf.float32)
  loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)
  return tf.stack([tf.reduce_sum(loss * m),
                   *(tf.reduce_sum(tf.cast(rank < k, tf.float32) * m)
                     for k in metrics.TOP_K),
                   tf.reduce_sum(m)])

def deterministic():
  """Asks TensorFlow for the same result from the same command: op
  determinism, and one inter-op thread (with several, two runs of the same
  step differed after a few steps on CPU, even with op determinism; the
  intra-op threads, which do the work of each op, are not limited).
  Returns False where TensorFlow had already started and the thread count
  could not be set any more."""
  tf.config.experimental.enable_op_determinism()
  try:
    tf.config.threading.set_inter_op_parallelism_threads(1)
  except RuntimeError:  # TF's runtime is up: threads are fixed
    return tf.config.threading.get_inter_op_parallelism_threads() == 1
  return True


def tf_config():
  """TF_CONFIG as a dict ({} where it is unset); BadInput where it is not
  JSON of TF's form, or its task is not one of its cluster's."""
  text = os.environ.get('TF_CONFIG') or '{}'
  try:
    config = json.loads(text)
    members = {kind: len(hosts) for kind, hosts in
               config.get('cluster', {}).items()}
    task = config.get('task')
    if task is not None:
      kind, index = task['type'], task.get('index', 0)
  except (ValueError, AttributeError, TypeError, KeyError) as e:
    raise errors.BadInput(
        f'TF_CONFIG {text[:200]!r} is not of TensorFlow\'s form ({e}), '
        '{"cluster": {"worker": ["HOST:PORT", ...]}, "task": {"type": '
        '"worker", "index": I}}.') from None
  if task is not None and not (isinstance(index, int) and
                               0 <= index < members.get(kind, 0)):
    raise errors.BadInput(
        f'TF_CONFIG\'s task, {kind} {index}, is not one of its cluster\'s '
        f'({", ".join(f"{n} {k}" for k, n in members.items()) or "none"}).')
  return config


def make_strategy(workers=True):
  """The tf.distribute strategy for this machine: TPUStrategy where a TPU
  is, MultiWorkerMirroredStrategy where TF_CONFIG names several workers
  (not with workers=False: a command of one process, on its own devices),
  else MirroredStrategy over the local GPUs or logical CPU devices."""
  tpu = os.environ.get('TPU_NAME') or ('local' if glob.glob('/dev/accel*')
                                       else None)
  if tpu:
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)
  cluster = tf_config().get('cluster', {}) if workers else {}
  if sum(len(v) for k, v in cluster.items() if k in ('chief', 'worker')) > 1:
    return tf.distribute.MultiWorkerMirroredStrategy()
  devices = (tf.config.list_logical_devices('GPU') or
             tf.config.list_logical_devices('CPU'))
  return tf.distribute.MirroredStrategy([d.name for d in devices])


def worker(strategy):
  """(index, count) of this training process among the workers of
  `strategy`, the chief (if the cluster names one) first."""
  if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
    return 0, 1
  resolver = strategy.cluster_resolver
  tasks = resolver.cluster_spec().as_dict()
  chiefs = len(tasks.get('chief', ()))
  index = resolver.task_id + (chiefs if resolver.task_type == 'worker' else 0)
  return index, chiefs + len(tasks.get('worker', ()))


def is_chief(strategy):
  return worker(strategy)[0] == 0


def chief_first(strategy, fn, *args):
  """fn(*args) on the chief, then on the other workers (errors.in_turn)."""
  return errors.in_turn(is_chief(strategy), any_process(strategy), fn, *args)


def add_compile(g):
  """TF2's --compile/--no-compile into the flag group `g`."""
  flags.add_compile(g, 'TF2', 'compile the training and evaluation steps '
                    'with XLA', 'on GPUs and TPUs, not on the CPU (TF\'s own '
                    'kernels train and evaluate faster there)')


def uses_xla(strategy, flag=None):
  """Whether XLA compiles the training and evaluation steps: `flag`
  (--compile, --no-compile) decides; by default on GPUs and TPUs, not on
  CPUs, where TF's own (oneDNN) kernels train and evaluate faster
  (docs/performance.md), as bit_tf2.features and bit_tf2.predict run.
  XLA cannot run on several logical CPU devices of one process (BadInput
  if asked to)."""
  accelerated = (isinstance(strategy, tf.distribute.TPUStrategy) or
                 bool(tf.config.list_logical_devices('GPU')))
  if flag is None:
    return accelerated
  if flag and not accelerated and len(strategy.extended.worker_devices) > 1:
    raise errors.BadInput(
        '--compile: XLA cannot run on several CPU devices of one process; '
        'leave it out, or use one device per process.')
  return flag


def accumulate(gradients, images, labels, batch_split, micro, variables):
  """(loss, grads) of `gradients(images, labels)` summed over `batch_split`
  micro-batches of `micro` rows each (a tf.range loop inside the step):
  the same update as one big batch, with a micro-batch's activations."""
  if batch_split == 1:
    return gradients(images, labels)
  loss = tf.zeros([], tf.float32)
  grads = [tf.zeros(v.shape, v.dtype) for v in variables]
  for i in tf.range(batch_split):
    # One micro-batch at a time: a while loop otherwise runs up to 10
    # iterations at once, holding each one's activations.
    tf.autograph.experimental.set_loop_options(parallel_iterations=1)
    rows = slice(i * micro, (i + 1) * micro)
    part_loss, part = gradients(images[rows], labels[rows])
    loss += part_loss
    grads = [g + p for g, p in zip(grads, part)]
  return loss, grads


def to_replicas(strategy, batch):
  """`batch`, this process's rows of a global batch as a dict of NumPy
  arrays (big_transfer.loader's), as per-replica values of `strategy`: the
  rows split evenly over this process's replicas."""
  index, count = worker(strategy)
  local = strategy.num_replicas_in_sync // count
  rows = len(next(iter(batch.values()))) // local

  def part(context):
    r = context.replica_id_in_sync_group - index * local
    return {k: v[r * rows:(r + 1) * rows] for k, v in batch.items()}
  return strategy.experimental_distribute_values_from_function(part)


def eval_step(strategy, replica_eval):
  """eval_step(per-replica batch) -> the sums of `replica_eval(image, label,
  mask)` over the replicas: a tf.function, traced once for a run."""
  @tf.function
  def step(dist_batch):
    sums = strategy.run(replica_eval, args=(
        dist_batch['image'], dist_batch['label'], dist_batch['mask']))
    return strategy.reduce(tf.distribute.ReduceOp.SUM, sums, axis=None)
  return step


def evaluate(strategy, step, batches):
  """The sums of `step(per-replica batch)` (an eval_step) over `batches`
  (this process's share of each evaluation batch, big_transfer.loader's),
  read back once at the end, in float64."""
  sums = [step(to_replicas(strategy, b)) for b in batches]
  return np.sum([s.numpy() for s in sums], axis=0, dtype=np.float64)


def train_images(batch):
  """The images of a training batch of big_transfer.loader, inside the
  step: float32 in [-1, 1], each mixed with its partner by the batch's
  weights where mixup is on (on the device, as JAX's engine.train_images)."""
  x = models.unit_range(batch['image'])
  if 'partner' not in batch:
    return x
  w = tf.reshape(batch['mix'], [-1, 2, 1, 1, 1])
  return w[:, 0] * x + w[:, 1] * models.unit_range(batch['partner'])


def device_memory(strategy):
  """(this worker's replicas, the memory of one of its GPUs or None
  elsewhere), as big_transfer.memory.for_run takes them."""
  return (strategy.num_replicas_in_sync // worker(strategy)[1],
          hardware.gpu_memory_bytes() if device_kind(strategy) == 'GPU'
          else None)


def native_bf16(strategy):
  """Whether the strategy's devices compute bf16 natively: TPUs, and GPUs
  of compute capability 8.0 (Ampere) or later."""
  kind = device_kind(strategy)
  if kind != 'GPU':
    return kind == 'TPU'
  gpu = tf.config.list_physical_devices('GPU')[0]
  return tf.config.experimental.get_device_details(gpu).get(
      'compute_capability', (0, 0)) >= (8, 0)


def device_kind(strategy):
  """CPU, GPU or TPU: the kind of the strategy's first device."""
  devices = strategy.extended.worker_devices
  return tf.DeviceSpec.from_string(devices[0]).device_type or 'CPU'


def any_process(strategy):
  """flags -> each flag ORed over the workers (None: one worker)."""
  if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
    return None

  @tf.function
  def anyone(flags):
    per_replica = strategy.run(lambda f: f, args=(flags,))
    return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica,
                           axis=None) > 0

  return lambda flags: anyone(tf.constant(flags, tf.float32)).numpy().tolist()


# --------------------------------------------------------------------------
# Checkpoints (tf.train.CheckpointManager): model, optimiser state (momentum,
# loss scale) and step, the newest two. TF writes the files first and then,
# atomically, the index that names them, so an interrupted save leaves the
# previous one in force. The data order, crops, flips and mixup follow from
# (--seed, step), so the step is the data state. The run's settings sit
# beside, in RUN.

RUN = 'run.json'


class Checkpoints(harness.Checkpoints):
  """The checkpoint format (harness.Checkpoints) of TF2. Every worker saves
  (TF's collectives need all of them); only the chief's copy is kept."""

  def __init__(self, directory, settings, chief, checkpoint):
    self.settings, self.checkpoint = settings, checkpoint
    self.run_file = os.path.join(directory, RUN)
    # Every worker resumes from the chief's checkpoints (--logdir on a file
    # system the workers share) and writes its own into a folder of its
    # own beside them, emptied at its start (what a killed worker left is
    # gone at the next) and removed at its end.
    self.shared = None if chief else tf.train.CheckpointManager(
        checkpoint, directory, max_to_keep=2)
    if not chief:
      task = tf_config().get('task', {})
      directory = os.path.join(
          directory, f'.{task.get("type", "worker")}-{task.get("index", 0)}')
      shutil.rmtree(directory, ignore_errors=True)
      atexit.register(shutil.rmtree, directory, ignore_errors=True)
    self.manager = tf.train.CheckpointManager(checkpoint, directory,
                                              max_to_keep=2)
    self._path = None

  def newest_first(self):
    return list(reversed((self.shared or self.manager).checkpoints))

  def read(self, path):
    with open(self.run_file) as f:
      saved = json.load(f)
    reader = tf.train.load_checkpoint(path)
    for name in reader.get_variable_to_shape_map():
      reader.get_tensor(name)  # raises where the files are damaged
    self._path = path
    return int(path.rsplit('-', 1)[-1]), saved

  def load(self):
    self.checkpoint.restore(self._path).assert_existing_objects_matched()

  def set_aside(self, path):
    for f in glob.glob(path + '.*'):
      os.replace(f, f + '.unreadable')
    self.manager = tf.train.CheckpointManager(
        self.checkpoint, self.manager.directory, max_to_keep=2)

  def save(self, step):
    if not all(bool(tf.reduce_all(tf.math.is_finite(v)))
               for v in self.checkpoint.model.trainable_variables):
      raise FloatingPointError('weights are not finite')
    runfiles.write_json(self.run_file, self.settings)
    self.checkpoint.step.assign(step)
    self.manager.save(checkpoint_number=step)
