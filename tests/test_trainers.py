"""The contract every trainer keeps (bit_pytorch.train, bit_tf2.train,
bit_jax.train), tested once for the three: the outputs and their fields,
the same losses in every backend (mixup on), --batch_split equal to one
batch, resume after SIGTERM equal to an uninterrupted run, refusal to
resume with other settings, exit 2 on bad input, bad images.

Runs are tiny (R14x0.5, 32 px images already at the crop size, 12 steps)
and shared between tests: one reference run per backend.
"""
import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from big_transfer import errors, hardware, memory, zoo
from conftest import (REPO, backend_param, stand_in_nvidia_smi,
                      synthetic_weights, truncate_image, write_imagefolder)

pytestmark = pytest.mark.slow  # whole runs: left out of make test-fast

BACKENDS = ('pytorch', 'tf2', 'jax')
STEPS = 12
# Mixup on, images at the crop size (nothing resampled): every backend
# trains on the same pixels, so their losses must agree.
COMMON = ['--batch', '8', '--total_steps', str(STEPS), '--resize_size', '32',
          '--crop_size', '32', '--base_lr', '0.01', '--mixup_alpha', '0.4',
          '--eval_every', '6']
# One data worker each; JAX's none (the calling thread): its workers are
# spawned processes, slower to start than PyTorch's forked ones, and
# tests/test_loader.py runs them, the trainer's command line included.
WORKERS = {'pytorch': '1', 'tf2': '1', 'jax': '0'}
OUTPUTS = {'pytorch': ['bit.pth.tar', 'bit.prev.pth.tar'], 'tf2': ['checkpoints'],
           'jax': ['checkpoints']}


def trainer(backend):
  return importlib.import_module(f'bit_{backend}.train')


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp('trainers')
  folder = write_imagefolder(root / 'images', train=8, val=5, size=(32, 32))
  npz = root / 'tiny.npz'
  np.savez(npz, **synthetic_weights('R14x0.5', 10))
  return root, folder, str(npz)


def argv(setup, backend, name, *extra, folder=None):
  root, images, npz = setup
  return ['--name', name, '--logdir', str(root / backend), '--model', npz,
          '--dataset', 'imagefolder', '--datadir', folder or images, *COMMON,
          '--workers', WORKERS[backend], *extra]


def run(setup, backend, name, *extra, **kw):
  train = trainer(backend)
  return train.main(train.argparser().parse_args(
      argv(setup, backend, name, *extra, **kw)))


def cli_env(setup):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('WORLD_SIZE', None)
  return env


def cli(setup, backend, name, *extra, prefix=(), **kw):
  return subprocess.run(
      [*prefix, sys.executable, '-m', f'bit_{backend}.train',
       *argv(setup, backend, name, *extra, **kw)],
      cwd=REPO, env=cli_env(setup), capture_output=True, text=True,
      timeout=600)


def out(setup, backend, name):
  return setup[0] / backend / name


def weights(setup, backend, name):
  return zoo.load_npz(str(out(setup, backend, name) / 'model.npz'))


def metrics(setup, backend, name):
  with open(out(setup, backend, name) / 'metrics.jsonl') as f:
    return [json.loads(line) for line in f]


def assert_same(a, b, atol=2e-5):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=0, atol=atol, err_msg=k)


class References(dict):
  """{backend: final evaluation} of one uninterrupted run each, run (in this
  process) when first asked for: under pytest-xdist a worker runs only the
  backends of its tests (tests/conftest.py)."""

  def __init__(self, setup):
    super().__init__()
    self.setup = setup

  def __missing__(self, backend):
    self[backend] = run(self.setup, backend, 'reference')
    return self[backend]


@pytest.fixture(scope='module')
def references(setup):
  return References(setup)


@pytest.fixture
def reference(request, references):
  """`references` with the run of the test's backend done (of all three for
  a test without one), so that its files are there to compare."""
  backend = backend_param(request.node)
  for b in [backend] if backend else BACKENDS:
    references[b]  # pylint: disable=pointless-statement
  return references


