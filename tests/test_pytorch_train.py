"""What only the PyTorch backend has: torchvision's datasets, its data
workers' errors, bit_pytorch.validate on a training checkpoint; the
few-shot sampler. The contract of every trainer is in test_trainers.py."""
import contextlib
import json
import os
import subprocess
import sys
import types
from importlib import metadata

import numpy as np
import pytest
import torch

from big_transfer import datasets, errors, harness, zoo
import bit_common
from bit_pytorch import data as torch_data
from bit_pytorch import engine
from bit_pytorch import train
from conftest import REPO, truncate_image, write_imagefolder

TINY = ['--resize_size', '40', '--crop_size', '32', '--workers', '0',
        '--base_lr', '0.05']


def flags(folder, npz, logdir, name, *extra):
  return ['--name', name, '--logdir', str(logdir), '--model', npz,
          '--dataset', 'imagefolder', '--datadir', folder, *TINY, *extra]


def run_main(argv):
  return train.main(train.argparser().parse_args(argv))


def weights(logdir, name):
  return zoo.load_npz(os.path.join(logdir, name, 'model.npz'))


def assert_same_weights(a, b, atol=0.0):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=0, atol=atol, err_msg=k)


def cli_env():
  env = dict(os.environ)
  env.pop('WORLD_SIZE', None)
  return env


def run_cli(argv, launcher=(sys.executable, '-m', 'bit_pytorch.train'),
            **kw):
  return subprocess.run([*launcher, *argv], cwd=REPO, env=cli_env(),
                        capture_output=True, text=True, timeout=300, **kw)


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  return write_imagefolder(tmp_path_factory.mktemp('images'), train=8, val=5)


@pytest.fixture(scope='module')
def npz(tmp_path_factory):
  from conftest import synthetic_weights
  path = tmp_path_factory.mktemp('weights') / 'tiny.npz'
  np.savez(path, **synthetic_weights('R14x0.5', 10))
  return str(path)


def test_every_loaded_dataset_is_its_fewshot_subset():
  """datasets.load, which every trainer and distillation reads through,
  draws the --examples_per_class subset; the whole split's size stays."""
  full = datasets.load(types.SimpleNamespace(dataset='digits'))
  data = datasets.load(types.SimpleNamespace(
      dataset='digits', examples_per_class=3, examples_per_class_seed=1))
  chosen = datasets.fewshot_indices(full.train.labels, 3, 1)
  np.testing.assert_array_equal(data.train.labels, full.train.labels[chosen])
  np.testing.assert_array_equal(data.train.images, full.train.images[chosen])
  assert (len(data.train), data.full_train_size) == (30, 1000)
  assert data.describe()['train_size'] == 30 and len(data.val) == 797


def test_fewshot_subset_is_reproducible_and_balanced():
  labels = np.repeat(np.arange(4), [10, 7, 12, 9])
  source = datasets.Source(labels, images=np.zeros((len(labels), 2, 2, 3),
                                                   np.uint8))

  def draw(k, seed):
    args = types.SimpleNamespace(examples_per_class=k,
                                 examples_per_class_seed=seed)
    return datasets.fewshot(source, args).labels, datasets.fewshot_indices(
        labels, k, seed)

  (l1, i1), (l2, i2), (_, i3) = draw(5, 1), draw(5, 1), draw(5, 2)
  np.testing.assert_array_equal(i1, i2)
  np.testing.assert_array_equal(l1, l2)
  assert not np.array_equal(i1, i3)
  np.testing.assert_array_equal(np.bincount(l1), [5, 5, 5, 5])
  np.testing.assert_array_equal(labels[i1], l1)
  with pytest.raises(errors.BadInput, match='class 1 has only 7'):
    draw(8, 0)


