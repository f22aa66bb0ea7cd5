"""bit_pytorch's throughput: the training step of bit_pytorch.train (SGD,
autocast, its memory format) and evaluation forward passes, on random data
(the data pipeline is not timed). Each step is timed alone and the median
step counts, so a burst of other work on a shared machine weighs little.

  python benchmarks/bench_pytorch.py --arch R50x1 --resolution 128 --batch 16

runs the interleaved comparison instead: ours (fp32, bf16) and timm's fp32
peer in one process, one step of each in turn, and prints the median of the
per-round ratios; on a machine shared with other work this is steadier than
measurements taken minutes apart.
"""
import argparse
import os
import statistics
import sys

import torch
import torch.nn.functional as F

from timing import RssPeak, images_per_sec, seconds

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def measure(arch, resolution, batch, precision, steps, warmup, batch_split=1,
            evaluate=True, compile=False):  # pylint: disable=redefined-builtin
  """time_model of bit_pytorch's model; with `compile`, through
  torch.compile, as bit_pytorch.train --compile runs it."""
  from bit_pytorch import models
  return time_model(models.create(arch, head_size=1000), resolution, batch,
                    precision, steps, warmup, batch_split=batch_split,
                    evaluate=evaluate, compile=compile)


def steps_for(net, resolution, batch, precision, channels_last=None,
              batch_split=1, compile=False):  # pylint: disable=redefined-builtin
  """(train_step, eval_step, device): callables that run one training step
  (as bit_pytorch.train does, the batch in `batch_split` micro-batches) or
  one evaluation forward pass of `net`."""
  from bit_pytorch import engine
  from bit_pytorch import train
  device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  net, auto_cl = engine.to_device(net, device)
  channels_last = auto_cl if channels_last is None else channels_last
  fmt = torch.channels_last if channels_last else torch.contiguous_format
  net = net.to(memory_format=fmt)
  model = torch.compile(net) if compile else net
  opt, scaler = train.optimizer(net, 0.003, precision)
  autocast = engine.autocast_for(device, precision)
  gen = torch.Generator().manual_seed(0)
  x = (torch.rand(batch, 3, resolution, resolution, generator=gen) * 2 - 1)
  x = x.to(device).contiguous(memory_format=fmt)
  y = torch.randint(0, 1000, (batch,), generator=gen).to(device)

  # (images, labels, mixup partners' labels, mixup lambda): no mixup.
  micro_batches = [(xm, ym, ym, 1.0) for xm, ym in
                   zip(x.chunk(batch_split), y.chunk(batch_split))]

  def train_step():
    net.train()
    engine.train_step(model, opt, scaler, micro_batches, batch_split,
                     autocast, F.cross_entropy).item()

  @torch.no_grad()
  def eval_step():
    net.eval()
    with autocast:
      model(x).float().argmax(1).sum().item()

  return train_step, eval_step, device


def _synced(fn, device):
  """`fn`, waiting for the GPU to finish its work."""
  if device.type != 'cuda':
    return fn
  def run():
    fn()
    torch.cuda.synchronize()
  return run


def time_model(net, resolution, batch, precision, steps, warmup,
               channels_last=None, batch_split=1, evaluate=True,
               compile=False):  # pylint: disable=redefined-builtin
  """{train_img_s, train_mem_bytes, eval_img_s, device, threads} for `net`
  (1000 classes). train_mem_bytes: on a GPU the allocator's peak during the
  training steps; on the CPU the growth of peak resident memory over them.
  """
  train_step, eval_step, device = steps_for(net, resolution, batch, precision,
                                            channels_last, batch_split,
                                            compile)
  if device.type == 'cuda':
    torch.cuda.reset_peak_memory_stats()
  else:
    rss = RssPeak()
    rss.start()
  out = {'train_img_s': images_per_sec(_synced(train_step, device), batch,
                                       steps, warmup)}
  out['train_mem_bytes'] = (torch.cuda.max_memory_allocated()
                            if device.type == 'cuda' else rss.growth())
  if evaluate:
    out['eval_img_s'] = images_per_sec(_synced(eval_step, device), batch,
                                       steps, warmup)
  return dict(out, device=str(device), threads=torch.get_num_threads(),
              torch=torch.__version__)


def interleaved(arch, resolution, batch, rounds, warmup=2):
  """Ours (fp32, bf16) against timm fp32, one step of each in turn."""
  import bench_timm
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
        t = seconds(_synced(fn, device))
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
