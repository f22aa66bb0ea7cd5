"""Fine-tunes a BiT model with the BiT-HyperRule, in TensorFlow 2 / Keras 3.

  python -m bit_tf2.train --name cifar10_run --model BiT-M-R50x1 \\
      --logdir /tmp/bit_logs --dataset cifar10

Devices: TPUStrategy where a TPU is present (TPU_NAME names it, or a TPU VM
shows /dev/accel*; on newer TPU VMs set TPU_NAME=local),
MultiWorkerMirroredStrategy when TF_CONFIG names several workers (start the
same command on each), else MirroredStrategy over every local GPU (or every
logical CPU device). The same global batch gives the same update on any
number of devices. --batch_split accumulates micro-batch gradients inside
the step; on GPUs and TPUs the forward and backward passes are compiled
with XLA.

In-process use: `main(args)` with `args = argparser().parse_args([...])` (or
`bit_common.argparser()`'s: the TF2-only flags then take their defaults)
runs one fine-tuning and returns the final evaluation.
"""
import atexit
import glob
import json
import os
import shutil
import tempfile

import keras
import numpy as np
import tensorflow as tf
from keras import ops

import bit_common
import bit_run
import input_pipeline_tf2_or_jax as input_pipeline
from bit_tf2 import models

CHECKPOINTS = 'checkpoints'
EXPORT = 'model.npz'
SAVED_MODEL = 'saved_model'
POLICIES = {'fp32': 'float32', 'bf16': 'mixed_bfloat16',
            'fp16': 'mixed_float16'}


def add_tf2_flags(parser):
  """Flags of the TF2 backend only."""
  parser.add_argument('--export_saved_model', action='store_true',
                      help='TF2 only: also export the fine-tuned model as a '
                      f'SavedModel for serving, to LOGDIR/NAME/{SAVED_MODEL}.')
  return parser


def argparser():
  return bit_common.backend_argparser(add_tf2_flags)


# --------------------------------------------------------------------------
# Devices, optimiser and the compiled steps.

def make_strategy():
  """The tf.distribute strategy for this machine (see the module doc)."""
  tpu = os.environ.get('TPU_NAME') or ('local' if glob.glob('/dev/accel*')
                                       else None)
  if tpu:
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)
  cluster = json.loads(os.environ.get('TF_CONFIG') or '{}').get('cluster', {})
  if sum(len(v) for k, v in cluster.items() if k in ('chief', 'worker')) > 1:
    return tf.distribute.MultiWorkerMirroredStrategy()
  devices = (tf.config.list_logical_devices('GPU') or
             tf.config.list_logical_devices('CPU'))
  return tf.distribute.MirroredStrategy([d.name for d in devices])


def is_chief(strategy):
  resolver = getattr(strategy, 'cluster_resolver', None)
  if resolver is None or not resolver.task_type:
    return True
  if resolver.task_type == 'chief':
    return True
  has_chief = 'chief' in resolver.cluster_spec().as_dict()
  return resolver.task_type == 'worker' and resolver.task_id == 0 and (
      not has_chief)


def uses_xla(strategy):
  """XLA helps on accelerators; on CPUs TF's own kernels are as fast."""
  return (isinstance(strategy, tf.distribute.TPUStrategy) or
          bool(tf.config.list_logical_devices('GPU')))


class SGD(keras.optimizers.Optimizer):
  """SGD with momentum as PyTorch and optax apply it: m <- mu * m + g,
  w <- w - lr * m. (Keras's own SGD folds the learning rate into the
  momentum, m <- mu * m - lr * g, which differs while the rate changes, as
  it does in the HyperRule's warm-up and decays.)"""

  def __init__(self, learning_rate, momentum=0.9, **kwargs):
    super().__init__(learning_rate, name='sgd', **kwargs)
    self.momentum = momentum

  def build(self, variables):
    if self.built:
      return
    super().build(variables)
    self.momentums = self.add_optimizer_variables(variables, 'momentum')

  def update_step(self, gradient, variable, learning_rate):
    m = self.momentums[self._get_variable_index(variable)]
    gradient = ops.cast(gradient, variable.dtype)
    self.assign(m, ops.add(ops.multiply(m, self.momentum), gradient))
    self.assign_sub(variable, ops.multiply(
        m, ops.cast(learning_rate, variable.dtype)))


def make_optimizer(precision):
  """(optimizer, learning-rate variable): SGD with momentum 0.9 reading its
  rate from the variable; with dynamic loss scaling for fp16. Call under the
  strategy's scope."""
  lr = tf.Variable(0.0, trainable=False, dtype=tf.float32, name='lr')
  opt = SGD(lambda: lr)
  if precision == 'fp16':
    opt = keras.optimizers.LossScaleOptimizer(opt)
  return opt, lr