def test_truncated_image_found_by_a_worker_is_named(npz, tmp_path):
  folder = write_imagefolder(tmp_path / 'images', train=4, val=2)
  path = os.path.join(folder, 'val', 'cat', '000.png')
  truncate_image(path)
  # In a fresh process: data workers fork, which is unsafe once JAX or TF
  # (imported by other tests in this process) have started their threads.
  out = run_cli(flags(folder, npz, tmp_path, 'trunc', '--batch', '4',
                      '--total_steps', '1', '--workers', '1'))
  assert out.returncode == 2, out.stderr
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith('error: cannot read image') and '000.png' in last


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
  (no download; pets in torchvision's folder layout, with the dataset's
  annotation lists): classes, sizes and splits come from the data."""
  from PIL import Image
  from torchvision import datasets
  pets = tmp_path / 'oxford-iiit-pet'
  os.makedirs(pets / 'images')
  os.makedirs(pets / 'annotations')
  rng = np.random.default_rng(0)
  for split, n in (('trainval', 9), ('test', 6)):
    lines = []
    for i in range(n):
      name = f'{split}_{i}'
      Image.fromarray(rng.integers(0, 255, (120, 100, 3), np.uint8)).save(
          pets / 'images' / f'{name}.jpg')
      lines.append(f'{name} {i % 3 + 1} 1 {i}')
    (pets / 'annotations' / f'{split}.txt').write_text('\n'.join(lines))
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

  monkeypatch.setattr(datasets, 'CIFAR10', FakeCifar)
  monkeypatch.setattr(datasets, 'OxfordIIITPet', FakePets)
  args = types.SimpleNamespace(dataset='cifar10', datadir=str(tmp_path),
                               skip_bad_images=False)
  cifar = torch_data.load(args, None)
  assert cifar.classes == ['a', 'b'] and cifar.original_hw == (32, 32)
  assert len(cifar.train) == 6 and len(cifar.val) == 4
  args.dataset = 'oxford_iiit_pet'
  pets = torch_data.load(args, None)
  assert len(pets.train) == 9 and len(pets.val) == 6
  assert pets.train.labels.tolist() == [i % 3 for i in range(9)]
  assert pets.original_hw == (120, 100)
  assert pets.train.load(0).size == (100, 120)
  assert calls == [(str(tmp_path), True, True), (str(tmp_path), False, True),
                   (str(tmp_path), 'trainval', True),
                   (str(tmp_path), 'test', True)]


def test_a_failed_download_is_one_line_and_leaves_no_folder_it_made(
    monkeypatch, tmp_path):
  from torchvision import datasets as tv_datasets

  class Offline:
    def __init__(self, root, train, download):
      del train, download
      os.makedirs(root, exist_ok=True)  # as torchvision does, then fails
      (tmp_path / root / 'cifar-10-python.tar.gz').write_bytes(b'part')
      raise RuntimeError('<urlopen error [Errno -2] Name or service not '
                         'known>')

  monkeypatch.setattr(tv_datasets, 'CIFAR10', Offline)
  monkeypatch.chdir(tmp_path)
  args = types.SimpleNamespace(dataset='cifar10', datadir=None,
                               skip_bad_images=False)
  with pytest.raises(errors.BadInput, match=r'could not get cifar10 into '
                     r'data/cifar10 \(<urlopen.*check the network'):
    torch_data.load(args, None)
  assert not (tmp_path / 'data').exists()
  mine = tmp_path / 'mine'  # a --datadir that was there is left as it was
  mine.mkdir()
  args.datadir = str(mine)
  with pytest.raises(errors.BadInput, match='could not get cifar10'):
    torch_data.load(args, None)
  assert os.listdir(mine) == ['cifar-10-python.tar.gz']


def test_world_size_without_local_rank_is_one_line(tmp_path, monkeypatch,
                                                   capsys):
  monkeypatch.setenv('WORLD_SIZE', '2')
  monkeypatch.delenv('LOCAL_RANK', raising=False)
  with pytest.raises(SystemExit) as e:
    train.cli(['--name', 'x', '--logdir', str(tmp_path), '--model',
               'BiT-R14x0.5-FashionMNIST', '--dataset', 'digits'])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1].startswith('error: WORLD_SIZE is 2 but LOCAL_RANK')


def test_compiled_by_default_on_a_gpu_for_runs_that_repay_it():
  cuda, cpu = torch.device('cuda'), torch.device('cpu')
  long_run, short_run = (engine.COMPILE_MIN_STEPS,
                         engine.COMPILE_MIN_STEPS - 1)
  assert engine.compiles(None, cuda, long_run)
  assert not engine.compiles(None, cuda, short_run)
  assert not engine.compiles(None, cpu, long_run)
  # --compile and --no-compile win over the default.
  assert engine.compiles(True, cpu, 1) and not engine.compiles(False, cuda,
                                                               long_run)
  parse = train.argparser().parse_args
  base = ['--name', 'x', '--logdir', '.', '--model', 'BiT-M-R50x1',
          '--dataset', 'cifar10']
  assert [parse(base + extra).compile
          for extra in ([], ['--compile'], ['--no-compile'])] == [None, True,
                                                                   False]


def test_a_compiled_evaluation_meets_one_shape():
  """engine.evaluate(pad=True), as a compiled run evaluates: the last,
  smaller batch padded to the loader's size, so torch.compile traces the
  network once, not again for that batch; the sums are the unpadded
  evaluation's."""
  from bit_pytorch import models  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  net = models.create('R14x0.5', head_size=3)
  images = torch.randint(0, 256, (7, 3, 16, 16), dtype=torch.uint8)
  loader = torch.utils.data.DataLoader(
      torch.utils.data.TensorDataset(images, torch.tensor([0, 1, 2] * 2 + [1])),
      batch_size=3)  # batches of 3, 3 and 1
  cpu, loss = torch.device('cpu'), torch.nn.functional.cross_entropy
  want = engine.evaluate(net, loader, cpu, contextlib.nullcontext(), loss)
  for pad, traced in ((True, [3]), (False, [3, 1])):
    torch._dynamo.reset()  # pylint: disable=protected-access
    batches = []  # the batch size of each trace

    def backend(graph, inputs, batches=batches):
      batches.extend(int(x.shape[0]) for x in inputs
                     if tuple(x.shape[1:]) == (3, 16, 16))
      return graph.forward
    got = engine.evaluate(torch.compile(net, backend=backend), loader, cpu,
                          contextlib.nullcontext(), loss, pad=pad)
    assert batches == traced, pad
    np.testing.assert_allclose(got, want, rtol=1e-6)
  assert want[3] == 7 and net.training


