"""Fine-tunes a BiT model with the BiT-HyperRule, in JAX/Flax.

  python -m bit_jax.train --name cifar10_run --model BiT-M-R50x1 \\
      --logdir /tmp/bit_logs --dataset cifar10

One compiled step (jax.jit) runs data-parallel over every device: the batch
is sharded over a one-axis mesh of all devices, the parameters replicated.
With --distributed, jax.distributed.initialize() joins the processes of a
TPU pod or a multi-node GPU job first, and each process feeds its share of
the batch. The same global batch gives the same update on any number of
devices. --batch_split accumulates micro-batch gradients inside the step.

In-process use: `main(args)` with `args = argparser().parse_args([...])` (or
`bit_common.argparser()`'s) runs one fine-tuning and returns the final
evaluation.
"""
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import bit_common
import bit_zoo
import bit_run
from bit_jax import models

CHECKPOINTS = 'checkpoints'
EXPORT = 'model.npz'
DTYPES = {'fp32': jnp.float32, 'bf16': jnp.bfloat16}


def add_jax_flags(parser):
  """Flags of the JAX backend only."""
  parser.add_argument('--distributed', action='store_true',
                      help='JAX only: call jax.distributed.initialize() first '
                      '(TPU pods, SLURM or multi-node GPU jobs), so every '
                      'process trains one model together.')
  return parser


def argparser():
  return bit_common.backend_argparser(add_jax_flags)


# --------------------------------------------------------------------------
# The compiled steps.

def make_steps(model, tx, mesh, batch_split):
  """(train_step, eval_step), jitted over `mesh` (batch sharded on 'data')."""
  replicated = NamedSharding(mesh, P())
  sharded = NamedSharding(mesh, P('data'))

  def loss_fn(params, images, labels):
    logits = model.apply({'params': params}, images)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32),
                                       labels).mean()

  grad_fn = jax.value_and_grad(loss_fn)

  def train_step(params, opt_state, images, labels, lr):
    if batch_split == 1:
      loss, grads = grad_fn(params, images, labels)
    else:
      # Micro-batch j holds examples j, j + split, ...: every device keeps
      # its own rows, so splitting moves no data between devices.
      def micro(x):
        x = x.reshape(-1, batch_split, *x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(
            x, NamedSharding(mesh, P(None, 'data')))

      def accumulate(acc, xy):
        loss, grads = grad_fn(params, *xy)
        return jax.tree.map(jnp.add, acc, (loss, grads)), None

      zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like,
                                                        params))
      (loss, grads), _ = jax.lax.scan(accumulate, zeros,
                                      (micro(images), micro(labels)))
      loss, grads = jax.tree.map(lambda v: v / batch_split, (loss, grads))
    opt_state.hyperparams['learning_rate'] = lr
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  def eval_step(params, images, labels, mask):
    """Sums over the real rows: loss, top-1 hits, top-5 hits, count."""
    logits = model.apply({'params': params}, images).astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    k = min(5, logits.shape[-1])
    top = jax.lax.top_k(logits, k)[1] == labels[:, None]
    m = mask.astype(jnp.float32)
    return jnp.stack([(loss * m).sum(), (top[:, 0] * m).sum(),
                      (top.any(1) * m).sum(), m.sum()])

  train = jax.jit(train_step, donate_argnums=(0, 1),
                  in_shardings=(replicated, replicated, sharded, sharded,
                                replicated),
                  out_shardings=(replicated, replicated, replicated))
  evaluate = jax.jit(eval_step, in_shardings=(replicated, sharded, sharded,
                                              sharded),
                     out_shardings=replicated)
  return train, evaluate


def optimizer():
  """SGD with momentum 0.9; the learning rate is set at every step."""
  return optax.inject_hyperparams(optax.sgd)(learning_rate=0.0, momentum=0.9)


# --------------------------------------------------------------------------
# One run.

