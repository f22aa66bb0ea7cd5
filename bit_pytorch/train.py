"""Fine-tunes a BiT model with the BiT-HyperRule, in PyTorch.

  python -m bit_pytorch.train --name cifar10_run --model BiT-M-R50x1 \\
      --logdir /tmp/bit_logs --dataset cifar10

On a machine with several GPUs this uses all of them, one process each
(DistributedDataParallel), by starting torchrun itself; under torchrun
(any number of nodes) it joins the group torchrun set up. The same global
batch gives the same update on any number of processes.

The training loop, the run's outputs, checkpoint cadence and signals live in
the shared harness (harness.Run); the batches come from the shared data
stream (datastream.Stream); processes, devices, the training step, evaluation
and the checkpoint format are those every PyTorch program shares
(bit_pytorch.engine). This file puts them together for fine-tuning.

In-process use: `main(args)` with `args = argparser().parse_args([...])` (or
`bit_common.argparser()`'s: the PyTorch-only flags then take their defaults)
runs one fine-tuning and returns the final evaluation.
"""
import itertools
import os

import numpy as np
import torch
import torch.nn.functional as F

from big_transfer import flags, harness, held, memory, runfiles, zoo
import bit_common
from bit_pytorch import data as torch_data
from bit_pytorch import models
from bit_pytorch.engine import (Checkpoint, any_process, autocast_for,
                                compiles, data_errors_named, device_memory,
                                evaluate, loader, local_first,
                                mean_over_processes, mixed, native_bf16,
                                process_group, run_command, same_everywhere,
                                to_device, torch_flags, train_step,
                                world_size)

CHECKPOINT = runfiles.TORCH_CHECKPOINT


def argparser():
  return bit_common.argparser(backend_flags=torch_flags())


# --------------------------------------------------------------------------
# One run. The loop, outputs, checkpoint cadence and signals are the shared
# harness's (harness.Run.fit); this file holds what PyTorch needs.

def main(args):
  """Fine-tunes as `args` say; returns the final evaluation (results.json)."""
  args = bit_common.with_backend_defaults(args, torch_flags())
  with process_group() as (rank, device):
    flags.resolve_precision(args, native_bf16(device))
    # In turn, and together: a check that fails in one process stops all.
    local_first(bit_common.check_args, args, world_size())
    return _train(args, rank, device)


def _train(args, rank, device):
  world = world_size()
  with harness.Run(args, rank == 0, any_process(),
                   command='bit_pytorch.train') as run:
    torch.manual_seed(args.seed)
    local_first(zoo.fetch, args.bit_pretrained_dir, args.model)
    data = local_first(torch_data.load, args, run.logger)
    train_src = data.train
    hyper = harness.HyperRule.of(args, len(train_src), data.original_hw)
    weights = local_first(zoo.load_weights, args.model,
                          args.bit_pretrained_dir)
    net = models.create(args.model, head_size=len(data.classes), zero_head=True,
                        weights=weights)
    del weights
    net, channels_last = to_device(net, device)
    memory.for_run(run, args, net.architecture, hyper.crop, world,
                   device_memory(device))
    opt, scaler = optimizer(net, args.base_lr, args.precision)

    settings = dict(hyper.settings(args, data.classes),
                    arch=net.architecture.name)  # For validate.
    ckpt = Checkpoint(os.path.join(run.dir, CHECKPOINT), settings, run.lead,
                      model=net, optimizer=opt, scaler=scaler)
    step = same_everywhere(run.resume(ckpt, settings))
    path = held.for_run(run, args, len(train_src), hyper, train_src.load,
                        train_src.decoded, (rank, world))
    train_src = held.Held(path, train_src.labels) if path else train_src
    compiled = compiles(args.compile, device, hyper.total - step)
    run.start(step, dict(hyper.config(), classes=data.classes,
                         data=data.describe(), devices=world,
                         device=str(device), compiled=compiled,
                         versions=harness.versions('torch', 'torchvision')),
              f'{args.dataset}: {len(train_src)} training, {len(data.val)} '
              f'{data.eval_split} examples, {len(data.classes)} classes; '
              f'{hyper.describe()}, {world} process(es) on {device.type}, '
              f'{args.precision}', device.type, 'pytorch')

    fast = torch.compile(net) if compiled else net
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
    eval_batch = flags.eval_batch(args.batch_eval,
                                  args.batch // args.batch_split,
                                  world) // world
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
        lambda: evaluate(fast, val_loader, device, autocast,
                         F.cross_entropy, pad=compiled),
        ckpt, fetch=lambda losses: mean_over_processes(losses, device))
    return run.finish(result, step, net.save_npz, model=args.model,
                      dataset=args.dataset, dataset_size=len(train_src),
                      examples_per_class=args.examples_per_class)


def optimizer(net, lr, precision):
  """(SGD with momentum 0.9 and no weight decay, in one fused kernel;
  grad scaler for fp16)."""
  device = next(net.parameters()).device
  return (torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, fused=True),
          torch.amp.GradScaler(device.type, enabled=precision == 'fp16'))


def cli(argv=None):
  """python -m bit_pytorch.train (torchrun started for the user on several
  GPUs: engine.run_command)."""
  run_command('bit_pytorch.train', argparser(), main, bit_common.check_args,
              argv)


if __name__ == '__main__':
  cli()
