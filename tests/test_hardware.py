"""big_transfer.hardware: what the machine has, read as the trainers read
it (the GPU listing through a stand-in nvidia-smi on PATH)."""
import os

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