def make_steps(strategy, model, optimizer, lr, batch, batch_split,
               xla=False):
  """(train_step, eval_step), tf.functions over `strategy`.

  train_step(dist_batch, learning_rate) -> mean training loss; the batch of
  `batch` images (all replicas together) is split into `batch_split`
  micro-batches whose gradients are accumulated: one update, as for one big
  batch. eval_step(dist_batch) -> sums (loss, top-1, top-5, count) over the
  rows whose mask is True.
  """
  variables = model.trainable_variables
  micro = batch // strategy.num_replicas_in_sync // batch_split

  @tf.function(jit_compile=xla)
  def gradients(images, labels):
    with tf.GradientTape() as tape:
      logits = model(images, training=True)
      loss = tf.reduce_sum(tf.nn.softmax_cross_entropy_with_logits(
          labels, logits)) / batch
      scaled = optimizer.scale_loss(loss)
    return loss, tape.gradient(scaled, variables)

  def replica_step(images, labels):
    if batch_split == 1:
      loss, grads = gradients(images, labels)
    else:
      loss = tf.zeros([], tf.float32)
      grads = [tf.zeros(v.shape, v.dtype) for v in variables]
      for i in tf.range(batch_split):
        rows = slice(i * micro, (i + 1) * micro)
        part_loss, part = gradients(images[rows], labels[rows])
        loss += part_loss
        grads = [g + p for g, p in zip(grads, part)]
    optimizer.apply_gradients(zip(grads, variables))
    return loss

  @tf.function
  def train_step(dist_batch, learning_rate):
    lr.assign(learning_rate)
    losses = strategy.run(replica_step, args=(dist_batch['image'],
                                              dist_batch['label']))
    return strategy.reduce(tf.distribute.ReduceOp.SUM, losses, axis=None)

  @tf.function(jit_compile=xla)
  def replica_eval(images, labels, mask):
    logits = tf.cast(model(images, training=False), tf.float32)
    loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)
    k = min(5, logits.shape[-1])
    top = tf.math.top_k(logits, k).indices == tf.cast(labels, tf.int32)[:,
                                                                         None]
    m = tf.cast(mask, tf.float32)
    return tf.stack([
        tf.reduce_sum(loss * m),
        tf.reduce_sum(tf.cast(top[:, 0], tf.float32) * m),
        tf.reduce_sum(tf.cast(tf.reduce_any(top, 1), tf.float32) * m),
        tf.reduce_sum(m)])

  @tf.function
  def eval_step(dist_batch):
    sums = strategy.run(replica_eval, args=(
        dist_batch['image'], dist_batch['label'], dist_batch['mask']))
    return strategy.reduce(tf.distribute.ReduceOp.SUM, sums, axis=None)

  return train_step, eval_step


def distribute(strategy, make_dataset):
  """Per-replica batches from `make_dataset(process_index, process_count)`,
  a dataset of this process's rows of each global batch: the rows are split
  evenly over the process's replicas."""

  def dataset_fn(context):
    ds = make_dataset(context.input_pipeline_id, context.num_input_pipelines)
    local = strategy.num_replicas_in_sync // context.num_input_pipelines
    if local == 1:
      return ds
    split = lambda x: tf.reshape(x, [local, -1, *x.shape[1:]])
    return ds.map(lambda b: tf.nest.map_structure(split, b)).unbatch()

  return strategy.distribute_datasets_from_function(dataset_fn)


# --------------------------------------------------------------------------
# One run.