def test_bad_input_is_refused_before_torchvision_is_imported(tmp_path,
                                                            monkeypatch):
  """A command with bad input fails at once: nothing imports torchvision
  (over a second, with torch._dynamo) before the data is read, and the
  run records torchvision's version from its installed distribution."""
  done = subprocess.run(
      [sys.executable, '-X', 'importtime', '-m', 'bit_pytorch.train',
       '--name', 'x', '--logdir', str(tmp_path), '--dataset', 'imagefolder',
       '--datadir', str(tmp_path / 'missing')], cwd=REPO, capture_output=True,
      text=True, timeout=300)
  assert done.returncode == 2, done.stderr[-2000:]
  lines = done.stderr.splitlines()
  said = [line for line in lines if not line.startswith('import time:')]
  assert said[-1] == f'error: --datadir {tmp_path / "missing"} is not a folder.'
  imported = {line.rsplit('|', 1)[1].strip() for line in lines
              if line.startswith('import time:')}
  assert {'torch', 'bit_pytorch.models'} <= imported
  assert not imported & {'torchvision', 'torch._dynamo'}, imported
  monkeypatch.delitem(sys.modules, 'torchvision')  # as in the command
  recorded = harness.versions('torch', 'torchvision', 'no_such_package')
  assert recorded['torch'] == torch.__version__  # imported: its own string
  assert recorded['torchvision'] == metadata.version('torchvision')
  assert recorded['no_such_package'] == '?'


WORKERS_BESIDE_JAX = '''
import argparse, sys, warnings
import numpy as np
import torch
import jax, jax.numpy as jnp
jnp.ones(4).block_until_ready()  # JAX's runtime and its threads are up
from big_transfer import datasets
from bit_pytorch import data as torch_data, engine
warnings.simplefilter('error')  # "os.fork() was called ... deadlock"
images = np.arange(4 * 8 * 8 * 3, dtype=np.uint8).reshape(4, 8, 8, 3)
source = datasets.Source(np.arange(4), images=images)
loader = engine.loader(torch_data.EvalSet(source, 8),
                       argparse.Namespace(workers=1), torch.device('cpu'),
                       batch_size=2)
got = torch.cat([x for x, _ in loader]).permute(0, 2, 3, 1).numpy()
assert (got == images).all()
print(loader.multiprocessing_context.get_start_method())
'''


def test_data_workers_beside_jax_do_not_fork_its_threads():
  """In a process where JAX (or TensorFlow) runs too, as in a notebook
  with two backends, forking it for data workers risks a child that
  inherits a held lock; JAX warns that it will likely deadlock. The
  workers then come from a fork server, and load the same images."""
  done = subprocess.run([sys.executable, '-c', WORKERS_BESIDE_JAX], cwd=REPO,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.split() == ['forkserver']


@pytest.mark.parametrize('command', ['distill', 'pretrain'])
def test_recipes_start_torchrun_on_several_gpus(command, tmp_path,
                                                monkeypatch, capsys):
  """As fine-tuning (tests/test_commands.py): with two GPUs and no
  WORLD_SIZE the command becomes torchrun, one process per GPU, with the
  user's flags; a batch that two GPUs cannot share is refused first."""
  import importlib  # pylint: disable=import-outside-toplevel
  import yaml  # pylint: disable=import-outside-toplevel
  module = importlib.import_module(f'bit_pytorch.{command}')
  recipe = tmp_path / 'recipe.yaml'
  values = dict(dataset='digits', batch=8, steps=2)
  values.update(dict(teacher=str(tmp_path / 'teacher.npz'), student='R14x0.5')
                if command == 'distill' else dict(model='R14x0.5'))
  (tmp_path / 'teacher.npz').touch()
  recipe.write_text(yaml.safe_dump(values))
  monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
  monkeypatch.delenv('WORLD_SIZE', raising=False)
  started = []

  def execv(path, argv):
    started.append([path, *argv])
    raise SystemExit(0)
  monkeypatch.setattr(os, 'execv', execv)
  flags = ['--recipe', str(recipe), '--name', 'x', '--logdir',
           str(tmp_path / 'runs')]
  with pytest.raises(SystemExit):
    module.cli(flags)
  assert started == [[sys.executable, sys.executable, '-m',
                      'torch.distributed.run', '--standalone',
                      '--nproc_per_node=2', '-m', f'bit_pytorch.{command}',
                      *flags]]
  with pytest.raises(SystemExit) as e:
    module.cli(flags + ['--set', 'batch=9'])
  assert e.value.code == 2 and len(started) == 1
  assert 'batch 9 is not divisible by --batch_split 1 times 2 device' in (
      capsys.readouterr().err)
  assert not (tmp_path / 'runs').exists()
