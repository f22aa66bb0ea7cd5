"""Knowledge distillation in TensorFlow 2 / Keras 3 (see big_transfer.distill
for the method, the recipe and the flags):

  python -m bit_tf2.distill --recipe distill_digits_small \\
      --name student --logdir runs --teacher runs/teacher

The strategy is fine-tuning's (bit_tf2.train.make_strategy). In a step,
each replica runs the teacher (training=False, outside the gradient tape)
and the student on the same images (after crop, flip and mixup, from the
shared data stream through big_transfer.loader, at the teacher's
resolution; the student's resized to its own when the teacher's differs,
bilinear and antialiased); the replicas' gradients are summed, then
clipped and applied by big_transfer.distill's optimiser (Adam's moments are
variables of the checkpoint). Only the student is trained, checkpointed
and exported.
"""
import contextlib
import os

import keras
import tensorflow as tf

from big_transfer import (datasets, distill, flags, harness, loader,
                          memory, recipes)
import bit_common
from bit_tf2 import engine
from bit_tf2 import models


def kl_per_example(student_logits, teacher_logits, temperature=1.0):
  """T^2 * KL(p_teacher || q_student) of each row (distill.kl_loss
  before the mean)."""
  t = float(temperature)
  log_p = tf.nn.log_softmax(tf.cast(teacher_logits, tf.float32) / t)
  log_q = tf.nn.log_softmax(tf.cast(student_logits, tf.float32) / t)
  return t * t * tf.reduce_sum(tf.exp(log_p) * (log_p - log_q), -1)


class Adam(tf.Module):
  """big_transfer.distill's optimiser: the summed gradient clipped to global
  norm, Adam's bias-corrected moments, w <- w - f * (lr * m_hat / (sqrt(v_hat)
  + eps) + wd * w) with wd on kernels only. Create and apply under the
  strategy's scope (applied in cross-replica context, to each replica's
  copy of the variables)."""

  def __init__(self, variables, recipe):
    super().__init__(name='adam')
    self.recipe = recipe
    self.strategy = tf.distribute.get_strategy()  # the scope's
    self.count = tf.Variable(0, dtype=tf.int64, trainable=False)
    self.m = [tf.Variable(tf.zeros(v.shape, tf.float32), trainable=False)
              for v in variables]
    self.v = [tf.Variable(tf.zeros(v.shape, tf.float32), trainable=False)
              for v in variables]

  def apply(self, grads, variables, factor):
    """One update: the decay, then TF's fused Adam op (one pass over each
    variable, as fine-tuning's SGD), whose epsilon is added to sqrt(v), not
    to sqrt(v_hat): eps * sqrt(1 - b2^t) there is the rule's eps."""
    r = self.recipe
    b1, b2 = distill.ADAM_B1, distill.ADAM_B2
    if r.grad_clip_norm:
      norm = tf.linalg.global_norm(grads)
      scale = tf.where(norm < r.grad_clip_norm, 1.0, r.grad_clip_norm / norm)
      grads = [g * scale for g in grads]
    self.count.assign_add(1)
    c = tf.cast(self.count, tf.float32)
    b1_power, b2_power = b1 ** c, b2 ** c
    eps = distill.ADAM_EPS * tf.sqrt(1 - b2_power)
    lr, decay = factor * r.base_lr, factor * r.weight_decay

    def update(var, grad, m, v, decays):
      if decays:
        var.assign_sub(decay * var)
      tf.raw_ops.ResourceApplyAdam(
          var=var.handle, m=m.handle, v=v.handle, beta1_power=b1_power,
          beta2_power=b2_power, lr=lr, beta1=b1, beta2=b2, epsilon=eps,
          grad=grad)

    for var, g, m, v in zip(variables, grads, self.m, self.v):
      if isinstance(var, keras.Variable):
        var = var.value  # its tf.Variable (a distributed one under a strategy)
      self.strategy.extended.update(var, update, args=(
          g, m, v, len(var.shape) > 1 and bool(r.weight_decay)), group=False)


