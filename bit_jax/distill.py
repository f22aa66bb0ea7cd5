"""Knowledge distillation in JAX/Flax (see big_transfer.distill for the
method, the recipe and the flags):

  python -m bit_jax.distill --recipe distill_digits_small \\
      --name student --logdir runs --teacher runs/teacher

One compiled step, data-parallel over every device as fine-tuning's
(bit_jax.train): the teacher's logits of the step's images (after crop,
flip and mixup, from the shared data stream through big_transfer.loader,
at the teacher's resolution) are computed inside it without gradients
(stop_gradient), and the student is trained on the same images, resized
to its own resolution when the teacher's differs (bilinear, antialiased).
Only the student's parameters and optimiser state are checkpointed and
exported.
"""
import contextlib
import os

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

import bit_common
from big_transfer import (datasets, distill, flags, harness, loader,
                          memory, recipes, runfiles)
from bit_jax import engine
from bit_jax import models


def kl_loss(student_logits, teacher_logits, temperature=1.0):
  """distill.kl_loss in JAX: T^2 * mean KL(p_teacher || q_student)."""
  t = float(temperature)
  log_p = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / t)
  log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t)
  return t * t * jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), -1))


def optimizer(recipe):
  """Clipping and Adam's moments (big_transfer.distill's optimiser); the
  step scales and applies the result (`apply`)."""
  clip = (optax.clip_by_global_norm(recipe.grad_clip_norm)
          if recipe.grad_clip_norm else optax.identity())
  return optax.chain(clip, optax.scale_by_adam(
      distill.ADAM_B1, distill.ADAM_B2, distill.ADAM_EPS))


def student_view(images, size):
  """The teacher's view `images` (NHWC) at the student's resolution `size`
  (bilinear, antialiased, as PyTorch's F.interpolate(..., antialias=True));
  as is when already of that size."""
  n, h, w, c = images.shape
  if (h, w) == (size, size):
    return images
  return jax.image.resize(images, (n, size, size, c), 'bilinear',
                          antialias=True)


def make_steps(student, teacher, recipe, tx, mesh, batch_split):
  """(train_step, eval_step), jitted over `mesh` (batch sharded on
  'data', parameters replicated); both take images at the teacher's
  resolution."""
  replicated = NamedSharding(mesh, P())
  sharded = NamedSharding(mesh, P('data'))
  t = recipe.temperature

  def loss_fn(params, teacher_params, images, labels):
    logits = student.apply({'params': params}, student_view(
        images, recipe.crop_size)).astype(jnp.float32)
    if recipe.targets == 'labels':
      return optax.softmax_cross_entropy(logits, labels).mean()
    target = jax.lax.stop_gradient(teacher.apply(
        {'params': teacher_params}, images).astype(jnp.float32))
    return kl_loss(logits, target, t)

  grad_fn = jax.value_and_grad(loss_fn)

  def train_step(params, opt_state, teacher_params, batch, factor):
    loss, grads = engine.accumulate(
        lambda p, x, y: grad_fn(p, teacher_params, x, y), params,
        engine.train_images(batch), batch['label'], batch_split, mesh)
    updates, opt_state = tx.update(grads, opt_state, params)

    def apply(p, u):
      wd = recipe.weight_decay if p.ndim > 1 else 0.0
      return p - factor * (recipe.base_lr * u + wd * p)
    return jax.tree.map(apply, params, updates), opt_state, loss

  def eval_step(params, teacher_params, images, labels, mask):
    """distill.eval_sums over the real rows."""
    images = models.unit_range(images)  # scaled before the resize
    s = student.apply({'params': params}, student_view(
        images, recipe.crop_size)).astype(jnp.float32)
    te = teacher.apply({'params': teacher_params}, images).astype(
        jnp.float32)
    log_p = jax.nn.log_softmax(te / t)
    kl = t * t * jnp.sum(jnp.exp(log_p) * (log_p - jax.nn.log_softmax(
        s / t)), -1)
    m = mask.astype(jnp.float32)
    return jnp.concatenate([engine.eval_sums(s, labels, mask), jnp.stack([
        ((s.argmax(1) == te.argmax(1)) * m).sum(),
        ((te.argmax(1) == labels) * m).sum(), (kl * m).sum()])])

  train = jax.jit(train_step, donate_argnums=(0, 1),
                  in_shardings=(replicated, replicated, replicated, sharded,
                                replicated),
                  out_shardings=(replicated, replicated, replicated))
  evaluate = jax.jit(eval_step, in_shardings=(
      replicated, replicated, sharded, sharded, sharded),
                     out_shardings=replicated)
  return train, evaluate


