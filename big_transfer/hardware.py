"""What the machine's CPU can do, as far as the choice of precision cares.

bf16 on an x86 CPU is fast only with the AVX512_BF16 or AMX-BF16
instructions; without them every framework emulates it, far slower than
fp32 (on an AVX2-only EPYC, one bf16 benchmark measurement took minutes).
"""
import platform

BF16_FLAGS = ('avx512_bf16', 'amx_bf16')
BF16_EMULATED_WARNING = (
    'bf16 is emulated on this CPU (no AVX512_BF16 or AMX-BF16 instructions) '
    'and runs slower than fp32 here; prefer --precision fp32 on this machine.')


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


def cpu_description():
  """{model, simd_flags, bf16_emulated}: the CPU as benchmarks record it
  beside their figures (the flags that decide convolution speed: AVX*,
  AMX*, FMA)."""
  simd = sorted(f for f in cpu_flags()
                if f.startswith(('avx', 'amx', 'fma', 'f16c')))
  return {'model': cpu_model(), 'machine': platform.machine(),
          'simd_flags': simd, 'bf16_emulated': bf16_emulated('cpu')}
