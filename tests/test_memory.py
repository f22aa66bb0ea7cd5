"""big_transfer.memory: the estimate of a training step's memory against
what PyTorch keeps for its backward pass, and the --batch_split a run
chooses from it (alone, on a GPU, with several devices or processes). The
trainers' runs with a split chosen for them: tests/test_trainers.py. A
step that runs out of memory all the same: each framework's own error
becomes one line that names the split to use."""
import argparse
import logging
import os
import threading

import numpy as np
import pytest
import torch

from big_transfer import errors, hardware, memory, runfiles, zoo
from bit_pytorch import models
from conftest import as_processes, stand_in_nvidia_smi
from test_harness import args_for
from test_harness import run as stand_in_run

R14 = zoo.parse_arch('R14x0.5')


def kept_for_backward(arch, crop, images):
  """Bytes of the tensors that PyTorch's autograd saves for the backward
  pass of `images` images (saved_tensors_hooks sees each one)."""
  torch.manual_seed(0)
  model = models.create(arch.name, head_size=10)
  saved = [0]

  def pack(tensor):
    saved[0] += tensor.numel() * tensor.element_size()
    return tensor
  with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
    model(torch.zeros(images, 3, crop, crop)).sum()
  return saved[0]


@pytest.mark.parametrize('name', ['R14x0.5', 'R26x1'])
def test_the_estimate_exceeds_what_pytorch_keeps_but_not_by_much(name):
  arch = zoo.parse_arch(name)
  for crop in (32, 64):
    # Per image: the weights that autograd also keeps cancel out.
    kept = (kept_for_backward(arch, crop, 4)
            - kept_for_backward(arch, crop, 2)) / 2
    estimate = memory.step_bytes(arch, crop, 1) - memory.step_bytes(
        arch, crop, 0)
    assert 1.1 < estimate / kept < 1.6, (name, crop, estimate / kept)
  # Activations grow with the pixels; the parameters' state does not.
  assert memory.step_bytes(arch, 64, 1) - memory.step_bytes(arch, 64, 0) \
      == 4 * (memory.step_bytes(arch, 32, 1) - memory.step_bytes(arch, 32, 0))
  assert memory.step_bytes(arch, 32, 0) == 16 * sum(
      p.numel() for key, p in models.create(name, head_size=10)
      .named_parameters() if not key.startswith('head.conv'))


class Run:
  """harness.Run as memory.for_run uses it: a logger and a vote."""

  def __init__(self, any_process=None):
    self.any_process = any_process
    self.logger = logging.getLogger('test_memory')


def choose(monkeypatch, caplog, fits, batch=64, split=None, crop=32,
           devices=1, local=1, gpu_bytes=None, fits_crop=None):
  """The split that for_run chooses for R14x0.5 at `crop` where memory
  holds `fits` images at `fits_crop` (default: `crop`) with one model's
  state, and the messages it logs."""
  room = memory.step_bytes(R14, fits_crop or crop, fits + 0.5)
  if gpu_bytes:
    gpu_bytes = room / memory.GPU_SHARE
  else:
    monkeypatch.setattr(hardware, 'memory_bytes',
                        lambda: room / memory.HOST_SHARE)
  args = argparse.Namespace(batch=batch, batch_split=split)
  caplog.clear()
  with caplog.at_level(logging.INFO, 'test_memory'):
    memory.for_run(Run(), args, R14, crop, devices, (local, gpu_bytes))
  return args.batch_split, caplog.text


def test_the_fewest_micro_batches_that_fit(monkeypatch, caplog):
  assert choose(monkeypatch, caplog, fits=64) == (1, '')
  split, said = choose(monkeypatch, caplog, fits=63)
  assert split == 2 and '--batch_split 2: without it a step' in said
  assert '64 image(s) of R14x0.5 at 32x32' in said
  assert choose(monkeypatch, caplog, fits=20)[0] == 4    # 16 images
  assert choose(monkeypatch, caplog, fits=10, batch=48)[0] == 6   # 8
  assert choose(monkeypatch, caplog, fits=1, batch=12)[0] == 12
  # Even one image too many: the most micro-batches, and a warning.
  split, said = choose(monkeypatch, caplog, fits=0, batch=12)
  assert split == 12 and 'WARNING' in said and '--crop_size' in said
  # The resolution counts: 4 times the pixels, a quarter of the images.
  assert choose(monkeypatch, caplog, fits=64, crop=64, fits_crop=32)[0] == 4


def test_a_split_the_user_chose_is_kept_with_a_warning(monkeypatch, caplog):
  assert choose(monkeypatch, caplog, fits=64, split=4) == (4, '')
  split, said = choose(monkeypatch, caplog, fits=20, split=2)
  assert split == 2 and 'WARNING' in said
  assert '--batch_split 2 may not fit' in said
  assert '--batch_split 4 would' in said


