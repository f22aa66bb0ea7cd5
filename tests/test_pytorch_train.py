"""bit_pytorch.train: fine-tuning end to end on generated image folders with
tiny models (R14x0.5, 32 px), offline."""
import json
import os
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import torch

import bit_common
from bit_pytorch import data as bit_data
from bit_pytorch import train
from conftest import REPO, write_imagefolder

TINY = ['--resize_size', '40', '--crop_size', '32', '--workers', '0',
        '--base_lr', '0.05']


def flags(folder, npz, logdir, name, *extra):
  return ['--name', name, '--logdir', str(logdir), '--model', npz,
          '--dataset', 'imagefolder', '--datadir', folder, *TINY, *extra]


def run_main(argv):
  return train.main(train.argparser().parse_args(argv))


def weights(logdir, name):
  return bit_common.load_npz(os.path.join(logdir, name, 'model.npz'))


def assert_same_weights(a, b, atol=0.0):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=0, atol=atol, err_msg=k)


def cli_env(threads=1):
  env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS=str(threads))
  env.pop('WORLD_SIZE', None)
  return env


def run_cli(argv, launcher=(sys.executable, '-m', 'bit_pytorch.train'),
            **kw):
  return subprocess.run([*launcher, *argv], cwd=REPO, env=cli_env(),
                        capture_output=True, text=True, timeout=300, **kw)