def main(args):
  """Fine-tunes as `args` say; returns the final evaluation (results.json)."""
  args = bit_common.with_backend_defaults(args, add_jax_flags)
  if args.precision == 'fp16':
    raise bit_common.BadInput(
        '--precision fp16 is not supported by the JAX backend (it has no '
        'loss scaling, and fp16 without it under- and overflows); use bf16.')
  if args.distributed:
    jax.distributed.initialize()
  devices = jax.devices()
  bit_common.check_args(args, len(devices))
  # The pipeline's TensorFlow must leave accelerators to JAX.
  import tensorflow as tf
  tf.config.set_visible_devices([], 'GPU')
  import input_pipeline_tf2_or_jax as input_pipeline

  lead = jax.process_index() == 0
  logger = bit_common.run_logger(args, lead)
  data = input_pipeline.load(args, logger)
  n_train = data.train_size
  resize, crop, schedule, mixup = bit_run.hyperrule(args, n_train,
                                                       data.original_hw)
  weights = bit_zoo.load_npz(bit_zoo.weights_path(
      args.model, args.bit_pretrained_dir))
  model, params = models.create(args.model, head_size=data.num_classes,
                                zero_head=True, weights=weights,
                                dtype=DTYPES[args.precision])
  del weights
  tx = optimizer()
  mesh = Mesh(np.array(devices), ('data',))
  replicated = NamedSharding(mesh, P())
  sharded = NamedSharding(mesh, P('data'))
  state = jax.device_put({'params': params, 'opt_state': tx.init(params)},
                         replicated)

  classes = list(data.classes) if data.classes else data.num_classes
  run = bit_run.run_settings(args, classes, n_train, schedule, resize,
                                crop)
  manager = _checkpoints(args) if args.save else None
  step, state = _resume(manager, run, state, logger) if manager else (0, state)

  config = dict(vars(args), resolution=[resize, crop], schedule=schedule,
                mixup=mixup, dataset_size=n_train, classes=classes,
                data=data.describe(), devices=len(devices),
                device_kind=devices[0].device_kind,
                processes=jax.process_count(), resumed_from_step=step,
                versions=bit_run.versions(jax, flax, optax, tf))
  if lead:
    bit_run.write_json(os.path.join(bit_common.run_dir(args),
                                       'config.json'), config)
  logger.info(f'{args.dataset}: {n_train} training, {data.eval_size} '
              f'{data.eval_split} examples, {data.num_classes} classes; '
              f'resolution {resize}->{crop}, {schedule[-1]} steps, '
              f'mixup {mixup}, '
              f'{len(devices)} {devices[0].platform} device(s), '
              f'{args.precision}')

  train_step, eval_step = make_steps(model, tx, mesh, args.batch_split)
  pid, nproc = jax.process_index(), jax.process_count()
  eval_batch = args.batch_eval or args.batch // args.batch_split
  eval_batch = -(-eval_batch // len(devices)) * len(devices)
  metrics = bit_run.Metrics(args, step) if lead else None

  def to_global(batch):
    return {k: jax.make_array_from_process_local_data(sharded, v)
            for k, v in batch.items()}

  def evaluate(step):
    sums = np.zeros(4)
    for batch in input_pipeline.named_errors(input_pipeline.eval_batches(
        data, eval_batch, crop, pid, nproc).as_numpy_iterator()):
      b = to_global(batch)
      sums += np.asarray(eval_step(state['params'], b['image'], b['label'],
                                   b['mask']), np.float64)
    loss, top1, top5, n = sums
    result = dict(loss=loss / n, top1=top1 / n, top5=top5 / n, n=int(n))
    bit_run.log_validation(logger, step, result)
    if lead:
      metrics.write(step, 'val', **result)
    if manager:
      _save(manager, step, state, run)
    return result

  batches = input_pipeline.named_errors(input_pipeline.train_batches(
      data, args.batch, resize, crop, args.seed, step, mixup, pid,
      nproc).as_numpy_iterator())

  def train_one(step, lr):
    del step  # The pipeline yields the batch of each step in turn.
    nonlocal state
    b = to_global(next(batches))
    params, opt_state, loss = train_step(
        state['params'], state['opt_state'], b['image'], b['label'],
        jnp.float32(lr))
    state = {'params': params, 'opt_state': opt_state}
    return float(loss)

  def save(step):
    if manager:
      _save(manager, step, state, run)
      manager.wait_until_finished()

  result, step = bit_run.fine_tune_loop(
      args, step, n_train, train_one, evaluate, save, logger, metrics,
      _agree_to_stop)
  if manager:
    manager.wait_until_finished()
  if lead:
    metrics.close()
    if args.save:
      # Replicated: this process's first copy is the whole array.
      models.save_npz(os.path.join(bit_common.run_dir(args), EXPORT),
                      jax.tree.map(lambda x: np.asarray(x.addressable_data(0)),
                                   state['params']))
    bit_run.write_results(args, result, step, n_train, logger)
  return dict(result, step=step)


def _agree_to_stop(stop):
  """Whether any process was asked to stop (all stop at the same step)."""
  if jax.process_count() == 1:
    return stop
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.array(stop))))


# --------------------------------------------------------------------------
# Checkpoints (orbax): parameters, optimiser state and step, written to a
# temporary folder and renamed when complete. The data order, crops, flips
# and mixup follow from (--seed, step), so the step is the data state.

def _checkpoints(args):
  path = os.path.abspath(os.path.join(bit_common.run_dir(args), CHECKPOINTS))
  return ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(
      max_to_keep=1, create=True, cleanup_tmp_directories=True))


def _save(manager, step, state, run):
  if manager.latest_step() == step:
    return
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), run=ocp.args.JsonSave(run)))


def _resume(manager, run, state, logger):
  """(step, state) of the latest checkpoint, or (0, state) without one."""
  step = manager.latest_step()
  if step is None:
    return 0, state
  try:
    saved = manager.restore(step, args=ocp.args.Composite(
        run=ocp.args.JsonRestore()))['run']
  except Exception as e:  # pylint: disable=broad-except
    raise bit_common.BadInput(
        f'cannot read checkpoint {manager.directory}/{step} ({e}); delete it '
        'to start the run afresh.') from e
  bit_run.check_same_run(dict(saved, schedule=list(saved['schedule'])),
                            run, manager.directory)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  state = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract)))['state']
  logger.info(f'resuming from {manager.directory} at step {step}')
  return step, state


if __name__ == '__main__':
  bit_common.run_cli(lambda: main(argparser().parse_args()))