@pytest.mark.parametrize('backend', BACKENDS)
def test_outputs_and_their_fields(setup, reference, backend):
  result = reference[backend]
  run_dir = out(setup, backend, 'reference')
  files = os.listdir(run_dir)
  events = [f for f in files if f.startswith('events.out.tfevents.')]
  assert len(events) == 1  # TensorBoard's copy of the metrics
  assert sorted(set(files) - set(events)) == sorted(
      ['.lock', 'config.json', 'metrics.jsonl', 'model.npz', 'results.json',
       'train.log', *OUTPUTS[backend]])
  assert result['top1'] >= 0.8, result  # 3 classes: chance is 1/3
  results = json.loads((run_dir / 'results.json').read_text())
  assert results['top1'] == result['top1'] and results['step'] == STEPS
  assert results['n'] == 15  # every validation image (3 classes x 5)
  config = json.loads((run_dir / 'config.json').read_text())
  assert config['classes'] == ['cat', 'dog', 'owl']
  assert config['command'] == f'bit_{backend}.train'
  assert config['dataset_size'] == 24 and config['resolution'] == [32, 32]
  assert config['schedule'][-1] == STEPS and config['mixup'] == 0.4
  assert config['mixup_alpha'] == 0.4 and config['resumed_from_step'] == 0
  assert config['devices'] == 1 and config['versions']
  assert config['batch_split'] == 1
  assert config['data'] == {
      'dataset': 'imagefolder', 'train_size': 24, 'full_train_size': 24,
      'eval_size': 15, 'eval_split': 'val', 'num_classes': 3,
      'original_hw': [32, 32]}
  # Each image read 4 times: held (the run folder's list above: released).
  assert config['hold_images'] is True
  records = metrics(setup, backend, 'reference')
  train = [r for r in records if r['split'] == 'train']
  val = [r for r in records if r['split'] == 'val']
  assert [r['step'] for r in train] == list(range(1, STEPS + 1))
  assert set(train[0]) == {'step', 'split', 'loss', 'lr', 'images_per_sec'}
  assert train[0]['loss'] == pytest.approx(np.log(3), rel=1e-5)  # zero head
  assert [r['step'] for r in val] == [6, 12]
  assert set(val[0]) == {'step', 'split', 'loss', 'top1', 'top5', 'n'}
  assert val[-1]['top1'] == result['top1']
  # The export is a published-layout checkpoint with a trained 3-class head.
  exported = weights(setup, backend, 'reference')
  zoo.check_weights(exported, zoo.parse_arch('R14x0.5'), 3)
  assert np.abs(exported['resnet/head/conv2d/kernel']).sum() > 0
  # The first step's time (a compiled step's compilation) is logged.
  assert re.search(r'INFO .*the first step took [\d.]+ s',
                   (run_dir / 'train.log').read_text())


def test_every_backend_trains_on_the_same_stream(setup, reference):
  """Same seed, same batches, same mixup: the per-step losses and the
  weights of the three backends agree to float rounding."""
  del reference
  losses = {b: np.array([r['loss'] for r in metrics(setup, b, 'reference')
                         if r['split'] == 'train']) for b in BACKENDS}
  assert np.ptp(losses['pytorch']) > 0.1  # the runs learned something
  for b in ('tf2', 'jax'):
    np.testing.assert_allclose(losses[b], losses['pytorch'], rtol=2e-4,
                               err_msg=b)
    assert_same(weights(setup, b, 'reference'),
                weights(setup, 'pytorch', 'reference'), atol=2e-4)