def student_view(images, size):
  """The teacher's view `images` (NHWC) at the student's resolution `size`
  (bilinear, antialiased, as PyTorch's F.interpolate(..., antialias=True));
  as is when already of that size."""
  if tuple(images.shape[1:3]) == (size, size):
    return images
  return tf.image.resize(images, (size, size), 'bilinear', antialias=True)


def make_steps(strategy, student, teacher, adam, recipe, batch_split,
               xla=False):
  """(train_step, eval_step), tf.functions over `strategy`; both take
  big_transfer.loader's batches at the teacher's resolution. `xla`: whether
  XLA compiles a micro-batch's teacher and student passes with the
  student's gradients, and those of the evaluation step (as in
  fine-tuning); the student's view is resized outside them (XLA has no
  kernel for the antialiased resize)."""
  variables = student.trainable_variables
  batch = recipe.batch
  micro = batch // strategy.num_replicas_in_sync // batch_split
  t = recipe.temperature

  @tf.function(jit_compile=xla)
  def passes(images, view, labels):
    if recipe.targets == 'teacher':
      target = tf.stop_gradient(teacher(images, training=False))
    with tf.GradientTape() as tape:
      logits = student(view, training=True)
      if recipe.targets == 'labels':
        per_row = tf.nn.softmax_cross_entropy_with_logits(labels, logits)
      else:
        per_row = kl_per_example(logits, target, t)
      loss = tf.reduce_sum(per_row) / batch
    return loss, tape.gradient(loss, variables)

  def gradients(images, labels):
    return passes(images, student_view(images, recipe.crop_size), labels)

  def replica_step(batch):
    return engine.accumulate(gradients, engine.train_images(batch),
                             batch['label'], batch_split, micro, variables)

  @tf.function
  def train_step(dist_batch, factor):
    loss, grads = strategy.run(replica_step, args=(dist_batch,))
    total = lambda x: strategy.reduce(tf.distribute.ReduceOp.SUM, x,
                                      axis=None)
    grads = [total(g) for g in grads]
    adam.apply(grads, variables, factor)
    return total(loss)

  @tf.function(jit_compile=xla)
  def eval_passes(images, view, labels, mask):
    s = tf.cast(student(view, training=False), tf.float32)
    te = tf.cast(teacher(images, training=False), tf.float32)
    labels = tf.cast(labels, tf.int64)
    m = tf.cast(mask, tf.float32)
    f = lambda b: tf.reduce_sum(tf.cast(b, tf.float32) * m)
    return tf.concat([engine.eval_sums(s, labels, mask), tf.stack([
        f(tf.argmax(s, 1) == tf.argmax(te, 1)), f(tf.argmax(te, 1) == labels),
        f(kl_per_example(s, te, t))])], 0)

  def replica_eval(images, labels, mask):
    images = models.unit_range(images)
    return eval_passes(images, student_view(images, recipe.crop_size),
                       labels, mask)

  return train_step, engine.eval_step(strategy, replica_eval)


def build_nets(args, recipe, classes, dtype):
  """(teacher, student), under the strategy's scope."""
  teacher = models.create(
      recipe.teacher, weights=distill.teacher_weights(recipe, args, classes),
      dtype=dtype)
  teacher.trainable = False
  keras.utils.set_random_seed(args.seed)  # the student's initialisation
  student = models.create(recipe.student, head_size=classes, zero_head=True,
                          weights=distill.student_weights(recipe, args),
                          dtype=dtype)
  return teacher, student


def tf2_flags():
  """Flags of the TF2 backend only."""
  parent, g = flags.group('TF2')
  engine.add_compile(g)
  return parent


def argparser():
  return distill.argparser('tf2', tf2_flags())


