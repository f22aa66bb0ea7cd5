"""bit_pytorch's throughput: the training step of bit_pytorch.train (SGD,
autocast, its memory format) and evaluation forward passes, on random data
(the data pipeline is not timed)."""
import time

import torch


def measure(arch, resolution, batch, precision, steps, warmup):
  from bit_pytorch import models
  return time_model(models.create(arch, head_size=1000), resolution, batch,
                    precision, steps, warmup)


def time_model(net, resolution, batch, precision, steps, warmup,
               channels_last=None):
  """{train_img_s, eval_img_s, device, threads} for `net` (1000 classes)."""
  from bit_pytorch import train
  device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  net, auto_cl = train.to_device(net, device)
  channels_last = auto_cl if channels_last is None else channels_last
  fmt = torch.channels_last if channels_last else torch.contiguous_format
  net = net.to(memory_format=fmt)
  opt, scaler = train.optimizer(net, 0.003, precision)
  autocast = train.autocast_for(device, precision)
  gen = torch.Generator().manual_seed(0)
  x = (torch.rand(batch, 3, resolution, resolution, generator=gen) * 2 - 1)
  x = x.to(device).contiguous(memory_format=fmt)
  y = torch.randint(0, 1000, (batch,), generator=gen).to(device)

  def sync():
    if device.type == 'cuda':
      torch.cuda.synchronize()

  def timed(fn):
    for _ in range(warmup):
      fn()
    sync()
    t = time.perf_counter()
    for _ in range(steps):
      fn()
    sync()
    return batch * steps / (time.perf_counter() - t)

  train_img_s = timed(lambda: train.train_step(net, opt, scaler, [(x, y)], 1,
                                               autocast).item())
  net.eval()

  @torch.no_grad()
  def evaluate():
    with autocast:
      net(x).float().argmax(1).sum().item()

  eval_img_s = timed(evaluate)
  return dict(train_img_s=train_img_s, eval_img_s=eval_img_s,
              device=str(device), threads=torch.get_num_threads(),
              torch=torch.__version__)