@pytest.mark.parametrize('backend', BACKENDS)
def test_a_batch_split_chosen_for_the_memory_equals_one_batch(
    setup, reference, backend, monkeypatch):
  # Memory for one image at a time (big_transfer.memory's estimate): the
  # run splits its batch of 8 into micro-batches of one example, each
  # beside its mixup partner.
  monkeypatch.setattr(hardware, 'memory_bytes', lambda: memory.step_bytes(
      zoo.parse_arch('R14x0.5'), 32, 1.5) / memory.HOST_SHARE)
  result = run(setup, backend, 'split8', '--batch_split', 'auto')
  config = json.loads((out(setup, backend, 'split8') / 'config.json')
                      .read_text())
  assert config['batch_split'] == 8
  assert 'INFO --batch_split 8: without it a step would need' in (
      out(setup, backend, 'split8') / 'train.log').read_text()
  assert_same(weights(setup, backend, 'split8'),
              weights(setup, backend, 'reference'))
  assert result['top1'] == reference[backend]['top1']


@pytest.mark.parametrize('backend', BACKENDS)
def test_resume_after_sigterm_equals_an_uninterrupted_run(
    setup, reference, backend, sigterm_after_step):
  sigterm_after_step(4)
  with pytest.raises(SystemExit) as stop:
    run(setup, backend, 'resumed')
  assert stop.value.code == 128 + signal.SIGTERM
  assert not (out(setup, backend, 'resumed') / 'results.json').exists()
  assert [r['step'] for r in metrics(setup, backend, 'resumed')] == [
      1, 2, 3, 4]
  sigterm_after_step(None)
  result = run(setup, backend, 'resumed')
  assert result['top1'] == reference[backend]['top1']
  assert result['loss'] == pytest.approx(reference[backend]['loss'],
                                         rel=1e-5)
  assert_same(weights(setup, backend, 'resumed'),
              weights(setup, backend, 'reference'), atol=1e-6)
  records = metrics(setup, backend, 'resumed')
  assert [r['step'] for r in records if r['split'] == 'train'] == list(
      range(1, STEPS + 1))
  config = json.loads((out(setup, backend, 'resumed') /
                       'config.json').read_text())
  assert config['resumed_from_step'] == 4


@pytest.mark.parametrize('backend', BACKENDS)
def test_resuming_with_other_settings_is_refused(setup, reference, backend):
  del reference  # the run it would resume
  with pytest.raises(errors.BadInput,
                     match='base_lr: 0.01 there, 0.1 now'):
    run(setup, backend, 'reference', '--base_lr', '0.1')


@pytest.mark.parametrize('backend', BACKENDS)
def test_a_folder_of_another_backends_run_is_refused(setup, reference, backend,
                                                     tmp_path):
  """Another trainer could not resume its checkpoints, and would have
  trained anew over its model.npz and results."""
  other = BACKENDS[(BACKENDS.index(backend) + 1) % len(BACKENDS)]
  folder = tmp_path / 'run'
  folder.mkdir()
  shutil.copy(out(setup, backend, 'reference') / 'config.json', folder)
  with pytest.raises(errors.BadInput,
                     match=f'holds a run of python -m bit_{backend}.train'):
    run(setup, other, 'run', '--logdir', str(tmp_path))
  assert os.listdir(folder) == ['config.json']


@pytest.mark.parametrize('backend', BACKENDS)
def test_a_failed_weights_download_is_reported_before_the_data_is_read(
    setup, backend, tmp_path, weights_download_fails):
  """Reading (or downloading) a dataset can take long; the registered
  model's download comes first, and fails leaving no folder it made."""
  del weights_download_fails
  cache = tmp_path / 'weights' / 'bit'
  with pytest.raises(errors.BadInput, match='could not download https://'
                     '.*BiT-S-R50x1.npz .*no network in this test'):
    run(setup, backend, 'offline', '--model', 'BiT-S-R50x1',
        '--bit_pretrained_dir', str(cache), '--logdir', str(tmp_path / 'runs'))
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize('backend', BACKENDS)
def test_bad_input_exits_2_before_any_work(setup, backend):
  proc = cli(setup, backend, 'bad', '--batch', '10', '--batch_split', '3')
  assert proc.returncode == 2, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and 'not divisible' in last, last
  assert not out(setup, backend, 'bad').exists()
  for extra, message in ((['--mixup_alpha', '-1'], 'mixup_alpha'),
                         (['--model', 'BiT-M-R51x1'], 'unknown model'),
                         (['--model', str(setup[0] / 'missing.npz')],
                          'does not exist')):
    with pytest.raises(errors.BadInput, match=message):
      run(setup, backend, 'bad', *extra)
  assert not out(setup, backend, 'bad').exists()


