"""benchmarks/gpu_check.sh --cpu: the GPU check's own run on the CPU at tiny
sizes, so that the script a GPU machine runs cannot rot. Only the shape of
its JSON is checked, never a speed."""
import json
import os
import subprocess
import sys

import pytest

from benchmarks import gpu_check
from conftest import REPO

pytestmark = pytest.mark.slow  # whole runs: left out of make test-fast


def test_cpu_mode_writes_every_figure(tmp_path):
  out = tmp_path / 'check.json'
  env = dict(os.environ, PYTHON=sys.executable)
  subprocess.run(['bash', os.path.join(REPO, 'benchmarks', 'gpu_check.sh'),
                  '--cpu', '--out', str(out)], env=env, check=True,
                 timeout=1800)
  report = json.loads(out.read_text())
  assert report['mode'] == 'cpu'
  assert report['machine']['cpu']['model']
  assert isinstance(report['machine']['cpu']['bf16_emulated'], bool)
  assert report['flops']['train_per_image'] == (
      3 * report['flops']['forward_per_image']) > 0
  for name in ('timm', 'pytorch', 'jax', 'tf2'):
    res = report['throughput'][name]
    assert res.get('train_img_s', 0) > 0, (name, res)
    assert res['eval_img_s'] > 0 and res['train_mem_bytes'] > 0, (name, res)
    assert res['train_x_timm'] > 0, (name, res)
  size = gpu_check.SIZES['cpu']
  steps, every, crop = size['ft_steps'], size['ft_save_every'], size[
      'resolution']
  for name in ('pytorch', 'jax', 'tf2'):
    memory = report['train_mem_bytes_by_batch_split'][name]
    assert set(memory) == {'1', '2'} and memory['2'] > 0, (name, memory)
    # The fine-tuning ran end to end, at the throughput's settings, to a
    # result: timed from after its untimed first steps to its end, with
    # mixup, checkpoints during the run and the HyperRule's resize.
    run = report['finetune'][name]
    assert 'error' not in run, (name, run)
    assert 0 <= run['top1'] <= 1 and run['last_loss'] > 0
    assert run['ratio'] == pytest.approx(
        run['e2e_img_s'] / report['throughput'][name]['train_img_s'])
    assert run['timed_steps'] == [size['ft_skip'] + 1, steps]
    assert run['checkpoint_steps_kept'] == [steps - every, steps]
    assert run['checkpoints_timed'] >= 1 and run['mixup'] > 0
    resize, crop_size = run['resolution']
    assert crop_size == crop < resize and min(run['image_size']) > crop
    # Every trainer logs its first step's time, which the check reads, and
    # holds its images (8, read 48 times), logging how long that took.
    assert run['first_step_s'] > 0, (name, run)
    assert run['hold_images'] is True and run['held_s'] >= 0, (name, run)

  # The input pipeline alone, with the trainers' default workers (TF2
  # reads through JAX's loader: the `jax` row is its too).
  assert sorted(report['pipeline']) == ['jax', 'pytorch']
  for name in ('pytorch', 'jax'):
    host = report['pipeline'][name]
    assert host['img_s'] > 0 and host['img_s_per_core'] > 0, (name, host)
    assert host['batches'] == size['pipeline_batches'], (name, host)
    assert host['workers'] >= 1


def test_missing_modules_and_gpu_peaks_are_found():
  assert gpu_check._missing(('json', 'no_such_module_here')) == [
      'no_such_module_here']
  assert gpu_check._peak_tflops({'name': 'NVIDIA H100 PCIe'}) == 756.0
  assert gpu_check._peak_tflops({'name': 'NVIDIA H200'}) == 989.4
  assert gpu_check._peak_tflops({'name': 'Some GPU'}) is None


def test_bf16_is_emulated_only_on_x86_cpus_without_bf16_flags(monkeypatch):
  from big_transfer import hardware
  monkeypatch.setattr(hardware.platform, 'machine', lambda: 'x86_64')
  for flags, emulated in (('fma avx2', True), ('avx2 avx512_bf16', False),
                          ('avx2 amx_bf16', False), ('', False)):
    monkeypatch.setattr(hardware, '_cpuinfo', lambda f=flags: {
        'model name': 'Some CPU', 'flags': f})
    assert hardware.bf16_emulated('cpu') is emulated, flags
    assert hardware.bf16_emulated('cuda') is False
    assert hardware.cpu_description()['bf16_emulated'] is emulated
  monkeypatch.setattr(hardware.platform, 'machine', lambda: 'aarch64')
  assert hardware.bf16_emulated('cpu') is False
