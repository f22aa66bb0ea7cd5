"""How the PyTorch benchmarks (bit_pytorch's model and timm's peer) time a
model: one training step as bit_pytorch.train runs it, one evaluation
forward pass, on random data, synchronised with the GPU where there is one.
"""
import torch
import torch.nn.functional as F

from benchmarks.timing import RssPeak, images_per_sec
from bit_pytorch import engine
from bit_pytorch import train


def steps_for(net, resolution, batch, precision, channels_last=None,
              batch_split=1, compile=False,  # pylint: disable=redefined-builtin
              eval_channels_last=True):
  """(train_step, eval_step, device): callables that run one training step
  (as bit_pytorch.train does, the batch in `batch_split` micro-batches) or
  one evaluation forward pass of `net` (on channels-last images, as
  bit_pytorch evaluates, unless not `eval_channels_last`)."""
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

  x_eval = engine.for_inference(x) if eval_channels_last else x

  @torch.no_grad()
  def eval_step():
    net.eval()
    with autocast:
      model(x_eval).float().argmax(1).sum().item()

  return train_step, eval_step, device


def synced(fn, device):
  """`fn`, waiting for the GPU to finish its work."""
  if device.type != 'cuda':
    return fn
  def run():
    fn()
    torch.cuda.synchronize()
  return run


def time_model(net, resolution, batch, precision, steps, warmup,
               channels_last=None, batch_split=1, evaluate=True,
               compile=False,  # pylint: disable=redefined-builtin
               eval_channels_last=True):
  """{train_img_s, train_mem_bytes, eval_img_s, device, threads} for `net`
  (1000 classes). train_mem_bytes: on a GPU the allocator's peak during the
  training steps; on the CPU the growth of peak resident memory over them.
  """
  train_step, eval_step, device = steps_for(net, resolution, batch, precision,
                                            channels_last, batch_split,
                                            compile, eval_channels_last)
  if device.type == 'cuda':
    torch.cuda.reset_peak_memory_stats()
  else:
    rss = RssPeak()
    rss.start()
  out = {'train_img_s': images_per_sec(synced(train_step, device), batch,
                                       steps, warmup)}
  out['train_mem_bytes'] = (torch.cuda.max_memory_allocated()
                            if device.type == 'cuda' else rss.growth())
  if evaluate:
    out['eval_img_s'] = images_per_sec(synced(eval_step, device), batch,
                                       steps, warmup)
  onednn = torch.backends.mkldnn.is_available() and (
      torch.backends.mkldnn.enabled)
  return dict(out, device=str(device), threads=torch.get_num_threads(),
              torch=torch.__version__, kernels=(
                  ('cuDNN' if device.type == 'cuda' else
                   f'oneDNN {"on" if onednn else "off"}') +
                  (', torch.compile' if compile else '')))