@pytest.fixture(scope='module')
def bad_folder(tmp_path_factory):
  """An image folder with a file that is no image and a truncated PNG."""
  folder = write_imagefolder(tmp_path_factory.mktemp('bad') / 'images',
                             train=4, val=2, size=(32, 32))
  with open(os.path.join(folder, 'train', 'dog', 'broken.png'), 'wb') as f:
    f.write(b'not an image')
  path = os.path.join(folder, 'train', 'cat', '001.png')
  truncate_image(path)
  return folder


@pytest.mark.parametrize('backend', BACKENDS)
def test_bad_images_are_named_or_the_same_ones_left_out(setup, bad_folder,
                                                        backend):
  with pytest.raises(errors.BadInput, match=r'broken\.png.*'
                     '--skip_bad_images'):
    run(setup, backend, 'bad_images', folder=bad_folder)
  result = run(setup, backend, 'skip', '--skip_bad_images', '--total_steps',
               '1', folder=bad_folder)
  assert result['n'] == 6
  config = json.loads((out(setup, backend, 'skip') /
                       'config.json').read_text())
  assert config['dataset_size'] == 11  # 12 images, the truncated one out


# --------------------------------------------------------------------------
# Crashes, odd input and bad places.

# Runs a trainer in a fresh process that kills itself (SIGKILL: no handler,
# no checkpoint of its own) right after training step K.
KILLED_AFTER_STEP = (
    'import importlib, os, signal, sys\n'
    'from big_transfer import progress\n'
    'backend, k = sys.argv[1], int(sys.argv[2])\n'
    'update = progress.Progress.update\n'
    'def update_then_die(self, step):\n'
    '  update(self, step)\n'
    '  if step == k:\n'
    '    os.kill(os.getpid(), signal.SIGKILL)\n'
    'progress.Progress.update = update_then_die\n'
    'train = importlib.import_module(f"bit_{backend}.train")\n'
    'train.main(train.argparser().parse_args(sys.argv[3:]))\n')


@pytest.mark.parametrize('backend', BACKENDS)
def test_sigkill_then_the_same_command_equals_an_uninterrupted_run(
    setup, reference, backend):
  killed = subprocess.run(
      [sys.executable, '-c', KILLED_AFTER_STEP, backend, '9',
       *argv(setup, backend, 'killed', '--save_every', '4')],
      cwd=REPO, env=cli_env(setup), capture_output=True, text=True,
      timeout=600)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
  # Its metrics went further than its newest checkpoint (step 8).
  assert max(r['step'] for r in metrics(setup, backend, 'killed')) >= 8
  # The dead process's lock does not block the same command.
  result = run(setup, backend, 'killed', '--save_every', '4')
  assert result['top1'] == reference[backend]['top1']
  assert_same(weights(setup, backend, 'killed'),
              weights(setup, backend, 'reference'), atol=1e-6)
  records = metrics(setup, backend, 'killed')
  assert [r['step'] for r in records] == [
      r['step'] for r in metrics(setup, backend, 'reference')]
  assert 'resuming from' in (out(setup, backend, 'killed') /
                             'train.log').read_text()


