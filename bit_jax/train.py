"""Fine-tunes a BiT model with the BiT-HyperRule, in JAX/Flax.

  python -m bit_jax.train --name cifar10_run --model BiT-M-R50x1 \\
      --logdir /tmp/bit_logs --dataset cifar10

One compiled step (jax.jit) runs data-parallel over every device: the batch
is sharded over a one-axis mesh of all devices, the parameters replicated.
With --distributed, jax.distributed.initialize() joins the processes of a
TPU pod or a multi-node GPU job first, and each process feeds its share of
the batch. The same global batch gives the same update on any number of
devices. --batch_split accumulates micro-batch gradients inside the step.

The training loop, the run's outputs, checkpoint cadence and signals live in
the shared harness (harness.Run); the batches come from the shared data
stream (datastream.Stream) through the framework-neutral loader
(big_transfer.loader: no TensorFlow), decoded as PyTorch decodes them;
joining processes, the mesh, collectives, evaluation and the checkpoint
format are those every JAX program shares (bit_jax.engine). This file holds
the compiled steps and puts them together for fine-tuning.

In-process use: `main(args)` with `args = argparser().parse_args([...])` (or
`bit_common.argparser()`'s) runs one fine-tuning and returns the final
evaluation.
"""
import contextlib
import os

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from big_transfer import (datasets, errors, flags, harness, held, loader,
                          memory, runfiles, zoo)
import bit_common
from bit_jax import models
from bit_jax.engine import (DTYPES, Checkpoints, DataParallel, accumulate,
                            any_process, distributed_flags, eval_sums,
                            initialize_distributed, lead_first, local,
                            train_images)


def argparser():
  return bit_common.argparser(backend_flags=distributed_flags())


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

  def train_step(params, opt_state, batch, lr):
    loss, grads = accumulate(grad_fn, params, train_images(batch),
                             batch['label'], batch_split, mesh)
    opt_state.hyperparams['learning_rate'] = lr
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  def eval_step(params, images, labels, mask):
    """Sums over the real rows: loss, top-1 hits, top-5 hits, count."""
    return eval_sums(model.apply({'params': params}, images), labels, mask)

  train = jax.jit(train_step, donate_argnums=(0, 1),
                  in_shardings=(replicated, replicated, sharded, replicated),
                  out_shardings=(replicated, replicated, replicated))
  evaluate = jax.jit(eval_step, in_shardings=(replicated, sharded, sharded,
                                              sharded),
                     out_shardings=replicated)
  return train, evaluate


def optimizer():
  """SGD with momentum 0.9; the learning rate is set at every step."""
  return optax.inject_hyperparams(optax.sgd)(learning_rate=0.0, momentum=0.9)


# --------------------------------------------------------------------------
# One run. The loop, outputs, checkpoint cadence and signals are the shared
# harness's (harness.Run.fit); this file holds what JAX needs.

def main(args):
  """Fine-tunes as `args` say; returns the final evaluation (results.json)."""
  args = bit_common.with_backend_defaults(args, distributed_flags())
  if args.precision == 'fp16':
    raise errors.BadInput(
        '--precision fp16 is not supported by the JAX backend (it has no '
        'loss scaling, and fp16 without it under- and overflows); use bf16.')
  initialize_distributed(args)
  parallel = DataParallel()
  devices = parallel.devices
  flags.resolve_precision(args, parallel.native_bf16)
  lead_first(bit_common.check_args, args, len(devices))

  pid, nproc = jax.process_index(), jax.process_count()
  with harness.Run(args, pid == 0, any_process if nproc > 1 else None,
                   command='bit_jax.train') as run:
    lead_first(zoo.fetch, args.bit_pretrained_dir, args.model)
    data = datasets.load(args, run.logger)
    train_size = len(data.train)
    hyper = harness.HyperRule.of(args, train_size, data.original_hw)
    weights = zoo.load_weights(args.model, args.bit_pretrained_dir)
    model, params = models.create(args.model, head_size=data.num_classes,
                                  zero_head=True, weights=weights,
                                  dtype=DTYPES[args.precision])
    del weights
    memory.for_run(run, args, model.architecture, hyper.crop, len(devices),
                   parallel.device_memory())
    tx = optimizer()
    state = jax.device_put({'params': params, 'opt_state': tx.init(params)},
                           parallel.replicated)

    classes = list(data.classes)
    settings = hyper.settings(args, classes)
    ckpt = Checkpoints(os.path.join(run.dir, runfiles.CHECKPOINTS), settings,
                       state)
    step = run.resume(ckpt, settings)
    state = ckpt.state
    path = held.for_run(run, args, train_size, hyper, data.train.load,
                        data.train.decoded, (pid, nproc))
    data.train = held.Held(path, data.train.labels) if path else data.train
    run.start(step, dict(hyper.config(), classes=classes, data=data.describe(),
                         devices=len(devices),
                         device_kind=devices[0].device_kind, processes=nproc,
                         versions=harness.versions('jax', 'flax', 'optax')),
              f'{args.dataset}: {train_size} training, {len(data.val)} '
              f'{data.eval_split} examples, {data.num_classes} classes; '
              f'{hyper.describe()}, {len(devices)} {devices[0].platform} '
              f'device(s) in {nproc} process(es), {args.precision}',
              devices[0].platform, 'jax')

    train_step, eval_step = make_steps(model, tx, parallel.mesh,
                                       args.batch_split)
    eval_batch = flags.eval_batch(args.batch_eval,
                                  args.batch // args.batch_split,
                                  len(parallel.devices))

    def evaluate():
      return parallel.evaluate(eval_step, loader.eval_batches(
          data.val, eval_batch, hyper.crop, pid, nproc, args.workers,
          progress='evaluating'),
                               ckpt.state['params'])

    # The loader's worker processes stop when it closes.
    batches = loader.train_batches(
        data.train, data.num_classes, hyper.stream(args), hyper.resize,
        hyper.crop, step, pid, nproc, workers=args.workers)

    def train(step, lr):
      del step  # The loader yields the batch of each step in turn.
      b = parallel.to_global(next(batches))
      params, opt_state, loss = train_step(
          ckpt.state['params'], ckpt.state['opt_state'], b, jnp.float32(lr))
      ckpt.state = {'params': params, 'opt_state': opt_state}
      return loss

    with contextlib.closing(batches):
      result, step = run.fit(step, hyper.total, hyper.lr, train, evaluate,
                             ckpt, fetch=lambda losses: [float(local(l))
                                                         for l in losses])
    ckpt.close()
    return run.finish(
        result, step,
        lambda path: models.save_npz(path, jax.tree.map(local,
                                                        ckpt.state['params'])),
        model=args.model, dataset=args.dataset, dataset_size=train_size,
        examples_per_class=args.examples_per_class)


if __name__ == '__main__':
  errors.run_cli(lambda: main(argparser().parse_args()))
