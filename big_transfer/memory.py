"""Whether a training step fits in memory, and the --batch_split that
makes it fit (fine-tuning, distillation and pre-training).

The HyperRule's batch is 512 images, at 480x480 for all but tiny images:
one step of R50x1 keeps about 550 MB of activations per image for the
backward pass, some 280 GB for the batch. The original code left the
user to find a --batch_split that fits; a step that does not fit kills
the run (the kernel's OOM killer on a CPU, silently) or fails in the
framework (a GPU). The original's default, 1, stays (the contract between
the backends keeps the original flags' defaults), and a run warns before
training where its split may not fit, naming one that would;
--batch_split auto chooses the fewest micro-batches whose step fits. The
update is the same for any split (GroupNorm does not mix the images of a
batch), so the choice changes memory and speed, not what is learnt.

  activation_elements(arch)
      Elements of activations that a training step of `arch` produces per
      pixel of its input: every GroupNorm, ReLU, convolution and sum
      output, counted from the architecture (zoo.Architecture).
  step_bytes(arch, crop, images, replicas=1)
      The estimate: BYTES_PER_ELEMENT per activation element of `images`
      images at crop x crop, plus the parameters' training state (weights,
      gradients, momentum, standardised weights: 4 fp32 copies) for each of
      `replicas` model copies in the memory.
  for_run(run, args, arch, crop, devices, memory=(1, None), batch=None,
          beside=None)
      Sets args.batch_split where it is None (auto; config.json records
      the choice) and logs it; warns where a given split may not fit.
      `devices`: the run's, which divide `batch` (default args.batch);
      `memory`: (this process's devices, the memory of one of its GPUs or
      None on a CPU, where those devices share the host's memory), from
      the backend's engine.device_memory; `beside`: the architecture of a
      frozen model whose weights share the memory (a distillation's
      teacher).
      Several processes choose together: the fewest micro-batches that fit
      in every one of them.
"""

import numpy as np

from big_transfer import hardware, zoo

# Bytes per activation element of an fp32 step, per image. Measured on
# CPUs (tests/test_memory.py checks the first): PyTorch keeps 3.4 to 3.8
# bytes per element for the backward pass (R14x0.5 to R50x3), and its peak
# resident memory grows by 3.6 (R50x1) to 5.3 (R14x0.5) bytes per element
# per image at 224 px; XLA's plan for JAX's step holds 2.2 to 2.5. bf16 and
# compiled steps keep less: the estimate errs towards more micro-batches.
BYTES_PER_ELEMENT = 5
STATE_COPIES = 4
HOST_SHARE = 0.5    # of the host's memory, per process on it: the rest is
                    # the data workers', the held images' and the OS's
GPU_SHARE = 0.85    # of a GPU's: the framework's workspace and fragments


def activation_elements(arch):
  """Activation elements per input pixel of a training step (see above)."""
  root = 64 * arch.width
  total = root / 2**2 + root / 4**2        # root convolution, max pool
  cin, stride = root, 4
  for block, units in enumerate(arch.units):
    cmid, out = root * 2**block, 4 * root * 2**block
    for unit in range(units):
      s = 4 * 2**block  # the unit's output stride (its 3x3 conv strides)
      total += ((2 * cin + 3 * cmid) / stride**2       # GN, ReLU, 1x1 conv
                + (3 * cmid + 2 * out) / s**2          # 3x3, GN, ReLU, 1x1
                + (out / s**2 if unit == 0 else 0))    # projection
      cin, stride = out, s
  return total + 2 * cin / stride**2                   # final GN, ReLU


def parameters(arch):
  return sum(int(np.prod(shape))
             for shape in zoo.expected_shapes(arch).values())


def step_bytes(arch, crop, images, replicas=1):
  return (BYTES_PER_ELEMENT * activation_elements(arch) * crop**2 * images
          + STATE_COPIES * 4 * parameters(arch) * replicas)


def _room(local, gpu_bytes):
  """(bytes one memory holds for training, the devices that share it)."""
  if gpu_bytes:
    return GPU_SHARE * gpu_bytes, 1
  return (HOST_SHARE * hardware.memory_bytes() / hardware.local_processes(),
          local)


def for_run(run, args, arch, crop, devices, memory=(1, None), batch=None,
            beside=None):
  """Chooses args.batch_split where it is None, auto (see the module
  doc)."""
  gpu_bytes = memory[1]
  room, sharing = _room(*memory)
  per_device = (batch or args.batch) // devices
  splits = [s for s in range(1, per_device + 1) if per_device % s == 0]
  frozen = 4 * parameters(beside) * sharing if beside else 0

  def need(split):
    return frozen + step_bytes(arch, crop, per_device // split * sharing,
                               sharing)

  where = 'a GPU' if gpu_bytes else 'this process on this host'

  def why(split):
    images = per_device // split * sharing
    return (f'about {need(split) / 2**30:.1f} GiB for {images} image(s) of '
            f'{arch.name} at {crop}x{crop} at once (an estimate), more than '
            f'the {room / 2**30:.1f} GiB that {where} gives training')
  if args.batch_split is not None:
    if need(args.batch_split) > room:
      fits = next((s for s in splits if need(s) <= room), splits[-1])
      run.logger.warning(f'--batch_split {args.batch_split} may not fit in '
                         f'memory: {why(args.batch_split)}; --batch_split '
                         f'{fits} would (--batch_split auto chooses).')
    return
  for split in splits:
    too_big = need(split) > room
    if run.any_process:
      too_big = run.any_process([too_big])[0]
    if not too_big:
      break
  args.batch_split = split
  if need(split) > room:  # the last split: none fits here
    run.logger.warning(f'even micro-batches of one image may not fit: '
                       f'{why(split)}; a lower --crop_size needs less.')
  elif split > 1:
    because = (f'without it a step would need {why(1)}' if need(1) > room
               else 'another process has less memory')
    run.logger.info(f'--batch_split {split}: {because}; {split} '
                    'micro-batches give the same update.')