@pytest.mark.parametrize('backend', BACKENDS)
def test_the_same_command_twice_gives_the_same_weights(setup, backend,
                                                       tmp_path_factory):
  """At a size where TF2's CPU kernels, before one inter-op thread was
  asked for, gave other weights from step 4 on (R50x1, batch 16); both
  runs at once, as fresh processes."""
  root = tmp_path_factory.mktemp(f'twice_{backend}')
  folder = write_imagefolder(root / 'images', train=32, val=2, size=(32, 32))
  npz = root / 'r50.npz'
  np.savez(npz, **synthetic_weights('R50x1', 10))
  argv = ['--logdir', str(root), '--model', str(npz), '--dataset',
          'imagefolder', '--datadir', folder, '--batch', '16',
          '--total_steps', '5', '--base_lr', '0.01', '--workers', '1',
          '--resize_size', '36', '--crop_size', '32']
  procs = [subprocess.Popen(
      [sys.executable, '-m', f'bit_{backend}.train', '--name', name, *argv],
      cwd=REPO, env=cli_env(setup), stderr=subprocess.PIPE, text=True)
           for name in ('a', 'b')]
  for p in procs:
    _, err = p.communicate(timeout=900)
    assert p.returncode == 0, err[-2000:]
  a, b = (zoo.load_npz(str(root / n / 'model.npz')) for n in 'ab')
  assert_same(a, b, atol=0)


NEWEST = {'pytorch': ['bit.pth.tar'], 'jax': ['checkpoints/8/**/*'],
          'tf2': ['checkpoints/ckpt-8.*']}


@pytest.mark.parametrize('backend', BACKENDS)
def test_an_unreadable_newest_checkpoint_is_set_aside(
    setup, reference, backend, sigterm_after_step):
  sigterm_after_step(8)
  with pytest.raises(SystemExit):
    run(setup, backend, 'damaged', '--save_every', '4')
  sigterm_after_step(None)
  damaged = [p for pattern in NEWEST[backend] for p in
             out(setup, backend, 'damaged').glob(pattern) if p.is_file()]
  assert damaged
  for path in damaged:
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
  result = run(setup, backend, 'damaged', '--save_every', '4')
  log = (out(setup, backend, 'damaged') / 'train.log').read_text()
  assert 'set aside' in log and 'at step 6' in log  # the one before
  assert result['top1'] == reference[backend]['top1']
  assert_same(weights(setup, backend, 'damaged'),
              weights(setup, backend, 'reference'), atol=1e-6)


@pytest.mark.parametrize('backend', BACKENDS)
def test_a_second_live_run_of_the_same_name_is_refused(setup, backend):
  first = subprocess.Popen(
      [sys.executable, '-m', f'bit_{backend}.train',
       *argv(setup, backend, 'twice', '--total_steps', '100000')],
      cwd=REPO, env=cli_env(setup), stderr=subprocess.DEVNULL)
  try:
    log = out(setup, backend, 'twice') / 'train.log'
    for _ in range(600):
      if log.exists() and 'INFO' in log.read_text():
        break
      time.sleep(0.1)
    # Frozen (its lock still held), the first run writes nothing more
    # (holding, config.json, checkpoints) while the second is refused.
    first.send_signal(signal.SIGSTOP)
    before = sorted(os.listdir(out(setup, backend, 'twice')))
    with pytest.raises(errors.BadInput, match='still going'):
      run(setup, backend, 'twice', '--total_steps', '100000')
    assert sorted(os.listdir(out(setup, backend, 'twice'))) == before
  finally:
    first.kill()
    first.wait(timeout=60)


@pytest.mark.parametrize('backend', BACKENDS)
def test_a_diverging_loss_stops_before_any_bad_checkpoint(setup, backend):
  with pytest.raises(errors.Diverged, match=r'at step \d+') as e:
    run(setup, backend, 'nan', '--base_lr', '1e12', '--mixup_alpha', '0',
        '--save_every', '1')
  assert 'Lower --base_lr' in str(e.value)
  assert not (out(setup, backend, 'nan') / 'results.json').exists()
  assert not (out(setup, backend, 'nan') / 'model.npz').exists()
  # Resuming it finds only finite weights (or nothing) to start from.
  with pytest.raises(errors.Diverged):
    run(setup, backend, 'nan', '--base_lr', '1e12', '--mixup_alpha', '0',
        '--save_every', '1')


