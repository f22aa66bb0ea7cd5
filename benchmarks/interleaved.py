"""bit_pytorch against timm's peer in one process, one step of each in turn:
ours in fp32 and bf16 and timm's in fp32, training steps and evaluation
forward passes, on random data. Prints each contender's images/s and the
median over rounds of its per-round ratio to timm fp32; on a machine shared
with other work this is steadier than measurements taken minutes apart
(benchmarks.throughput).

  python -m benchmarks.interleaved --arch R50x1 --resolution 128 --batch 16
"""
import argparse
import statistics

import torch

from benchmarks import bench_timm
from benchmarks.timing import seconds
from benchmarks.torch_timing import steps_for, synced
from bit_pytorch import models


def interleaved(arch, resolution, batch, rounds, warmup=2):
  """Ours (fp32, bf16) against timm fp32, one step of each in turn."""
  contenders = {
      'timm fp32': steps_for(bench_timm.create(arch), resolution, batch,
                             'fp32', channels_last=False,
                             eval_channels_last=False),
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


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--arch', default='R50x1')
  parser.add_argument('--resolution', type=int, default=128)
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--rounds', type=int, default=8)
  args = parser.parse_args(argv)
  interleaved(args.arch, args.resolution, args.batch, args.rounds)


if __name__ == '__main__':
  main()
