"""What the machine can do, as far as a run's speed cares: the cores that
can feed the data pipeline, whether its CPU computes bf16 natively, and
whether it has NVIDIA GPUs that the framework does not see.

One GPU that trains R50x1 at 5,000 img/s needs about 15 data-loading cores
(docs/gpu.md measures one at 300 to 340 img/s), more than the 8 workers
that were the default before.

bf16 on an x86 CPU is fast only with the AVX512_BF16 or AMX-BF16
instructions; without them every framework emulates it, far slower than
fp32 (on an AVX2-only EPYC, one bf16 benchmark measurement took minutes).
With them, XLA's CPU backend (JAX) still has no bf16 convolution or matrix
product: it converts their operands to f32 and computes in f32, so JAX's
bf16 trains no faster than its fp32 on any CPU (docs/performance.md).

A framework installed without its CUDA build (JAX's and TensorFlow's
default wheels) trains on the CPU of a GPU machine without a word; the
driver's `nvidia-smi -L` lists the GPUs all the same.
"""
import os
import platform
import shutil
import subprocess

BF16_FLAGS = ('avx512_bf16', 'amx_bf16')
BF16_EMULATED_WARNING = (
    'bf16 is emulated on this CPU (no AVX512_BF16 or AMX-BF16 instructions) '
    'and runs slower than fp32 here; prefer --precision fp32 on this machine.')
XLA_CPU_BF16_WARNING = (
    "bf16 gains nothing on the CPU in JAX: XLA's CPU backend computes "
    'convolutions and matrix products in f32 between conversions; prefer '
    '--precision fp32 here.')


def local_processes():
  """The training processes on this machine (torchrun's LOCAL_WORLD_SIZE;
  1 elsewhere)."""
  return max(1, int(os.environ.get('LOCAL_WORLD_SIZE') or 1))


def default_workers():
  """The data-loading workers of a training process by default: the cores
  it may run on (its CPU affinity), shared with the other training
  processes on this machine (`local_processes`), less one for the training
  loop itself; at least 1."""
  cores = (len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity')
           else os.cpu_count() or 1)
  return max(1, cores // local_processes() - 1)


def memory_bytes():
  """The machine's physical memory."""
  return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')


def _cpuinfo():
  """The first processor's fields in /proc/cpuinfo ({} where unreadable)."""
  try:
    with open('/proc/cpuinfo') as f:
      text = f.read()
  except OSError:
    return {}
  fields = {}
  for line in text.split('\n\n')[0].splitlines():
    key, _, value = line.partition(':')
    fields[key.strip()] = value.strip()
  return fields


def _is_x86():
  return platform.machine().lower() in ('x86_64', 'amd64', 'i386', 'i686')


def cpu_flags():
  """The CPU's feature flags (an empty set where the OS does not say)."""
  return set(_cpuinfo().get('flags', '').split())


def cpu_model():
  """The CPU's model name, e.g. 'AMD EPYC 9454P 48-Core Processor'."""
  return _cpuinfo().get('model name') or platform.processor() or '?'


def bf16_emulated(device='cpu'):
  """Whether bf16 compute on `device` ('cpu', 'cuda', 'gpu', 'tpu') is
  emulated: true on an x86 CPU whose flags name neither AVX512_BF16 nor
  AMX-BF16. Where the flags cannot be read, nothing is claimed (False)."""
  if device.lower() != 'cpu' or not _is_x86():
    return False
  flags = cpu_flags()
  return bool(flags) and not flags.intersection(BF16_FLAGS)


def bf16_warning(device='cpu', backend=None):
  """One line where --precision bf16 trains no faster than fp32 on `device`
  ('cpu', 'gpu', ...) in `backend` ('pytorch', 'jax', 'tf2'), naming fp32
  as the faster choice; None where bf16 has its own kernels."""
  if bf16_emulated(device):
    return BF16_EMULATED_WARNING
  if backend == 'jax' and device.lower() == 'cpu':
    return XLA_CPU_BF16_WARNING
  return None


def cpu_description():
  """{model, simd_flags, bf16_emulated}: the CPU as benchmarks record it
  beside their figures (the flags that decide convolution speed: AVX*,
  AMX*, FMA)."""
  simd = sorted(f for f in cpu_flags()
                if f.startswith(('avx', 'amx', 'fma', 'f16c')))
  return {'model': cpu_model(), 'machine': platform.machine(),
          'simd_flags': simd, 'bf16_emulated': bf16_emulated('cpu')}


# The install that gives each backend's framework the GPUs (the package's
# extras; PyTorch's wheels on PyPI are its CUDA builds).
GPU_INSTALLS = {
    'pytorch': "pip install 'big-transfer[pytorch]' (PyTorch's CUDA wheels "
               'from PyPI, not the CPU index)',
    'jax': "pip install 'big-transfer[jax-cuda]'",
    'tf2': "pip install 'big-transfer[tf2-cuda]'",
}
FRAMEWORKS = {'pytorch': 'PyTorch', 'jax': 'JAX', 'tf2': 'TensorFlow'}


def _nvidia_smi(*args):
  """The lines `nvidia-smi ARGS` prints; none where it is missing or fails."""
  exe = shutil.which('nvidia-smi')
  if not exe:
    return []
  try:
    listed = subprocess.run([exe, *args], capture_output=True, text=True,
                            timeout=20, check=False)
  except (OSError, subprocess.SubprocessError):
    return []
  return listed.stdout.splitlines() if listed.returncode == 0 else []


def nvidia_gpus():
  """The GPUs that the NVIDIA driver lists (`nvidia-smi -L`: 'GPU 0: ...'
  lines)."""
  return [line for line in _nvidia_smi('-L') if line.startswith('GPU ')]


def gpu_memory_bytes():
  """The memory of the smallest GPU that the driver lists, or None."""
  mib = [int(line) for line in _nvidia_smi(
      '--query-gpu=memory.total', '--format=csv,noheader,nounits')
         if line.strip().isdigit()]
  return min(mib) * 2**20 if mib else None


def unseen_gpus_warning(backend):
  """One line when the driver lists GPUs although `backend`'s framework
  found none (the run is on the CPU), naming the install that fixes it;
  None otherwise."""
  gpus = nvidia_gpus()
  if not gpus:
    return None
  return (f'this machine has {len(gpus)} NVIDIA GPU(s) (nvidia-smi), but '
          f'{FRAMEWORKS[backend]} sees none, so this run uses the CPU; '
          f'{GPU_INSTALLS[backend]} installs the build that uses them.')