@pytest.fixture(scope='module')
def odd_folder(tmp_path_factory):
  """Class folders and files with accented names and spaces."""
  return write_imagefolder(tmp_path_factory.mktemp('odd') / 'ïmages ö',
                           classes=('café ü', 'ä b', 'x'), train=3, val=2,
                           size=(32, 32))


@pytest.mark.parametrize('backend', BACKENDS)
def test_any_name_the_file_system_allows(setup, odd_folder, backend):
  result = run(setup, backend, 'odd', '--total_steps', '2', '--batch', '4',
               folder=odd_folder)
  assert result['n'] == 6
  config = json.loads((out(setup, backend, 'odd') /
                       'config.json').read_text())
  assert config['classes'] == sorted(['café ü', 'ä b', 'x'])


@pytest.mark.parametrize('backend', BACKENDS)
def test_bad_places_and_values_exit_2(setup, backend, tmp_path):
  unwritable = tmp_path / 'a_file'
  unwritable.write_text('not a folder')
  cases = [(['--logdir', str(unwritable)], 'cannot write'),
           (['--base_lr', '-1'], 'base_lr'), (['--base_lr', 'nan'], 'base_lr'),
           (['--base_lr', '0'], 'base_lr'), (['--save_every', '0'],
                                             'save_every')]
  for extra, message in cases:
    with pytest.raises(errors.BadInput, match=message):
      run(setup, backend, 'places', *extra)
  assert not out(setup, backend, 'places').exists()
  empty = write_imagefolder(tmp_path / 'empty', train=2, val=1,
                            size=(32, 32))
  for f in os.listdir(os.path.join(empty, 'val', 'owl')):
    os.remove(os.path.join(empty, 'val', 'owl', f))
  with pytest.raises(errors.BadInput, match=r'val/owl has no images'):
    run(setup, backend, 'places', folder=empty)
  assert not out(setup, backend, 'places').exists()  # nor after reading it


@pytest.mark.parametrize('backend', BACKENDS)
def test_a_truncated_image_is_named(setup, backend, tmp_path):
  folder = write_imagefolder(tmp_path / 'images', train=4, val=2,
                             size=(32, 32))
  path = os.path.join(folder, 'val', 'cat', '000.png')
  truncate_image(path)
  # In-process data workers would fork after JAX/TF started threads.
  with pytest.raises(errors.BadInput, match=r'val/cat/000\.png'):
    run(setup, backend, 'truncated', '--total_steps', '1', '--workers', '0',
        folder=folder)


# --------------------------------------------------------------------------
# Several devices or processes: the same global batch, the same update.

TF2_LOGICAL_DEVICES = (
    'import sys, tensorflow as tf\n'
    'cpu = tf.config.list_physical_devices("CPU")[0]\n'
    'tf.config.set_logical_device_configuration(\n'
    '    cpu, [tf.config.LogicalDeviceConfiguration()] * 2)\n'
    'from bit_tf2 import train\n'
    'train.main(train.argparser().parse_args(sys.argv[1:]))\n')
LAUNCH = {
    # Two processes (DDP, gloo), one device each.
    'pytorch': ([sys.executable, '-m', 'torch.distributed.run', '--standalone',
                 '--nproc_per_node', '2', '-m', 'bit_pytorch.train'], {}, 2),
    # Two logical CPU devices under MirroredStrategy.
    'tf2': ([sys.executable, '-c', TF2_LOGICAL_DEVICES], {}, 2),
    # Four CPU devices in one mesh.
    'jax': ([sys.executable, '-m', 'bit_jax.train'],
            {'XLA_FLAGS': '--xla_force_host_platform_device_count=4'}, 4),
}


