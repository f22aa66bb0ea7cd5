"""bit_pytorch's throughput: the training step of bit_pytorch.train (SGD,
autocast, its memory format) and evaluation forward passes, on random data
(the data pipeline is not timed). Each step is timed alone and the median
step counts, so a burst of other work on a shared machine weighs little.
benchmarks.interleaved compares it with timm's peer step by step.
"""
from benchmarks.torch_timing import time_model
from bit_pytorch import models


def measure(arch, resolution, batch, precision, steps, warmup, batch_split=1,
            evaluate=True, compile=False):  # pylint: disable=redefined-builtin
  """time_model of bit_pytorch's model; with `compile`, through
  torch.compile, as bit_pytorch.train --compile runs it."""
  return time_model(models.create(arch, head_size=1000), resolution, batch,
                    precision, steps, warmup, batch_split=batch_split,
                    evaluate=evaluate, compile=compile)