def main(args):
  """Fine-tunes as `args` say; returns the final evaluation (results.json)."""
  args = bit_common.with_backend_defaults(args, add_tf2_flags)
  strategy = make_strategy()
  replicas = strategy.num_replicas_in_sync
  bit_common.check_args(args, replicas)
  chief = is_chief(strategy)
  logger = bit_common.run_logger(args, chief)
  data = input_pipeline.load(args, logger)
  n_train = data.train_size
  resize, crop, schedule, mixup = bit_run.hyperrule(args, n_train,
                                                       data.original_hw)
  weights = models.load_weights(models.weights_file(args.model,
                                                    args.bit_pretrained_dir))
  with strategy.scope():
    model = models.create(args.model, head_size=data.num_classes,
                          zero_head=True, weights=weights,
                          dtype=POLICIES[args.precision])
    optimizer, lr = make_optimizer(args.precision)
    optimizer.build(model.trainable_variables)
    step_var = tf.Variable(0, dtype=tf.int64, trainable=False, name='step')
  del weights

  classes = list(data.classes) if data.classes else data.num_classes
  run = bit_run.run_settings(args, classes, n_train, schedule, resize,
                                crop)
  checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer,
                                   step=step_var)
  manager = _checkpoints(args, checkpoint, chief) if args.save else None
  step = _resume(manager, checkpoint, run, logger) if manager else 0

  xla = uses_xla(strategy)
  config = dict(vars(args), resolution=[resize, crop], schedule=schedule,
                mixup=mixup, dataset_size=n_train, classes=classes,
                data=data.describe(), devices=replicas,
                strategy=type(strategy).__name__,
                device_kind=device_kind(strategy), xla=xla,
                resumed_from_step=step,
                versions=bit_run.versions(tf, keras))
  if chief:
    bit_run.write_json(os.path.join(bit_common.run_dir(args),
                                       'config.json'), config)
  logger.info(f'{args.dataset}: {n_train} training, {data.eval_size} '
              f'{data.eval_split} examples, {data.num_classes} classes; '
              f'resolution {resize}->{crop}, {schedule[-1]} steps, '
              f'mixup {mixup}, '
              f'{replicas} {device_kind(strategy)} replica(s) '
              f'({type(strategy).__name__}), {args.precision}'
              f'{", XLA" if xla else ""}')

  train_step, eval_step = make_steps(strategy, model, optimizer, lr,
                                     args.batch, args.batch_split, xla)
  eval_batch = args.batch_eval or args.batch // args.batch_split
  eval_batch = -(-eval_batch // replicas) * replicas
  eval_data = distribute(strategy, lambda pid, nproc: input_pipeline
                         .eval_batches(data, eval_batch, crop, pid, nproc))
  metrics = bit_run.Metrics(args, step) if chief else None

  def save(step):
    if not manager or (manager.latest_checkpoint and
                       _saved_step(manager) == step):
      return
    step_var.assign(step)
    manager.save(checkpoint_number=step)

  def evaluate(step):
    sums = np.zeros(4)
    for batch in input_pipeline.named_errors(iter(eval_data)):
      sums += np.asarray(eval_step(batch), np.float64)
    loss, top1, top5, n = sums
    result = dict(loss=loss / n, top1=top1 / n, top5=top5 / n, n=int(n))
    bit_run.log_validation(logger, step, result)
    if chief:
      metrics.write(step, 'val', **result)
    save(step)
    return result

  batches = input_pipeline.named_errors(iter(distribute(
      strategy, lambda pid, nproc: input_pipeline.train_batches(
          data, args.batch, resize, crop, args.seed, step, mixup, pid,
          nproc))))

  def train_one(step, rate):
    del step  # The pipeline yields the batch of each step in turn.
    return float(train_step(next(batches), tf.constant(rate, tf.float32)))

  result, step = bit_run.fine_tune_loop(
      args, step, n_train, train_one, evaluate, save, logger, metrics,
      _stop_vote(strategy))
  if chief:
    metrics.close()
    if args.save:
      model.save_npz(os.path.join(bit_common.run_dir(args), EXPORT))
    if args.export_saved_model:
      model.export_saved_model(os.path.join(bit_common.run_dir(args),
                                            SAVED_MODEL))
    bit_run.write_results(args, result, step, n_train, logger)
  return dict(result, step=step)


def device_kind(strategy):
  """CPU, GPU or TPU: the kind of the strategy's first device."""
  devices = strategy.extended.worker_devices
  return tf.DeviceSpec.from_string(devices[0]).device_type or 'CPU'


def _stop_vote(strategy):
  """vote(stop) -> whether any worker was asked to stop, so that all stop
  at the same step."""
  if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
    return lambda stop: stop

  @tf.function
  def anyone(stop):
    flags = strategy.run(lambda s: s, args=(stop,))
    return strategy.reduce(tf.distribute.ReduceOp.SUM, flags, axis=None) > 0

  return lambda stop: bool(anyone(tf.constant(float(stop))))


# --------------------------------------------------------------------------
# Checkpoints (tf.train.CheckpointManager): model, optimiser state (momentum,
# loss scale) and step. TF writes the files first and then, atomically, the
# index that names them, so an interrupted save leaves the previous one in
# force. The data order, crops, flips and mixup follow from (--seed, step),
# so the step is the data state. The run's settings sit beside, in RUN.

RUN = 'run.json'


def _checkpoints(args, checkpoint, chief):
  directory = os.path.join(bit_common.run_dir(args), CHECKPOINTS)
  if not chief:  # Every worker must save; only the chief's copy is kept.
    directory = tempfile.mkdtemp(prefix='bit_tf2_worker_')
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
  return tf.train.CheckpointManager(checkpoint, directory, max_to_keep=1)


def _saved_step(manager):
  return int(manager.latest_checkpoint.rsplit('-', 1)[-1])


def _resume(manager, checkpoint, run, logger):
  """Restores the latest checkpoint when there is one; returns its step.

  Also writes the run's settings beside a new checkpoint folder."""
  run_file = os.path.join(manager.directory, RUN)
  path = manager.latest_checkpoint
  if path is None:
    bit_run.write_json(run_file, run)
    return 0
  try:
    with open(run_file) as f:
      saved = json.load(f)
  except (OSError, ValueError) as e:
    raise bit_common.BadInput(
        f'cannot read {run_file} ({e}); delete {manager.directory} to start '
        'the run afresh.') from e
  bit_run.check_same_run(saved, run, manager.directory)
  try:
    checkpoint.restore(path).assert_existing_objects_matched()
  except (ValueError, AssertionError, tf.errors.OpError) as e:
    raise bit_common.BadInput(
        f'cannot read checkpoint {path} ({str(e).splitlines()[0]}); delete '
        f'{manager.directory} to start the run afresh.') from e
  step = int(checkpoint.step.numpy())
  logger.info(f'resuming from {path} at step {step}')
  return step


if __name__ == '__main__':
  bit_common.run_cli(lambda: main(argparser().parse_args()))