@pytest.fixture(autouse=True, scope='module')
def one_thread():
  """In-process runs use one thread, as the subprocesses do (OMP_NUM_THREADS
  1), so their results can be compared exactly."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  return write_imagefolder(tmp_path_factory.mktemp('images'), train=8, val=5)


@pytest.fixture(scope='module')
def npz(tmp_path_factory):
  from conftest import synthetic_weights
  path = tmp_path_factory.mktemp('weights') / 'tiny.npz'
  np.savez(path, **synthetic_weights('R14x0.5', 10))
  return str(path)


def test_tiny_run_learns_and_writes_every_output(folder, npz, tmp_path):
  result = run_main(flags(folder, npz, tmp_path, 'run', '--batch', '8',
                          '--total_steps', '24', '--eval_every', '12'))
  out = tmp_path / 'run'
  assert sorted(os.listdir(out)) == ['bit.pth.tar', 'config.json',
                                     'metrics.jsonl', 'model.npz',
                                     'results.json', 'train.log']
  # 3 classes: chance is 1/3.
  assert result['top1'] >= 0.8, result
  results = json.loads((out / 'results.json').read_text())
  assert results['top1'] == result['top1'] and results['step'] == 24
  assert results['n'] == 15  # every validation image (3 classes x 5)
  config = json.loads((out / 'config.json').read_text())
  assert config['classes'] == ['cat', 'dog', 'owl']
  assert config['dataset_size'] == 24
  assert config['resolution'] == [40, 32]
  assert config['schedule'][-1] == 24 and config['mixup'] == 0.0
  assert config['devices'] == 1 and 'torch' in config['versions']
  records = [json.loads(l) for l in (out / 'metrics.jsonl').open()]
  train_records = [r for r in records if r['split'] == 'train']
  val_records = [r for r in records if r['split'] == 'val']
  assert [r['step'] for r in train_records] == list(range(1, 25))
  assert set(train_records[0]) == {'step', 'split', 'loss', 'lr',
                                   'images_per_sec'}
  assert train_records[0]['loss'] == pytest.approx(np.log(3), rel=1e-4)
  assert [r['step'] for r in val_records] == [12, 24]
  assert set(val_records[0]) == {'step', 'split', 'loss', 'top1', 'top5',
                                 'n'}
  assert val_records[-1]['top1'] == result['top1']
  # The exported .npz loads into a fresh model that agrees with the run.
  exported = bit_common.load_npz(str(out / 'model.npz'))
  assert exported['resnet/head/conv2d/kernel'].shape == (1, 1, 1024, 3)
  assert np.abs(exported['resnet/head/conv2d/kernel']).sum() > 0
  assert 'INFO' in (out / 'train.log').read_text()


def test_batch_split_gives_the_same_update(folder, npz, tmp_path):
  common = ['--batch', '8', '--total_steps', '4', '--base_lr', '0.3']
  run_main(flags(folder, npz, tmp_path, 'split1', *common))
  run_main(flags(folder, npz, tmp_path, 'split4', *common,
                 '--batch_split', '4'))
  a, b = weights(tmp_path, 'split1'), weights(tmp_path, 'split4')
  assert_same_weights(a, b, atol=1e-5)
  start = bit_common.load_npz(npz)
  moved = np.abs(a['resnet/group_norm/gamma'] -
                 start['resnet/group_norm/gamma']).max()
  assert moved > 1e-3  # The comparison is not between untouched weights.


def test_fewshot_subset_is_reproducible_and_balanced():
  labels = np.repeat(np.arange(4), [10, 7, 12, 9])
  source = bit_data.Source(labels, images=np.zeros((len(labels), 2, 2, 3),
                                                   np.uint8))

  def draw(k, seed):
    args = types.SimpleNamespace(examples_per_class=k,
                                 examples_per_class_seed=seed)
    return bit_data.fewshot(source, args).labels, bit_common.fewshot_indices(
        labels, k, seed)

  (l1, i1), (l2, i2), (_, i3) = draw(5, 1), draw(5, 1), draw(5, 2)
  np.testing.assert_array_equal(i1, i2)
  np.testing.assert_array_equal(l1, l2)
  assert not np.array_equal(i1, i3)
  np.testing.assert_array_equal(np.bincount(l1), [5, 5, 5, 5])
  np.testing.assert_array_equal(labels[i1], l1)
  with pytest.raises(bit_common.BadInput, match='class 1 has only 7'):
    draw(8, 0)


def test_small_subsets_are_drawn_with_replacement_and_epochs_are_permutations():
  small = bit_data.TrainBatches(n=6, batch=16, seed=3, start_step=0,
                                total_steps=2)
  batch = small.global_batch(0)
  assert len(batch) == 16 and set(batch) <= set(range(6))
  assert not np.array_equal(batch, small.global_batch(1))
  full = bit_data.TrainBatches(n=10, batch=4, seed=3, start_step=0,
                               total_steps=5)
  stream = np.concatenate([full.global_batch(s) for s in range(5)])
  assert sorted(stream[:10]) == list(range(10))  # epoch 0
  assert sorted(stream[10:20]) == list(range(10))  # epoch 1
  assert not np.array_equal(stream[:10], stream[10:20])


def test_processes_and_micro_batches_share_the_global_batch():
  def micro_batches(rank, world, split, start=0):
    return list(bit_data.TrainBatches(20, 8, 0, start, 3, rank, world, split))

  one = micro_batches(0, 1, 1)
  two = [micro_batches(r, 2, 2) for r in range(2)]
  for step in range(3):
    parts = two[0][2 * step:2 * step + 2] + two[1][2 * step:2 * step + 2]
    assert sum(parts, []) == one[step]
  assert micro_batches(0, 1, 1, start=2) == one[2:]  # resuming at step 2


def test_mixup_partners_are_pairs():
  assert bit_data.mixup_partner(6, 'cpu').tolist() == [1, 0, 3, 2, 5, 4]
  assert bit_data.mixup_partner(5, 'cpu').tolist() == [1, 0, 3, 2, 4]


def test_sigterm_then_restart_equals_an_uninterrupted_run(folder, npz,
                                                          tmp_path):
  common = ['--batch', '6', '--total_steps', '16', '--eval_every', '5']
  run_main(flags(folder, npz, tmp_path, 'whole', *common))
  argv = flags(folder, npz, tmp_path, 'killed', *common)
  proc = subprocess.Popen([sys.executable, '-m', 'bit_pytorch.train', *argv],
                          cwd=REPO, env=cli_env(), stderr=subprocess.PIPE,
                          text=True)
  metrics = tmp_path / 'killed' / 'metrics.jsonl'
  deadline = time.time() + 120
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and len(metrics.read_text().splitlines()) >= 4:
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signal.SIGTERM, err
  state = torch.load(tmp_path / 'killed' / train.CHECKPOINT,
                     weights_only=True)
  assert 0 < state['step'] < 16, state['step']
  resumed = run_cli(argv)
  assert resumed.returncode == 0, resumed.stderr
  assert 'resuming from' in resumed.stderr
  assert_same_weights(weights(tmp_path, 'whole'), weights(tmp_path, 'killed'))
  lines = [json.loads(l) for l in metrics.open()]
  assert [r['step'] for r in lines if r['split'] == 'train'] == list(
      range(1, 17))
  assert [r['step'] for r in lines if r['split'] == 'val'] == [5, 10, 15, 16]


def test_two_processes_equal_one(folder, npz, tmp_path):
  common = ['--batch', '8', '--total_steps', '3', '--base_lr', '0.3',
            '--batch_split', '2']
  run_main(flags(folder, npz, tmp_path, 'one', *common))
  torchrun = (sys.executable, '-m', 'torch.distributed.run', '--standalone',
              '--nproc_per_node', '2', '-m', 'bit_pytorch.train')
  two = run_cli(flags(folder, npz, tmp_path, 'two', *common),
                launcher=torchrun)
  assert two.returncode == 0, two.stderr
  assert json.loads((tmp_path / 'two' / 'config.json').read_text())[
      'devices'] == 2
  assert_same_weights(weights(tmp_path, 'one'), weights(tmp_path, 'two'),
                      atol=1e-5)
  r1, r2 = (json.loads((tmp_path / n / 'results.json').read_text())
            for n in ('one', 'two'))
  assert r1['n'] == r2['n'] == 15
  assert r1['loss'] == pytest.approx(r2['loss'], rel=1e-4)


@pytest.mark.parametrize('extra, message', [
    (['--batch', '10', '--batch_split', '3'], 'not divisible'),
    (['--examples_per_class', '9'], 'has only 8'),
    (['--crop_size', '64'], 'larger than'),
    (['--precision', 'fp64'], 'invalid choice'),
])
def test_bad_flags_fail_fast(folder, npz, tmp_path, capsys, extra, message):
  with pytest.raises(SystemExit) as e:
    train.cli(flags(folder, npz, tmp_path, 'bad', *extra))
  assert e.value.code == 2
  assert message in capsys.readouterr().err
  assert not (tmp_path / 'bad' / 'results.json').exists()


def test_bad_image_stops_with_its_name_unless_skipped(npz, tmp_path):
  folder = write_imagefolder(tmp_path / 'images', train=4, val=2)
  bad = os.path.join(folder, 'train', 'dog', 'broken.png')
  with open(bad, 'wb') as f:
    f.write(b'not an image')
  proc = run_cli(flags(folder, npz, tmp_path, 'bad', '--batch', '4',
                       '--total_steps', '2'))
  assert proc.returncode == 2
  assert 'broken.png' in proc.stderr and '--skip_bad_images' in proc.stderr
  result = run_main(flags(folder, npz, tmp_path, 'skip', '--batch', '4',
                          '--total_steps', '2', '--skip_bad_images'))
  assert result['n'] == 6
  config = json.loads((tmp_path / 'skip' / 'config.json').read_text())
  assert config['dataset_size'] == 12


def test_truncated_image_found_by_a_worker_is_named(npz, tmp_path):
  folder = write_imagefolder(tmp_path / 'images', train=4, val=2)
  path = os.path.join(folder, 'val', 'cat', '000.png')
  with open(path, 'rb') as f:
    head = f.read(100)  # the header reads; the pixels do not
  with open(path, 'wb') as f:
    f.write(head)
  # In a fresh process: data workers fork, which is unsafe once JAX or TF
  # (imported by other tests in this process) have started their threads.
  out = run_cli(flags(folder, npz, tmp_path, 'trunc', '--batch', '4',
                      '--total_steps', '1', '--workers', '1'))
  assert out.returncode == 2, out.stderr
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith('error: cannot read image') and '000.png' in last


def test_resuming_with_other_settings_is_refused(folder, npz, tmp_path):
  run_main(flags(folder, npz, tmp_path, 'r', '--batch', '4',
                 '--total_steps', '1'))
  with pytest.raises(bit_common.BadInput, match='batch: 4 there, 8 now'):
    run_main(flags(folder, npz, tmp_path, 'r', '--batch', '8',
                   '--total_steps', '1'))


def test_array_dataset_and_fewshot_run(npz, tmp_path):
  # The shared parser's args work too (PyTorch-only flags take defaults).
  result = train.main(bit_common.argparser().parse_args([
      '--name', 'digits', '--logdir', str(tmp_path), '--model', npz,
      '--dataset', 'digits', '--examples_per_class', '2', '--batch', '32',
      '--total_steps', '2', '--no-save', *TINY, '--resize_size', '20',
      '--crop_size', '16']))
  assert result['n'] == 797
  assert not (tmp_path / 'digits' / 'model.npz').exists()
  assert not (tmp_path / 'digits' / train.CHECKPOINT).exists()
  config = json.loads((tmp_path / 'digits' / 'config.json').read_text())
  assert config['dataset_size'] == 20 and len(config['classes']) == 10


def test_validate_checkpoint_and_npz_agree_with_training(folder, npz,
                                                         tmp_path, capsys):
  from bit_pytorch import validate
  result = run_main(flags(folder, npz, tmp_path, 'v', '--batch', '8',
                          '--total_steps', '3', '--base_lr', '0.3'))
  for ckpt in (train.CHECKPOINT, 'model.npz'):
    args = validate.argparser().parse_args([
        '--ckpt_path', str(tmp_path / 'v' / ckpt), '--dataset', 'imagefolder',
        '--datadir', folder, '--crop_size', '32', '--workers', '0',
        '--batch_eval', '4'])
    got = validate.main(args)
    assert got['n'] == result['n'] == 15
    assert got['top1'] == result['top1']
    assert got['loss'] == pytest.approx(result['loss'], rel=1e-5)
  with pytest.raises(SystemExit) as e:
    validate.cli(['--ckpt_path', npz, '--dataset', 'imagefolder',
                  '--datadir', folder])
  assert e.value.code == 2 and '10-class head' in capsys.readouterr().err


def test_torchvision_datasets_are_wrapped_from_their_data(monkeypatch,
                                                          tmp_path):
  """cifar10 and oxford_iiit_pet through stand-ins for torchvision's classes
  (no download): classes, sizes and splits come from the data."""
  from torchvision import datasets
  folder = write_imagefolder(tmp_path / 'pets', train=3, val=2,
                             size=(120, 100))
  files = {s: bit_common.scan_imagefolder(folder)[1 if s == 'trainval' else 2]
           for s in ('trainval', 'test')}
  calls = []

  class FakeCifar:
    classes = ['a', 'b']

    def __init__(self, root, train, download):
      calls.append((root, train, download))
      n = 6 if train else 4
      self.data = np.zeros((n, 32, 32, 3), np.uint8)
      self.targets = [i % 2 for i in range(n)]

  class FakePets:
    classes = ['cat', 'dog', 'owl']

    def __init__(self, root, split, download):
      calls.append((root, split, download))
      self._images, self._labels = files[split].paths, list(
          files[split].labels)

  monkeypatch.setattr(datasets, 'CIFAR10', FakeCifar)
  monkeypatch.setattr(datasets, 'OxfordIIITPet', FakePets)
  args = types.SimpleNamespace(dataset='cifar10', datadir=str(tmp_path),
                               skip_bad_images=False)
  cifar = bit_data.load(args, None)
  assert cifar.classes == ['a', 'b'] and cifar.original_hw == (32, 32)
  assert len(cifar.train) == 6 and len(cifar.val) == 4
  args.dataset = 'oxford_iiit_pet'
  pets = bit_data.load(args, None)
  assert len(pets.train) == 9 and len(pets.val) == 6
  assert pets.original_hw == (120, 100)
  assert pets.train.load(0).size == (100, 120)
  assert calls == [(str(tmp_path), True, True), (str(tmp_path), False, True),
                   (str(tmp_path), 'trainval', True),
                   (str(tmp_path), 'test', True)]
