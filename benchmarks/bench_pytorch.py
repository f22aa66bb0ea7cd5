"""bit_pytorch's throughput: the training step of bit_pytorch.train (SGD,
autocast, its memory format) and evaluation forward passes, on random data
(the data pipeline is not timed). Each step is timed alone and the median
step counts, so a burst of other work on a shared machine weighs little.

  python -m benchmarks.bench_pytorch --arch R50x1 --resolution 128 --batch 16

runs the interleaved comparison instead: ours (fp32, bf16) and timm's fp32
peer in one process, one step of each in turn, and prints the median of the
per-round ratios; on a machine shared with other work this is steadier than
measurements taken minutes apart.
"""
import argparse
import statistics

import torch

from benchmarks import bench_timm
from benchmarks.timing import seconds
from benchmarks.torch_timing import steps_for, synced, time_model


def measure(arch, resolution, batch, precision, steps, warmup, batch_split=1,
            evaluate=True, compile=False):  # pylint: disable=redefined-builtin
  """time_model of bit_pytorch's model; with `compile`, through
  torch.compile, as bit_pytorch.train --compile runs it."""
  from bit_pytorch import models
  return time_model(models.create(arch, head_size=1000), resolution, batch,
                    precision, steps, warmup, batch_split=batch_split,
                    evaluate=evaluate, compile=compile)


def interleaved(arch, resolution, batch, rounds, warmup=2):
  """Ours (fp32, bf16) against timm fp32, one step of each in turn."""
  from bit_pytorch import models
  contenders = {
      'timm fp32': steps_for(bench_timm.create(arch), resolution, batch,
                             'fp32', channels_last=False),
      'pytorch fp32': steps_for(models.create(arch, head_size=1000),
                                resolution, batch, 'fp32'),
      'pytorch bf16': steps_for(models.create(arch, head_size=1000),
                                resolution, batch, 'bf16'),
  }
  times = {(name, kind): [] for name in contenders for kind in (0, 1)}
  for r in range(warmup + rounds):
    for name, (train_step, eval_step, device) in contenders.items():
      for kind, fn in enumerate((train_step, eval_step)):
        t = seconds(synced(fn, device))
        if r >= warmup:
          times[(name, kind)].append(t)
  print(f'{arch} at {resolution} px, batch {batch}, {rounds} interleaved '
        f'rounds, {torch.get_num_threads()} threads; ratio = median over '
        'rounds of (timm fp32 time / time)')
  for kind, label in enumerate(('train', 'eval')):
    peer = times[('timm fp32', kind)]
    for name in contenders:
      own = times[(name, kind)]
      ratios = [p / t for p, t in zip(peer, own)]
      print(f'  {label:5} {name:>12}: {batch / statistics.median(own):7.1f} '
            f'img/s  x{statistics.median(ratios):.2f} (rounds: '
            f'{min(ratios):.2f}..{max(ratios):.2f})')


if __name__ == '__main__':
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--arch', default='R50x1')
  parser.add_argument('--resolution', type=int, default=128)
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--rounds', type=int, default=8)
  a = parser.parse_args()
  interleaved(a.arch, a.resolution, a.batch, a.rounds)