def test_devices_sharing_and_not_sharing_a_memory(monkeypatch, caplog):
  # 4 devices, 16 images each. On a CPU the process's devices share the
  # host's memory; each GPU has its own; torchrun's processes on a host
  # share it too.
  assert choose(monkeypatch, caplog, fits=20, devices=4)[0] == 1
  assert choose(monkeypatch, caplog, fits=20, devices=4, gpu_bytes=True)[0] == 1
  room_for_two = memory.step_bytes(R14, 32, 20, 2)
  monkeypatch.setattr(hardware, 'memory_bytes',
                      lambda: room_for_two / memory.HOST_SHARE)
  args = argparse.Namespace(batch=64, batch_split=None)
  memory.for_run(Run(), args, R14, 32, 4, (2, None))  # 2 x 8 of 2 x 16
  assert args.batch_split == 2
  # A quarter of the host each: 5 of 16 images (at 256 px, where the
  # activations outweigh the parameters' state).
  monkeypatch.setenv('LOCAL_WORLD_SIZE', '4')
  assert choose(monkeypatch, caplog, fits=20, devices=4, crop=256)[0] == 4


def test_processes_choose_together(monkeypatch, caplog):
  # p1's host holds 20 images, p0's 64: both take p1's 4 micro-batches.
  rooms = {'p0': memory.step_bytes(R14, 32, 64.5),
           'p1': memory.step_bytes(R14, 32, 20.5)}
  monkeypatch.setattr(hardware, 'memory_bytes', lambda: rooms[
      threading.current_thread().name] / memory.HOST_SHARE)

  def process(index, votes):
    del index
    args = argparse.Namespace(batch=128, batch_split=None)
    memory.for_run(Run(votes), args, R14, 32, 2)
    return args.batch_split
  with caplog.at_level(logging.INFO, 'test_memory'):
    assert as_processes(2, process) == {'p0': 4, 'p1': 4}
  said = {r.threadName: r.getMessage() for r in caplog.records}
  assert said['p0'].startswith('--batch_split 4: another process has less')
  assert said['p1'].startswith('--batch_split 4: without it a step would')


def test_the_gpu_memory_that_nvidia_smi_lists(monkeypatch, tmp_path):
  smi = stand_in_nvidia_smi(tmp_path / 'bin', '81559\n40960\n')
  monkeypatch.setenv('PATH', f'{smi}{os.pathsep}{os.environ["PATH"]}')
  assert hardware.gpu_memory_bytes() == 40960 * 2**20  # the smallest
  smi = stand_in_nvidia_smi(tmp_path / 'bin', 'failed\n', 9)
  assert hardware.gpu_memory_bytes() is None
  monkeypatch.setenv('PATH', '/nonexistent')
  assert hardware.gpu_memory_bytes() is None
  assert np.isfinite(hardware.memory_bytes()) and hardware.memory_bytes() > 0


def allocate_a_pebibyte(framework):
  """Raises `framework`'s own error for an allocation it cannot make."""
  if framework == 'pytorch':
    torch.empty(2**50, dtype=torch.uint8)
  elif framework == 'jax':
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    jnp.zeros(2**50, jnp.uint8).block_until_ready()
  else:
    tf = pytest.importorskip('tensorflow')
    tf.zeros([2**50], tf.uint8)


@pytest.mark.parametrize('framework', ['pytorch', 'jax', 'tf2'])
def test_a_step_out_of_memory_names_the_split_that_halves_it(tmp_path,
                                                              framework):
  args = args_for(tmp_path, save_every=4, batch_split=2)
  with pytest.raises(errors.RunFailed) as failed:
    stand_in_run(args, stop_at=6,
                 stop=lambda: allocate_a_pebibyte(framework))
  message = str(failed.value)
  assert message.startswith('out of memory after step 6 at --batch_split 2 (')
  assert '--batch_split 4: it holds half as many images' in message
  assert message.endswith('it resumes from step 4.')
  assert errors.out_of_memory(failed.value.__cause__)  # the framework's
  assert message in (tmp_path / 'run' / runfiles.LOG).read_text()
  # As it says: the same command with twice the split goes on from step 4.
  _, result = stand_in_run(args_for(tmp_path, save_every=4, batch_split=4))
  assert result['step'] == 12


def test_the_evaluation_of_a_resumed_finished_run_out_of_memory(tmp_path):
  """A run resumed after its last step only evaluates; when that runs out
  of memory, it ends with the same one line as a step would."""
  args = args_for(tmp_path, save_every=4)
  stand_in_run(args)
  with pytest.raises(errors.RunFailed) as failed:
    stand_in_run(args, evaluate=lambda: allocate_a_pebibyte('pytorch'))
  message = str(failed.value)
  assert message.startswith('out of memory after step 12 at --batch_split 1')
  assert message.endswith('it resumes from step 12.')
  assert message in (tmp_path / 'run' / runfiles.LOG).read_text()


def test_other_errors_are_not_taken_for_memory(tmp_path):
  with pytest.raises(RuntimeError, match='^a bug$'):
    stand_in_run(args_for(tmp_path), stop_at=2,
                 stop=lambda: RuntimeError('a bug'))
