"""big_transfer.hardware: what the machine has, read as the trainers read
it (the GPU listing through a stand-in nvidia-smi on PATH)."""
import os
import re

import pytest

from big_transfer import hardware
from conftest import stand_in_nvidia_smi


@pytest.fixture
def path_with(monkeypatch, tmp_path):
  def put_first(listing, status=0):
    smi = stand_in_nvidia_smi(tmp_path / 'bin', listing, status)
    monkeypatch.setenv('PATH', f'{smi}{os.pathsep}{os.environ["PATH"]}')
  return put_first


def test_the_gpus_nvidia_smi_lists(path_with):
  path_with('GPU 0: NVIDIA H200 (UUID: GPU-a)\n'
            'GPU 1: NVIDIA H200 (UUID: GPU-b)\n')
  assert [g.split(':')[0] for g in hardware.nvidia_gpus()] == ['GPU 0',
                                                               'GPU 1']
  warning = hardware.unseen_gpus_warning('jax')
  assert '2 NVIDIA GPU(s)' in warning and 'JAX sees none' in warning
  assert "big-transfer[jax-cuda]" in warning


def test_no_warning_without_a_gpu_or_with_a_failing_driver(path_with,
                                                          monkeypatch):
  path_with('NVIDIA-SMI has failed because it could not communicate with '
            'the NVIDIA driver.\n', status=9)
  assert hardware.nvidia_gpus() == []
  assert hardware.unseen_gpus_warning('tf2') is None
  monkeypatch.setenv('PATH', '/nonexistent')
  assert hardware.nvidia_gpus() == []


def test_training_precision_is_bf16_where_the_accelerator_has_it():
  from argparse import Namespace  # pylint: disable=import-outside-toplevel
  from big_transfer import flags  # pylint: disable=import-outside-toplevel
  assert flags.resolve_precision(Namespace(precision=None), True) == 'bf16'
  assert flags.resolve_precision(Namespace(precision=None), False) == 'fp32'
  given = Namespace(precision='fp32')
  assert flags.resolve_precision(given, True) == 'fp32' == given.precision
  # Training commands leave it to the machine; the others keep fp32.
  training = flags.parser('', flags.precision(training=True))
  assert training.parse_args([]).precision is None
  assert flags.parser('', flags.precision()).parse_args([]).precision == (
      'fp32')


def test_pytorch_native_bf16_needs_compute_capability_8(monkeypatch):
  import torch  # pylint: disable=import-outside-toplevel
  from bit_pytorch import engine  # pylint: disable=import-outside-toplevel
  assert not engine.native_bf16(torch.device('cpu'))
  for capability, native in (((7, 5), False), ((8, 0), True), ((9, 0), True)):
    monkeypatch.setattr(torch.cuda, 'get_device_capability',
                        lambda device, c=capability: c)
    assert engine.native_bf16(torch.device('cuda', 0)) is native


def test_tf2_native_bf16_needs_compute_capability_8(monkeypatch):
  import torch  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from bit_tf2 import engine  # pylint: disable=import-outside-toplevel
  strategy = tf.distribute.OneDeviceStrategy('/cpu:0')
  assert not engine.native_bf16(strategy)
  monkeypatch.setattr(engine, 'device_kind', lambda strategy: 'GPU')
  monkeypatch.setattr(tf.config, 'list_physical_devices',
                      lambda kind=None: ['gpu0'])
  for capability, native in (((7, 0), False), ((8, 6), True)):
    monkeypatch.setattr(tf.config.experimental, 'get_device_details',
                        lambda gpu, c=capability: {'compute_capability': c})
    assert engine.native_bf16(strategy) is native
  monkeypatch.setattr(engine, 'device_kind', lambda strategy: 'TPU')
  assert engine.native_bf16(strategy)


def test_jax_native_bf16_on_the_cpu_is_false():
  from bit_jax import engine  # pylint: disable=import-outside-toplevel
  assert engine.DataParallel().native_bf16 is False


def test_the_bf16_warning_names_fp32_where_bf16_is_no_faster(monkeypatch):
  monkeypatch.setattr(hardware.platform, 'machine', lambda: 'x86_64')
  monkeypatch.setattr(hardware, '_cpuinfo', lambda: {'flags': 'fma avx2'})
  for backend in ('pytorch', 'jax', 'tf2'):
    assert hardware.bf16_warning('cpu', backend) == (
        hardware.BF16_EMULATED_WARNING)
  monkeypatch.setattr(hardware, '_cpuinfo',
                      lambda: {'flags': 'avx2 avx512_bf16 amx_bf16'})
  assert hardware.bf16_warning('cpu', 'pytorch') is None
  assert hardware.bf16_warning('cpu', 'tf2') is None
  assert hardware.bf16_warning('cpu', 'jax') == hardware.XLA_CPU_BF16_WARNING
  assert hardware.bf16_warning('gpu', 'jax') is None
  assert 'fp32' in hardware.XLA_CPU_BF16_WARNING


def test_xla_on_the_cpu_computes_bf16_products_in_f32():
  """The premise of XLA_CPU_BF16_WARNING, read from the compiled step's
  HLO: a bf16 convolution and a bf16 matrix product run as f32 ones. A
  jaxlib with bf16 kernels fails this, and the warning should go."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  if jax.default_backend() != 'cpu':
    pytest.skip('about the CPU backend')
  x = jnp.ones((4, 8, 8, 64), jnp.bfloat16)
  w = jnp.ones((3, 3, 64, 32), jnp.bfloat16)
  steps = {
      'convolution': lambda x, w: jax.lax.conv_general_dilated(
          x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')),
      'dot': lambda x, w: jnp.einsum('nhwc,cd->nhwd', x, w[0, 0]),
  }
  for op, step in steps.items():
    hlo = jax.jit(step).lower(x, w).compile().as_text()
    types = re.findall(rf'= (\w+)\[[^=]*? {op}\(', hlo)
    assert types and set(types) == {'f32'}, (op, types)
    assert re.search(r'bf16\[[^=]*? convert\(', hlo), 'no conversion back'


def test_default_workers_leave_a_core_and_share_among_local_processes(
    monkeypatch):
  from big_transfer import flags  # pylint: disable=import-outside-toplevel
  monkeypatch.delenv('LOCAL_WORLD_SIZE', raising=False)
  monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: set(range(16)),
                      raising=False)
  assert hardware.default_workers() == 15  # one core for the training loop
  assert flags.loading().parse_args([]).workers == 15
  monkeypatch.setenv('LOCAL_WORLD_SIZE', '4')  # torchrun, 4 GPUs
  assert hardware.default_workers() == 3
  monkeypatch.setenv('LOCAL_WORLD_SIZE', '32')
  assert hardware.default_workers() == 1
  monkeypatch.delenv('LOCAL_WORLD_SIZE')
  monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {3})  # taskset
  assert hardware.default_workers() == 1