@pytest.mark.parametrize('backend', BACKENDS)
def test_several_devices_equal_one(setup, reference, backend):
  launcher, env, devices = LAUNCH[backend]
  env = dict(cli_env(setup), **env)
  proc = subprocess.run([*launcher, *argv(setup, backend, 'devices')],
                        cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  run_dir = out(setup, backend, 'devices')
  assert json.loads((run_dir / 'config.json').read_text())[
      'devices'] == devices
  assert_same(weights(setup, backend, 'devices'),
              weights(setup, backend, 'reference'))
  losses = [[r['loss'] for r in metrics(setup, backend, name)
             if r['split'] == 'train'] for name in ('devices', 'reference')]
  np.testing.assert_allclose(*losses, rtol=1e-5)
  result = json.loads((run_dir / 'results.json').read_text())
  assert result['n'] == 15 and result['top1'] == reference[backend]['top1']


# --------------------------------------------------------------------------
# What one backend adds.

def test_tf2_fp16_with_loss_scaling_learns_and_exports_a_saved_model(setup):
  import tensorflow as tf
  result = run(setup, 'tf2', 'fp16', '--precision', 'fp16',
               '--export_saved_model')
  assert result['top1'] >= 0.8, result
  exported = weights(setup, 'tf2', 'fp16')
  assert all(v.dtype == np.float32 and np.isfinite(v).all()
             for v in exported.values())
  served = tf.saved_model.load(str(out(setup, 'tf2', 'fp16') /
                                   'saved_model'))
  images = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3))
  logits = served.serve(images.astype(np.float32)).numpy()
  assert logits.shape == (2, 3) and np.isfinite(logits).all()


def test_jax_refuses_fp16(setup):
  with pytest.raises(errors.BadInput, match='use bf16'):
    run(setup, 'jax', 'fp16', '--precision', 'fp16')


# A fault injected into a trainer's process (tests/faults.py): a disk that
# fills (the kernel refuses to grow any file, as a full disk does), or
# SIGKILL inside a checkpoint's write.
FAULTS = os.path.join(REPO, 'tests', 'faults.py')


def faulty(setup, backend, name, fault, *extra, prefix=()):
  return subprocess.run(
      [*prefix, sys.executable, FAULTS, fault, '-m', f'bit_{backend}.train',
       *argv(setup, backend, name, *extra)],
      cwd=REPO, env=cli_env(setup), capture_output=True, text=True,
      timeout=600)


def assert_one_line(done, status, *phrases):
  """Ended with `status` and one 'error:' line holding `phrases`; no
  traceback, no exception printed by a library's thread."""
  err = done.stderr
  assert done.returncode == status, err[-3000:]
  assert 'Traceback' not in err and not re.search(r'^\w*Error\b', err,
                                                  re.M), err[-3000:]
  lines = [l for l in err.splitlines() if l.startswith('error: ')]
  assert len(lines) == 1, err[-3000:]
  for phrase in phrases:
    assert phrase in lines[0]


def assert_ends_as_the_reference(setup, reference, backend, name):
  result = json.loads((out(setup, backend, name) /
                       'results.json').read_text())
  assert result['top1'] == reference[backend]['top1']
  assert_same(weights(setup, backend, name),
              weights(setup, backend, 'reference'), atol=1e-6)
  assert [r['step'] for r in metrics(setup, backend, name)] == [
      r['step'] for r in metrics(setup, backend, 'reference')]


@pytest.mark.parametrize('backend', BACKENDS)
def test_a_full_disk_and_a_kill_inside_a_save_lose_nothing(setup, reference,
                                                           backend):
  name, extra = 'faults', ('--save_every', '4')
  # Checkpoints at steps 4, 6 (an evaluation), 8 and 12: the disk fills
  # just before the one of step 6.
  full = faulty(setup, backend, name, 'full_at_save:2', *extra)
  assert_one_line(full, 3, 'checkpoint of step 6',
                  'checkpoint of step 4 is intact')
  # Resumed from step 4, killed during its second save (step 8).
  killed = faulty(setup, backend, name, 'kill_in_save:2:0.3', *extra)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  assert 'resuming from' in killed.stderr and 'at step 4' in killed.stderr
  done = cli(setup, backend, name, *extra)
  assert done.returncode == 0, done.stderr[-3000:]
  assert re.search(r'resuming from .* at step [68]\b', done.stderr)
  assert_ends_as_the_reference(setup, reference, backend, name)