def main(args):
  """Distils as the recipe says; returns the final evaluation."""
  args = bit_common.with_backend_defaults(args, tf2_flags())
  recipe = distill.load_recipe(args)
  deterministic = engine.deterministic()  # the same command, the same result
  strategy = engine.make_strategy()
  replicas = strategy.num_replicas_in_sync
  xla = engine.uses_xla(strategy, args.compile)
  flags.resolve_precision(args, engine.native_bf16(strategy))
  recipes.check_args(args, recipe.batch, replicas)
  with distill.Run(args, engine.is_chief(strategy),
                   engine.any_process(strategy),
                   command='bit_tf2.distill') as run:
    run.logger.info(f'recipe {args.recipe}: {recipe}')
    if not deterministic:
      run.logger.warning('TensorFlow was started before bit_tf2 could ask it '
                         'for one inter-op thread: two runs of this command '
                         'may differ in their last digits.')
    engine.chief_first(strategy, distill.fetch_weights, recipe, args)
    data = datasets.load(distill.data_args(args, recipe), run.logger)
    train_size = len(data.train)
    sched = distill.schedule(recipe, train_size)
    with strategy.scope():
      teacher, student = build_nets(args, recipe, data.num_classes,
                                    engine.POLICIES[args.precision])
      adam = Adam(student.trainable_variables, recipe)
      step_var = tf.Variable(0, dtype=tf.int64, trainable=False, name='step')
    memory.for_run(run, args, student.architecture, recipe.crop_size,
                   replicas, engine.device_memory(strategy), recipe.batch,
                   teacher.architecture)

    settings = distill.settings(recipe, args, sched)
    ckpt = engine.Checkpoints(
        os.path.join(run.dir, 'checkpoints'), settings, run.lead,
        # The student's variables by list as well: tf.train.Checkpoint does
        # not reach those of the layers the model keeps in Python lists (its
        # blocks); a Keras optimizer would carry them, this Adam does not.
        tf.train.Checkpoint(model=student, weights=list(student.weights),
                            adam=adam, step=step_var))
    step = run.resume(ckpt, settings)
    export = distill.export_path(args, run)
    classes = list(data.classes)
    run.start(step, distill.config(
        recipe, sched, train_size, len(data.val), classes, export,
        devices=replicas, strategy=type(strategy).__name__, xla=xla,
        versions=harness.versions('tensorflow', 'keras')),
              distill.describe(recipe, sched, train_size,
                                   data.num_classes) +
              f'; {replicas} replica(s) ({type(strategy).__name__}), '
              f'{args.precision}{", XLA" if xla else ""}',
              engine.device_kind(strategy), 'tf2')

    train_step, eval_step = make_steps(strategy, student, teacher, adam,
                                       recipe, args.batch_split, xla)
    eval_batch = flags.eval_batch(recipe.batch_eval, recipe.batch, replicas)
    pid, nproc = engine.worker(strategy)

    def evaluate():
      return engine.evaluate(strategy, eval_step, loader.eval_batches(
          data.val, eval_batch, recipe.teacher_size, pid, nproc,
          args.workers, progress='evaluating'))

    # The loader's worker processes stop when it closes.
    batches = distill.loader_batches(recipe, args, data.train,
                                     data.num_classes, step, (pid, nproc))

    def train(step, lr):
      del lr  # the step takes the schedule's factor
      return train_step(engine.to_replicas(strategy, next(batches)),
                        tf.constant(sched.factor(step), tf.float32))

    with contextlib.closing(batches):
      result, step = run.fit(step, sched.total_steps, sched.lr, train,
                             evaluate, ckpt,
                             eval_every=distill.eval_every(recipe, sched),
                             batch=recipe.batch)
    return run.finish(result, step, lambda _: student.save_npz(export),
                      teacher=recipe.teacher, student=recipe.student,
                      exported_to=export)


if __name__ == '__main__':
  distill.main_cli(main, argparser())
