"""big_transfer.loader (JAX's input pipeline, no TensorFlow), with the
scaling and mixup of JAX's compiled step (bit_jax.engine.train_images),
against PyTorch's DataLoader path (bit_pytorch.data and engine.mixed): the
same pixels, labels and mixup for training, evaluation and the Inception crop,
from any start step and on any share of the batch; bad images named."""
import argparse
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import jax
from big_transfer import datasets, datastream, errors, loader, preprocess
from bit_jax import engine as jax_engine
from bit_pytorch import data as torch_data
from bit_pytorch import engine
from conftest import REPO, write_imagefolder

CLASSES = 3


@pytest.fixture(scope='module')
def source(tmp_path_factory):
  """A folder of images of several sizes (so the resize is real)."""
  root = tmp_path_factory.mktemp('loader')
  rng = np.random.default_rng(0)
  for split, n in (('train', 6), ('val', 4)):
    for c in range(CLASSES):
      os.makedirs(root / split / f'c{c}')
      for i in range(n):
        h, w = rng.integers(20, 40, 2)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(
            root / split / f'c{c}' / f'{i}.png')
  return datasets.load(argparse.Namespace(dataset='imagefolder',
                                          datadir=str(root)))


def pytorchs_batch(data, stream, step, lo, hi, resize, crop, crop_scale=None):
  """PyTorch's images (NHWC) and soft labels of rows [lo, hi) of `step`."""
  rows, partner = stream.rows(lo, hi)
  views = torch_data.TrainSet(data.train, resize, crop, crop_scale)
  idx, seeds = stream.indices(step), stream.aug_seeds(step)
  x, y = torch.utils.data.default_collate(
      [views[(int(idx[p]), int(seeds[p]))] for p in rows])
  (x, y, y2, lam), = engine.mixed([(x, y)], [(rows, partner)],
                                  stream.lam(step), 'cpu')
  eye = np.eye(CLASSES, dtype=np.float32)
  return (x.permute(0, 2, 3, 1).numpy(),
          lam * eye[y.numpy()] + (1 - lam) * eye[y2.numpy()])


@pytest.mark.parametrize('processes', [1, 2])
def test_training_batches_are_pytorchs(source, processes):
  stream = datastream.Stream(len(source.train), 6, seed=4, mixup_alpha=0.5)
  local = stream.batch // processes
  for pid in range(processes):
    batches = loader.train_batches(source.train, CLASSES, stream, 24, 16,
                                   start_step=3, process_index=pid,
                                   process_count=processes, workers=2)
    for step in (3, 4, 5):
      got = next(batches)
      want_x, want_y = pytorchs_batch(source, stream, step, pid * local,
                                      (pid + 1) * local, 24, 16)
      # uint8 from the host, scaled and mixed in JAX's compiled step
      assert got['image'].shape == got['partner'].shape == (local, 16, 16, 3)
      assert got['image'].dtype == got['partner'].dtype == np.uint8
      x = jax.jit(jax_engine.train_images)(got)
      np.testing.assert_allclose(x, want_x, rtol=0, atol=1e-6)
      np.testing.assert_allclose(got['label'], want_y, rtol=0, atol=1e-6)
  assert 0 < stream.lam(3) < 1  # the batches were mixed


def test_a_resumed_start_gives_the_same_batches(source):
  stream = datastream.Stream(len(source.train), 4, seed=1, mixup_alpha=0.2)
  whole = loader.train_batches(source.train, CLASSES, stream, 24, 16,
                               workers=1)
  first = [next(whole) for _ in range(5)]
  resumed = loader.train_batches(source.train, CLASSES, stream, 24, 16,
                                 start_step=3, workers=2)
  for want in first[3:]:
    got = next(resumed)
    assert sorted(got) == ['image', 'label', 'mix', 'partner']
    for key in got:
      np.testing.assert_array_equal(got[key], want[key])


def test_inception_views_are_pytorchs(source):
  stream = datastream.Stream(len(source.train), 6, seed=2)
  got = next(loader.train_batches(source.train, CLASSES, stream, None, 12,
                                  crop_scale=(0.1, 1.0), workers=2))
  want_x, _ = pytorchs_batch(source, stream, 0, 0, 6, None, 12, (0.1, 1.0))
  assert sorted(got) == ['image', 'label']  # no mixup, nothing to mix
  np.testing.assert_allclose(jax_engine.train_images(got), want_x, rtol=0,
                             atol=1e-6)


