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
with XLA (--compile, --no-compile decide).

The training loop, the run's outputs, checkpoint cadence and signals live in
the shared harness (harness.Run); the batches come from the shared data
stream (datastream.Stream) through the framework-neutral loader
(big_transfer.loader), decoded as PyTorch and JAX decode them, as uint8
that the step scales and mixes; the strategy, per-replica batches,
collectives and the checkpoint format are those every TF2 program shares
(bit_tf2.engine). This file holds the optimiser and the compiled steps and
puts them together for fine-tuning.

In-process use: `main(args)` with `args = argparser().parse_args([...])` (or
`bit_common.argparser()`'s: the TF2-only flags then take their defaults)
runs one fine-tuning and returns the final evaluation.
"""
import contextlib
import os

import keras
import tensorflow as tf

from big_transfer import (datasets, errors, flags, harness, held, loader,
                          memory, runfiles, zoo)
import bit_common
from bit_tf2 import engine
from bit_tf2 import models
from bit_tf2.engine import (POLICIES, Checkpoints, accumulate, any_process,
                            chief_first, device_kind, device_memory,
                            eval_sums, is_chief, make_strategy, to_replicas,
                            train_images, uses_xla, worker)

SAVED_MODEL = 'saved_model'


def tf2_flags():
  """Flags of the TF2 backend only."""
  parent, g = flags.group('TF2')
  g.add_argument('--export_saved_model', action='store_true',
                 help='TF2 only: also export the fine-tuned model as a '
                 f'SavedModel for serving, to LOGDIR/NAME/{SAVED_MODEL}.')
  engine.add_compile(g)
  return parent


def argparser():
  return bit_common.argparser(backend_flags=tf2_flags())


# --------------------------------------------------------------------------
# The optimiser and the compiled steps.

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
    """TF's fused momentum op, which computes this rule: one pass over
    each variable instead of five ops."""
    m = self.momentums[self._get_variable_index(variable)]
    tf.raw_ops.ResourceApplyMomentum(
        var=variable.handle, accum=m.value.handle,
        lr=tf.cast(learning_rate, variable.dtype),
        grad=tf.cast(gradient, variable.dtype),
        momentum=tf.cast(self.momentum, variable.dtype))


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
  `batch` images (all replicas together; big_transfer.loader's uint8
  images, with their mixup partners and weights where mixup is on) is
  split into `batch_split` micro-batches whose gradients are accumulated:
  one update, as for one big batch. eval_step(dist_batch) -> sums (loss,
  top-1, top-5, count) over the rows whose mask is True. `xla`: whether
  XLA compiles the training step's gradients and the evaluation step.
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

  def replica_step(batch):
    loss, grads = accumulate(gradients, train_images(batch), batch['label'],
                             batch_split, micro, variables)
    optimizer.apply_gradients(zip(grads, variables))
    return loss

  @tf.function
  def train_step(dist_batch, learning_rate):
    lr.assign(learning_rate)
    losses = strategy.run(replica_step, args=(dist_batch,))
    return strategy.reduce(tf.distribute.ReduceOp.SUM, losses, axis=None)

  @tf.function(jit_compile=xla)
  def replica_eval(images, labels, mask):
    return eval_sums(model(images, training=False), labels, mask)

  return train_step, engine.eval_step(strategy, replica_eval)


# --------------------------------------------------------------------------
# One run. The loop, outputs, checkpoint cadence and signals are the shared
# harness's (harness.Run.fit); this file holds what TensorFlow needs.

def main(args):
  """Fine-tunes as `args` say; returns the final evaluation (results.json)."""
  args = bit_common.with_backend_defaults(args, tf2_flags())
  deterministic = engine.deterministic()
  keras.utils.set_random_seed(args.seed)
  strategy = make_strategy()
  replicas = strategy.num_replicas_in_sync
  flags.resolve_precision(args, engine.native_bf16(strategy))
  chief_first(strategy, bit_common.check_args, args, replicas)
  xla = uses_xla(strategy, args.compile)
  with harness.Run(args, is_chief(strategy), any_process(strategy),
                   command='bit_tf2.train') as run:
    if not deterministic:
      run.logger.warning('TensorFlow was started before bit_tf2 could ask it '
                         'for one inter-op thread: two runs of this command '
                         'may differ in their last digits.')
    chief_first(strategy, zoo.fetch, args.bit_pretrained_dir, args.model)
    data = datasets.load(args, run.logger)
    train_size = len(data.train)
    hyper = harness.HyperRule.of(args, train_size, data.original_hw)
    weights = zoo.load_weights(args.model, args.bit_pretrained_dir)
    with strategy.scope():
      model = models.create(args.model, head_size=data.num_classes,
                            zero_head=True, weights=weights,
                            dtype=POLICIES[args.precision])
      optimizer, lr = make_optimizer(args.precision)
      optimizer.build(model.trainable_variables)
      step_var = tf.Variable(0, dtype=tf.int64, trainable=False, name='step')
    del weights
    memory.for_run(run, args, model.architecture, hyper.crop, replicas,
                   device_memory(strategy))

    classes = list(data.classes)
    settings = hyper.settings(args, classes)
    ckpt = Checkpoints(os.path.join(run.dir, runfiles.CHECKPOINTS), settings,
                       run.lead, tf.train.Checkpoint(model=model,
                                                     optimizer=optimizer,
                                                     step=step_var))
    step = run.resume(ckpt, settings)
    pid, nproc = worker(strategy)
    path = held.for_run(run, args, train_size, hyper, data.train.load,
                        data.train.decoded, (pid, nproc))
    data.train = held.Held(path, data.train.labels) if path else data.train
    run.start(step, dict(hyper.config(), classes=classes, data=data.describe(),
                         devices=replicas, strategy=type(strategy).__name__,
                         device_kind=device_kind(strategy),
                         xla=xla,
                         versions=harness.versions('tensorflow', 'keras')),
              f'{args.dataset}: {train_size} training, {len(data.val)} '
              f'{data.eval_split} examples, {data.num_classes} classes; '
              f'{hyper.describe()}, {replicas} {device_kind(strategy)} '
              f'replica(s) ({type(strategy).__name__}), {args.precision}'
              f'{", XLA" if xla else ""}', device_kind(strategy), 'tf2')

    train_step, eval_step = make_steps(strategy, model, optimizer, lr,
                                       args.batch, args.batch_split, xla)
    eval_batch = flags.eval_batch(args.batch_eval,
                                  args.batch // args.batch_split, replicas)

    def evaluate():
      return engine.evaluate(strategy, eval_step, loader.eval_batches(
          data.val, eval_batch, hyper.crop, pid, nproc, args.workers,
          progress='evaluating'))

    # The loader's worker processes stop when it closes.
    batches = loader.train_batches(
        data.train, data.num_classes, hyper.stream(args), hyper.resize,
        hyper.crop, step, pid, nproc, workers=args.workers)

    def train(step, rate):
      del step  # The loader yields the batch of each step in turn.
      return train_step(to_replicas(strategy, next(batches)),
                        tf.constant(rate, tf.float32))

    with contextlib.closing(batches):
      result, step = run.fit(step, hyper.total, hyper.lr, train, evaluate,
                             ckpt)
    if run.lead and args.export_saved_model and args.save:
      model.export_saved_model(os.path.join(run.dir, SAVED_MODEL))
    return run.finish(result, step, model.save_npz, model=args.model,
                      dataset=args.dataset, dataset_size=train_size,
                      examples_per_class=args.examples_per_class)


if __name__ == '__main__':
  errors.run_cli(lambda: main(argparser().parse_args()))