def build_nets(args, recipe, classes, dtype):
  """((teacher, teacher params), (student, student params))."""
  teacher = models.create(
      recipe.teacher, weights=distill.teacher_weights(recipe, args, classes),
      dtype=dtype)
  student = models.create(recipe.student, head_size=classes, zero_head=True,
                          weights=distill.student_weights(recipe, args),
                          dtype=dtype, rng=jax.random.PRNGKey(args.seed))
  return teacher, student


def argparser():
  return distill.argparser('jax', engine.distributed_flags())


def main(args):
  """Distils as the recipe says; returns the final evaluation. With
  --distributed, on the processes of a job, as fine-tuning."""
  args = bit_common.with_backend_defaults(args, engine.distributed_flags())
  recipe = distill.load_recipe(args)
  engine.initialize_distributed(args)
  parallel = engine.DataParallel()
  devices = parallel.devices
  flags.resolve_precision(args, parallel.native_bf16)
  recipes.check_args(args, recipe.batch, len(devices))

  pid, nproc = jax.process_index(), jax.process_count()
  with distill.Run(args, pid == 0,
                   engine.any_process if nproc > 1 else None,
                   command='bit_jax.distill') as run:
    run.logger.info(f'recipe {args.recipe}: {recipe}')
    engine.lead_first(distill.fetch_weights, recipe, args)
    data = datasets.load(distill.data_args(args, recipe), run.logger)
    train_size = len(data.train)
    sched = distill.schedule(recipe, train_size)
    (teacher, teacher_params), (student, params) = build_nets(
        args, recipe, data.num_classes, engine.DTYPES[args.precision])
    memory.for_run(run, args, student.architecture, recipe.crop_size,
                   len(devices), parallel.device_memory(), recipe.batch,
                   teacher.architecture)
    tx = optimizer(recipe)
    teacher_params = jax.device_put(teacher_params, parallel.replicated)
    state = jax.device_put({'params': params, 'opt_state': tx.init(params)},
                           parallel.replicated)

    settings = distill.settings(recipe, args, sched)
    ckpt = engine.Checkpoints(os.path.join(run.dir, runfiles.CHECKPOINTS),
                              settings, state)
    step = run.resume(ckpt, settings)
    export = distill.export_path(args, run)
    classes = list(data.classes)
    run.start(step, distill.config(
        recipe, sched, train_size, len(data.val), classes, export,
        devices=len(devices), device_kind=devices[0].device_kind,
        processes=nproc, versions=harness.versions('jax', 'flax', 'optax')),
              distill.describe(recipe, sched, train_size, data.num_classes) +
              f'; {len(devices)} {devices[0].platform} device(s) in {nproc} '
              f'process(es), {args.precision}', devices[0].platform, 'jax')

    train_step, eval_step = make_steps(student, teacher, recipe, tx,
                                       parallel.mesh, args.batch_split)
    eval_batch = flags.eval_batch(recipe.batch_eval, recipe.batch,
                                  len(parallel.devices))

    def evaluate():
      return parallel.evaluate(eval_step, loader.eval_batches(
          data.val, eval_batch, recipe.teacher_size, pid, nproc, args.workers,
          progress='evaluating'),
                               ckpt.state['params'], teacher_params)

    # The loader's worker processes stop when it closes.
    batches = distill.loader_batches(recipe, args, data.train,
                                     data.num_classes, step, (pid, nproc))

    def train(step, lr):
      del lr  # the step takes the schedule's factor
      b = parallel.to_global(next(batches))
      params, opt_state, loss = train_step(
          ckpt.state['params'], ckpt.state['opt_state'], teacher_params,
          b, jnp.float32(sched.factor(step)))
      ckpt.state = {'params': params, 'opt_state': opt_state}
      return loss

    with contextlib.closing(batches):
      result, step = run.fit(
          step, sched.total_steps, sched.lr, train, evaluate, ckpt,
          eval_every=distill.eval_every(recipe, sched), batch=recipe.batch,
          fetch=lambda losses: [float(engine.local(l)) for l in losses])
    ckpt.close()
    return run.finish(
        result, step, lambda _: models.save_npz(
            export, jax.tree.map(engine.local, ckpt.state['params'])),
        teacher=recipe.teacher, student=recipe.student, exported_to=export)


if __name__ == '__main__':
  distill.main_cli(main, argparser())