def test_decode_gives_rgb_of_every_mode(tmp_path):
  """datasets.decode returns an RGB file's image itself, closed: the views
  still work on it, multi-frame files (a phone's MPO) included."""
  rng = np.random.default_rng(0)
  rgb = Image.fromarray(rng.integers(0, 256, (12, 10, 3), np.uint8))
  for name, image in (('l.png', rgb.convert('L')), ('p.gif', rgb.convert('P')),
                      ('rgba.png', rgb.convert('RGBA')),
                      ('cmyk.jpg', rgb.convert('CMYK')), ('rgb.png', rgb),
                      ('rgb.mpo', rgb)):
    frames = {'save_all': True, 'append_images': [rgb]} if 'mpo' in name else {}
    image.save(tmp_path / name, **frames)
    with Image.open(tmp_path / name) as want:
      want = np.asarray(want.convert('RGB'))
    got = datasets.decode(tmp_path / name)
    assert got.mode == 'RGB', name
    np.testing.assert_array_equal(np.asarray(got), want)
    assert preprocess.train_view(got, 0, 12, 8).shape == (8, 8, 3)
  # 16-bit grey (PIL's I;16): each value's high byte, not clipped at 255.
  grey = np.array([[0, 255, 256, 1000, 30000, 65535]] * 2, np.uint16)
  Image.fromarray(grey).save(tmp_path / 'grey16.png')
  got = np.asarray(datasets.decode(tmp_path / 'grey16.png'))
  want = [[0, 0, 1, 3, 117, 255]] * 2
  for channel in range(3):
    np.testing.assert_array_equal(got[..., channel], want)


def test_heif_photos_are_decoded_in_the_loaders_own_processes(tmp_path):
  """grain's workers are spawned: each registers pillow-heif's reader where
  it decodes, and gives the pixels that PyTorch's path gives here."""
  pytest.importorskip('pillow_heif')
  assert datasets.heif_readable()  # here, to write them
  rng = np.random.default_rng(3)
  for split in ('train', 'val'):
    for c in range(CLASSES):
      os.makedirs(tmp_path / split / f'c{c}')
      for i in range(2):
        Image.new('RGB', tuple(int(v) for v in rng.integers(20, 40, 2)),
                  tuple(int(v) for v in rng.integers(0, 256, 3))).save(
                      tmp_path / split / f'c{c}' / f'{i}.heic', format='HEIF')
  data = datasets.load(argparse.Namespace(dataset='imagefolder',
                                          datadir=str(tmp_path)))
  assert all(p.endswith('.heic') for p in data.train.paths)
  stream = datastream.Stream(len(data.train), 6, seed=0, mixup_alpha=0.5)
  got = next(loader.train_batches(data.train, CLASSES, stream, 24, 16,
                                  workers=1))
  want_x, _ = pytorchs_batch(data, stream, 0, 0, 6, 24, 16)
  np.testing.assert_allclose(jax_engine.train_images(got), want_x, rtol=0,
                             atol=1e-6)


def test_a_photo_is_decoded_upright(tmp_path):
  """An image stored turned or mirrored, with the EXIF Orientation tag that
  tells a viewer how to show it (2 to 8), decodes as shown: the same pixels
  as the upright image, built here with numpy from the tag's definition;
  its size, read for the HyperRule, is the upright one too, read from the
  header alone (a PNG without EXIF whose pixels are cut off gives it)."""
  upright = np.random.default_rng(0).integers(0, 256, (12, 8, 3), np.uint8)
  stored = {1: upright, 2: np.fliplr(upright), 3: np.rot90(upright, 2),
            4: np.flipud(upright), 5: upright.transpose(1, 0, 2),
            6: np.rot90(upright, 1), 7: np.rot90(upright, 2).transpose(1, 0, 2),
            8: np.rot90(upright, -1)}
  for orientation, pixels in stored.items():
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f'{orientation}.png'
    Image.fromarray(np.ascontiguousarray(pixels)).save(path, exif=exif)
    np.testing.assert_array_equal(np.asarray(datasets.decode(path)), upright,
                                  err_msg=f'orientation {orientation}')
    assert datasets.image_sizes([str(path)]) == [(12, 8)], orientation
  plain = tmp_path / 'plain.png'  # no EXIF, its pixels cut off
  Image.fromarray(upright).save(plain)
  plain.write_bytes(plain.read_bytes()[:plain.read_bytes().index(b'IDAT') + 24])
  assert datasets.image_sizes([str(plain)]) == [(12, 8)]


@pytest.mark.parametrize('processes', [1, 2])
def test_evaluation_covers_the_split_once_in_order(source, processes):
  views = torch_data.EvalSet(source.val, 16)
  want = np.stack([views[i][0].permute(1, 2, 0).numpy()
                   for i in range(len(source.val))])
  seen = {}
  counts = []
  for pid in range(processes):
    batches = list(loader.eval_batches(source.val, 4, 16, pid, processes,
                                       workers=2))
    counts.append(len(batches))
    rows = range(pid, len(source.val), processes)
    images = np.concatenate([b['image'] for b in batches])
    labels = np.concatenate([b['label'] for b in batches])
    mask = np.concatenate([b['mask'] for b in batches])
    assert mask.sum() == len(rows) and not mask[len(rows):].any()
    for r, i in enumerate(rows):
      seen[i] = True
      np.testing.assert_array_equal(images[r], want[i])
      assert labels[r] == source.val.labels[i]
  assert len(seen) == len(source.val) and len(set(counts)) == 1