def test_a_full_disk_while_logging_or_exporting_keeps_the_checkpoint(
    setup, reference):
  """Metrics and the export are the harness's, the same in every backend:
  PyTorch stands in for the three."""
  name, extra = 'full', ('--save_every', '4')
  full = faulty(setup, 'pytorch', name, 'full_at_metrics:5', *extra)
  assert_one_line(full, 3, 'metrics.jsonl', 'checkpoint of step 4 is intact')
  assert 'cannot write to' in full.stderr  # train.log: said once
  full = faulty(setup, 'pytorch', name, 'full_at_finish', *extra)
  assert_one_line(full, 3, 'trained model',
                  'checkpoint of step 12 is intact')
  assert not (out(setup, 'pytorch', name) / 'results.json').exists()
  done = cli(setup, 'pytorch', name, *extra)
  assert done.returncode == 0, done.stderr[-3000:]
  assert_ends_as_the_reference(setup, reference, 'pytorch', name)


def test_a_read_only_run_folder_is_refused_and_left_as_it_was(setup,
                                                               reference):
  name, extra = 'read_only', ('--save_every', '4')
  killed = faulty(setup, 'pytorch', name, 'kill_in_save:2:0.3', *extra)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  folder = out(setup, 'pytorch', name)
  before = {p: p.read_bytes() for p in folder.iterdir() if p.is_file()}
  if os.geteuid():
    prefix = ()
    folder.chmod(0o555)
  else:  # root writes anywhere; a read-only mount of the folder stops it
    prefix = ('unshare', '-m', 'sh', '-c', 'mount --bind "$0" "$0" && '
              'mount -o remount,ro,bind "$0" "$0" && exec "$@"', str(folder))
    if subprocess.run([*prefix, 'true'], capture_output=True).returncode:
      pytest.skip('cannot make a read-only mount here')
  try:
    refused = cli(setup, 'pytorch', name, *extra, prefix=prefix)
  finally:
    folder.chmod(0o755)
  assert_one_line(refused, 2, f'cannot write to {folder}', 'make it writable')
  assert {p: p.read_bytes() for p in folder.iterdir() if p.is_file()} == (
      before)
  done = cli(setup, 'pytorch', name, *extra)
  assert done.returncode == 0, done.stderr[-3000:]
  assert_ends_as_the_reference(setup, reference, 'pytorch', name)

@pytest.mark.parametrize('backend', BACKENDS)
def test_unseen_gpus_and_slow_bf16_are_named_with_their_remedies(
    setup, backend, tmp_path):
  """One line names the install for GPUs that the framework does not see,
  one names fp32 where this CPU's bf16 is no faster (hardware.bf16_warning:
  every backend on a CPU without bf16 instructions, JAX on every CPU)."""
  from big_transfer import hardware
  smi = stand_in_nvidia_smi(tmp_path / 'bin', 'GPU 0: NVIDIA H200 (UUID: '
                            'GPU-0)\nGPU 1: NVIDIA H200 (UUID: GPU-1)\n')
  done = subprocess.run(
      [sys.executable, '-m', f'bit_{backend}.train',
       *argv(setup, backend, 'unseen', '--total_steps', '1', '--precision',
             'bf16')],
      cwd=REPO, env=dict(cli_env(setup),
                         PATH=f'{smi}{os.pathsep}{os.environ["PATH"]}'),
      capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  lines = [l for l in done.stderr.splitlines() if 'nvidia-smi' in l]
  assert len(lines) == 1, done.stderr[-3000:]
  assert '2 NVIDIA GPU(s)' in lines[0]
  assert hardware.GPU_INSTALLS[backend] in lines[0]
  slow = hardware.bf16_warning('cpu', backend)
  named = [l for l in done.stderr.splitlines() if 'prefer --precision fp32' in l]
  assert len(named) == (1 if slow else 0), done.stderr[-3000:]
  assert not slow or named[0].endswith(slow)