def test_an_unreadable_image_is_named(tmp_path):
  root = write_imagefolder(tmp_path / 'f', train=2, val=1)
  bad = os.path.join(root, 'train', 'cat', '001.png')
  with open(bad, 'r+b') as f:  # a header that reads, pixels that do not
    f.truncate(60)
  data = datasets.load(argparse.Namespace(dataset='imagefolder',
                                          datadir=root))
  stream = datastream.Stream(len(data.train), 6)
  with pytest.raises(errors.BadInput, match='001.png'):
    next(loader.train_batches(data.train, 3, stream, 24, 16, workers=2))


@pytest.mark.slow
def test_jax_fine_tunes_without_tensorflow_or_torch(tmp_path):
  """bit_jax.train to its results with TensorFlow and PyTorch hidden, as on
  a machine with only the jax extra installed."""
  folder = write_imagefolder(tmp_path / 'images', train=4, val=2)
  cmd = [sys.executable, os.path.join(REPO, 'tests', 'without.py'),
         'tensorflow,torch,torchvision', '-m', 'bit_jax.train',
         '--name', 'run', '--logdir', str(tmp_path), '--dataset',
         'imagefolder', '--datadir', folder, '--model',
         'BiT-R14x0.5-FashionMNIST', '--batch', '6', '--total_steps', '3',
         '--crop_size', '32', '--workers', '2']
  done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True,
                        timeout=600)
  assert done.returncode == 0, done.stderr[-2000:]
  assert (tmp_path / 'run' / 'results.json').exists()
  assert (tmp_path / 'run' / 'model.npz').exists()


def test_workers_leave_the_main_module_alone(tmp_path):
  """A worker is a spawned process, which ran its parent's main module
  again first: the trainer's (bit_tf2.train's TensorFlow made each worker
  840 MB instead of 240). Here the main module is a script that marks each
  run of itself; only its own process runs it, and a class it defines
  still reaches the workers (by value)."""
  root = write_imagefolder(tmp_path / 'f', train=2, val=1)
  marks = tmp_path / 'marks'
  marks.mkdir()
  script = tmp_path / 'main.py'
  script.write_text(f'''
import os
open(os.path.join({str(marks)!r}, str(os.getpid())), 'w').close()
import argparse
from big_transfer import datasets, datastream, loader


class Relabelled:
  def __init__(self, source):
    self.source = source

  def example(self, i):
    return self.source.example(i)[0], 2


if __name__ == '__main__':
  data = datasets.load(argparse.Namespace(dataset='imagefolder',
                                          datadir={root!r}))
  batches = loader.train_batches(Relabelled(data.train), 3, datastream.Stream(
      len(data.train), 6), 24, 16, workers=2)
  print(next(batches)['label'].argmax(1).tolist(), flush=True)
  batches.close()
''')
  done = subprocess.run([sys.executable, str(script)], capture_output=True,
                        text=True, timeout=300,
                        env=dict(os.environ, PYTHONPATH=REPO))
  assert done.returncode == 0, done.stderr[-2000:]
  assert done.stdout.split('\n')[-2] == str([2] * 6)
  assert len(list(marks.iterdir())) == 1


def test_workers_end_when_the_process_that_started_them_is_killed(tmp_path):
  """A trainer killed outright (SIGKILL, as by the OOM killer) closes
  nothing; its loader's worker processes must end by themselves."""
  root = write_imagefolder(tmp_path / 'f', train=2, val=1)
  script = f'''
import argparse, multiprocessing, os, signal
from big_transfer import datasets, datastream, loader
data = datasets.load(argparse.Namespace(dataset='imagefolder',
                                        datadir={root!r}))
batches = loader.train_batches(data.train, 3, datastream.Stream(
    len(data.train), 6), 24, 16, workers=2)
next(batches)
print(' '.join(str(p.pid) for p in multiprocessing.active_children()),
      flush=True)
os.kill(os.getpid(), signal.SIGKILL)
'''
  out = tmp_path / 'out.txt'
  with open(out, 'w') as f:  # a file: workers left alive hold no pipe open
    done = subprocess.run([sys.executable, '-c', script], cwd=REPO,
                          stdout=f, stderr=subprocess.STDOUT, timeout=300)
  assert done.returncode == -9, out.read_text()
  workers = [int(p) for p in out.read_text().splitlines()[-1].split()]
  assert len(workers) == 2

  def alive(pid):
    try:
      with open(f'/proc/{pid}/stat') as f:
        return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
    except OSError:
      return False
  deadline = time.time() + 20
  while any(map(alive, workers)) and time.time() < deadline:
    time.sleep(0.2)
  left = [pid for pid in workers if alive(pid)]
  for pid in left:  # not to leave them running after a failure
    os.kill(pid, signal.SIGKILL)
  assert not left
