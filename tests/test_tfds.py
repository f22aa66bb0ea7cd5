"""tfds:NAME and vtab:TASK (big_transfer.tfds_reader) and the validation commands.

Every dataset here is made by the test itself: small TFDS builders prepared
into a temporary data_dir (nothing is downloaded). The VTAB-1k checks use
stand-ins of the real TFDS builders (same features, made-up examples) and
compare with the published definitions of google-research/task_adaptation.
"""
import argparse
import functools
import hashlib
import http.server
import io
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from big_transfer import datasets, errors, tfds_reader, vtab, zoo
from conftest import REPO, synthetic_weights, write_imagefolder

tfds = pytest.importorskip('tensorflow_datasets')

CLASSES = ['ant', 'bee', 'cat', 'dog']
SPLIT_SIZES = {'train': 40, 'validation': 12, 'test': 8}


def _pixels(i, shape):
  """An image that carries its example number i in pixel (0, 0)."""
  rng = np.random.default_rng(i)
  img = rng.integers(0, 256, shape, dtype=np.uint8)
  img[0, 0, :2] = (i // 256, i % 256)
  return img


def _number(image):
  return int(image[0, 0, 0]) * 256 + int(image[0, 0, 1])


class BitTfdsToy(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Images of a few sizes with a class label; train/validation/test."""
  VERSION = tfds.core.Version('1.0.0')
  splits = SPLIT_SIZES
  square = None  # a fixed image side, or sizes that vary

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3)),
            'label': tfds.features.ClassLabel(names=CLASSES),
            'number': tfds.features.Tensor(shape=(), dtype=np.int64)}),
        supervised_keys=('image', 'label'))

  def _split_generators(self, dl_manager):
    return {name: self._generate_examples(name, n)
            for name, n in self.splits.items()}

  def _generate_examples(self, split, n):
    offset = 1000 * list(self.splits).index(split)
    for i in range(n):
      shape = ((self.square, self.square, 3) if self.square else
               (20 + i % 3, 24, 3))
      yield i, {'image': _pixels(offset + i, shape),
                'label': (i * 7 + offset) % len(CLASSES),
                'number': offset + i}


class BitTfdsNoLabel(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """An image and an integer target, but no class label."""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(8, 8, 3)),
            'target': tfds.features.Tensor(shape=(), dtype=np.int64)}))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(4)}

  def _generate_examples(self, n):
    for i in range(n):
      yield i, {'image': _pixels(i, (8, 8, 3)), 'target': i}


def _prepare(cls, data_dir, file_format='array_record'):
  builder = cls(data_dir=str(data_dir), file_format=file_format)
  builder.download_and_prepare()
  return builder


@pytest.fixture(scope='module')
def toy_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp('tfds')
  _prepare(BitTfdsToy, data_dir)
  _prepare(BitTfdsNoLabel, data_dir)
  return str(data_dir)


def _decoded(split, i):
  """Image i of `split` as every backend reads it (uint8 [h, w, 3])."""
  return np.asarray(datasets.decode(io.BytesIO(split[i][0])))


def _numbers(split):
  return [_number(np.asarray(datasets.decode(io.BytesIO(e))))
          for e in split.encoded]


def _reference(data_dir, name, spec):
  """(numbers, labels, images) of `spec` as TFDS itself reads and decodes
  them (array_record files are read through its data source only: TFDS's
  as_dataset refuses them)."""
  source = tfds.builder(name, data_dir=data_dir).as_data_source(split=spec)
  rows = [source[i] for i in range(len(source))]
  return ([int(r['number']) for r in rows], [int(r['label']) for r in rows],
          [r['image'] for r in rows])


# --------------------------------------------------------------------------
# tfds:NAME

def test_tfds_dataset_by_name(toy_dir):
  data = tfds_reader.resolve('tfds:bit_tfds_toy', toy_dir)
  assert (data.image_key, data.label_key) == ('image', 'label')
  assert data.classes == CLASSES
  assert (data.train_split, data.eval_split) == ('train', 'validation')
  assert (data.train_size, data.eval_size) == (40, 12)
  assert data.random_access
  # The image feature has no fixed size: the median of the images' sizes.
  assert tuple(data.original_hw) == (21, 24)
  for split, spec in (('train', 'train'), ('eval', 'validation')):
    got = data.read(split)
    numbers, labels, images = _reference(toy_dir, 'bit_tfds_toy', spec)
    assert _numbers(got) == numbers
    np.testing.assert_array_equal(got.labels, labels)
    assert got.labels.dtype == np.int64
    for i in (0, 5, len(got) - 1):
      np.testing.assert_array_equal(_decoded(got, i), images[i])
      assert got[i][1] == labels[i]


def test_a_published_dataset_finds_its_download_checksums():
  """What TFDS reads before it downloads a dataset (--dataset cifar10 in JAX
  and TF2): its builder's code and checksums. TFDS 4.9.10 needs
  importlib_resources there without requiring it (tensorflow/datasets#11212),
  so the install brings it."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  urls = tfds.builder_cls('cifar10').url_infos
  assert any(url.endswith('cifar-10-binary.tar.gz') for url in urls)


def test_split_reads_lazily_and_pickles(toy_dir):
  """A Split sent to data-loader workers (pickled) reads its examples there."""
  import pickle  # pylint: disable=import-outside-toplevel
  data = tfds_reader.resolve('tfds:bit_tfds_toy', toy_dir, train_split='train')
  lazy = data.read('train').subset([7, 2, 30])
  copy = pickle.loads(pickle.dumps(lazy))
  full = data.read('train')
  for j, i in enumerate([7, 2, 30]):
    assert copy[j] == lazy[j] == (full.encoded[i], int(full.labels[i]))


def test_labels_keep_no_images(toy_dir):
  """The labels of an array_record split are read without keeping its
  images, so a split larger than memory stays on disk, and the Source that
  data-loader workers receive (pickled) holds no images; they come with
  `encoded` alone."""
  import pickle  # pylint: disable=import-outside-toplevel
  split = tfds_reader.resolve('tfds:bit_tfds_toy', toy_dir).read('train')
  numbers, labels, _ = _reference(toy_dir, 'bit_tfds_toy', 'train')
  np.testing.assert_array_equal(split.labels, labels)
  sent = len(pickle.dumps(datasets.Source(split=split)))
  images = sum(len(e) for e in tfds_reader.resolve(
      'tfds:bit_tfds_toy', toy_dir).read('train').encoded)
  assert sent < images / 4, (sent, images)
  subset = split.subset([3, 1])
  np.testing.assert_array_equal(subset.labels, [labels[3], labels[1]])
  assert [_number(_decoded(subset, j)) for j in (0, 1)] == [numbers[3],
                                                         numbers[1]]


def test_a_splits_labels_are_read_once_then_from_the_cache(tmp_path,
                                                          monkeypatch):
  """The labels of a whole split are kept in the cache once read: the next
  run reads no record for them. Another split has its own (the key also
  holds the dataset's name, its label and big_transfer/vtab.py); a dataset
  prepared again is read again, and a damaged file is replaced."""
  monkeypatch.setenv('BIT_CACHE', str(tmp_path / 'cache'))
  _prepare(BitTfdsToy, tmp_path / 'data')
  data_dir = str(tmp_path / 'data')
  _, want, _ = _reference(data_dir, 'bit_tfds_toy', 'train')
  np.testing.assert_array_equal(tfds_reader.resolve(
      'tfds:bit_tfds_toy', data_dir).read('train').labels, want)
  kept = list((tmp_path / 'cache' / 'tfds_labels').iterdir())
  assert len(kept) == 1
  read = tfds_reader.Split._chunk
  monkeypatch.setattr(tfds_reader.Split, '_chunk', lambda split, lo:
                      pytest.fail(f'labels of {split.spec} read again'))
  np.testing.assert_array_equal(tfds_reader.resolve(
      'tfds:bit_tfds_toy', data_dir).read('train').labels, want)
  for other in ({'train_split': 'train[:30]'}, {'train_split': 'test'}):
    with pytest.raises(pytest.fail.Exception, match='read again'):
      tfds_reader.resolve('tfds:bit_tfds_toy', data_dir,
                          **other).read('train').labels
  info = tmp_path / 'data' / 'bit_tfds_toy' / '1.0.0' / 'dataset_info.json'
  info.write_text(info.read_text() + '\n')  # as if prepared again
  with pytest.raises(pytest.fail.Exception, match='read again'):
    tfds_reader.resolve('tfds:bit_tfds_toy', data_dir).read('train').labels
  monkeypatch.setattr(tfds_reader.Split, '_chunk', read)
  info.write_text(info.read_text()[:-1])
  for damage in (b'damaged', b''):  # read again, and kept anew
    kept[0].write_bytes(damage)
    np.testing.assert_array_equal(tfds_reader.resolve(
        'tfds:bit_tfds_toy', data_dir).read('train').labels, want)
    assert np.array_equal(np.load(kept[0]), want)


def test_tfds_reader_needs_no_tensorflow(toy_dir):
  """What PyTorch reads: the prepared files through TFDS's data source, in a
  process where TensorFlow cannot be imported; the same examples as here."""
  code = (
      'import sys\n'
      # TensorFlow as if it were not installed: no finder finds it.
      'class Hide:\n'
      '  def __init__(self, inner): self.inner = inner\n'
      '  def find_spec(self, name, path=None, target=None):\n'
      '    if name.split(".")[0] == "tensorflow": return None\n'
      '    return self.inner.find_spec(name, path, target)\n'
      'sys.meta_path[:] = [Hide(f) if hasattr(f, "find_spec") else f'
      ' for f in sys.meta_path]\n'
      'from big_transfer import tfds_reader\n'
      f'd = tfds_reader.resolve("tfds:bit_tfds_toy", {toy_dir!r},'
      ' train_split="train[5:9]+test[:2]")\n'
      's = d.read("train")\n'
      'print(repr((s.labels.tolist(), [len(e) for e in s.encoded])))\n'
      'assert "tensorflow" not in sys.modules, "TensorFlow was imported"\n')
  out = subprocess.run([sys.executable, '-c', code], cwd=REPO, check=True,
                       capture_output=True, text=True, timeout=120).stdout
  here = tfds_reader.resolve('tfds:bit_tfds_toy', toy_dir,
                          train_split='train[5:9]+test[:2]').read('train')
  assert out.strip() == repr((here.labels.tolist(),
                              [len(e) for e in here.encoded]))


def test_tfrecord_files_read_like_array_record(toy_dir, tmp_path):
  """Files prepared by plain `tfds build` (tfrecord) are read through
  as_dataset, and give the same examples."""
  _prepare(BitTfdsToy, tmp_path, file_format='tfrecord')
  old = tfds_reader.resolve('tfds:bit_tfds_toy', str(tmp_path),
                         eval_split='test')
  assert not old.random_access
  new = tfds_reader.resolve('tfds:bit_tfds_toy', toy_dir, eval_split='test')
  for split in ('train', 'eval'):
    a, b = old.read(split), new.read(split)
    assert _numbers(a) == _numbers(b)
    np.testing.assert_array_equal(a.labels, b.labels)


def test_a_whole_split_trains_without_reading_its_labels_ahead(
    toy_dir, tmp_path, monkeypatch):
  """A split's labels come with its examples: training on a whole split
  and evaluating read no pass over every label first (ImageNet's would
  read all 147 GB at every start), in the loaders of every backend and
  in PyTorch's trainer; the labels are the records' own."""
  from bit_pytorch import data as torch_data  # pylint: disable=import-outside-toplevel
  from bit_pytorch import train  # pylint: disable=import-outside-toplevel
  from big_transfer import datastream, loader  # pylint: disable=import-outside-toplevel
  args = argparse.Namespace(dataset='tfds:bit_tfds_toy', datadir=toy_dir,
                            eval_split='test', workers=0)
  whole = datasets.load(args)
  want = {'train': whole.train.labels, 'val': whole.val.labels}
  monkeypatch.setattr(tfds_reader.Split, 'labels', property(
      lambda split: pytest.fail(f'every label of {split.spec} was read')))
  data = datasets.load(args)
  assert (len(data.train), len(data.val)) == (40, 8)
  stream = datastream.Stream(len(data.train), 8, seed=1)
  batch = next(loader.train_batches(data.train, 4, stream, 24, 20,
                                    workers=0))
  np.testing.assert_array_equal(batch['label'].argmax(1),
                                want['train'][stream.indices(0)])
  got = [(b['label'][b['mask']]) for b in loader.eval_batches(
      data.val, 3, 20, workers=0)]
  np.testing.assert_array_equal(np.concatenate(got), want['val'])
  train_set = torch_data.TrainSet(data.train, 24, 20)
  assert [train_set[(i, 7)][1] for i in (0, 39)] == list(want['train'][[0, 39]])
  eval_set = torch_data.EvalSet(data.val, 20)
  assert [eval_set[i][1] for i in range(8)] == list(want['val'])
  npz = tmp_path / 'tiny.npz'
  np.savez(npz, **synthetic_weights('R14x0.5', 4))
  result = train.main(train.argparser().parse_args([
      '--name', 'whole', '--logdir', str(tmp_path), '--model', str(npz),
      '--dataset', 'tfds:bit_tfds_toy', '--datadir', toy_dir, '--eval_split',
      'test', '--batch', '8', '--total_steps', '2', '--resize_size', '24',
      '--crop_size', '20', '--workers', '0', '--no-hold_images']))
  assert result['step'] == 2 and result['n'] == 8


def _files(folder):
  return sorted(p.name for p in folder.iterdir() if p.is_file())


def test_tfrecord_too_large_for_memory_is_refused_with_the_fix(
    toy_dir, tmp_path, monkeypatch, capsys):
  """A tfrecord dataset is read whole, by every loader process: one that
  would not fit is refused at the start, naming the command that adds
  array_record files; after it, the same examples are read from disk, and
  the tfrecord files are still there."""
  builder = _prepare(BitTfdsToy, tmp_path, file_format='tfrecord')
  folder = builder.data_path
  before = _files(folder)
  stored = sum(int(builder.info.splits[s].num_bytes) for s in ('train', 'test'))
  # Fits once (2 x stored <= memory / 2), not in three processes: the
  # trainer and two --workers, or three trainers on this machine.
  monkeypatch.setattr(tfds_reader.hardware, 'memory_bytes',
                      lambda: 4 * stored)

  def load(workers):
    return datasets.load(argparse.Namespace(
        dataset='tfds:bit_tfds_toy', datadir=str(tmp_path),
        eval_split='test', workers=workers))
  assert len(load(0).train) == 40
  monkeypatch.setenv('LOCAL_WORLD_SIZE', '3')
  with pytest.raises(errors.BadInput, match='in 3 process'):
    load(0)
  monkeypatch.delenv('LOCAL_WORLD_SIZE')
  with pytest.raises(errors.BadInput, match='array_record') as refused:
    load(2)
  command = str(refused.value).split('(python -m big_transfer.tfds_reader ')[1]
  tfds_reader.main(command.split(',')[0].split())
  printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert printed['random_access'] and printed['train_size'] == 40
  after = tfds_reader.resolve('tfds:bit_tfds_toy', str(tmp_path),
                              eval_split='test', copies=3)
  assert after.random_access
  new = tfds_reader.resolve('tfds:bit_tfds_toy', toy_dir, eval_split='test')
  for split in ('train', 'eval'):
    a, b = after.read(split), new.read(split)
    assert _numbers(a) == _numbers(b)
    np.testing.assert_array_equal(a.labels, b.labels)
  assert set(before) < set(_files(folder))
  assert not tfds_reader.add_array_record(str(folder))


def test_interrupted_array_record_copy_leaves_the_dataset_as_it_was(
    tmp_path, monkeypatch):
  builder = _prepare(BitTfdsToy, tmp_path, file_format='tfrecord')
  folder = builder.data_path
  info = (folder / 'dataset_info.json').read_bytes()
  adapter = tfds.core.file_adapters.ArrayRecordFileAdapter
  write = adapter.write_examples
  calls = []

  def fail_second(path, iterator):
    calls.append(path)
    if len(calls) == 2:  # part of the shard written, then the failure
      write(path, itertools.islice(iterator, 3))
      raise OSError('disk gone')
    return write(path, iterator)

  monkeypatch.setattr(adapter, 'write_examples', fail_second)
  with pytest.raises(OSError, match='disk gone'):
    tfds_reader.add_array_record(str(folder))
  assert (folder / 'dataset_info.json').read_bytes() == info
  assert not tfds_reader.resolve('tfds:bit_tfds_toy', str(tmp_path),
                                 eval_split='test').random_access
  done = [n for n in _files(folder) if '.array_record-' in n]
  assert len(done) == 2 and sum(n.endswith('.incomplete') for n in done) == 1
  monkeypatch.setattr(adapter, 'write_examples', write)
  assert tfds_reader.add_array_record(str(folder))
  shards = [n for n in _files(folder) if '.array_record-' in n]
  assert len(shards) == 3 and not any(n.endswith('.incomplete')
                                      for n in shards)
  assert tfds_reader.resolve('tfds:bit_tfds_toy', str(tmp_path),
                             eval_split='test').random_access


@pytest.mark.parametrize('spec, expected', [
    ('train[:10]', [('train', 0, 10)]),
    ('train[10:20]+validation', [('train', 10, 20), ('validation', 0, 12)]),
    ('train[:25%]', [('train', 0, 10)]),
    ('train[-4:]+test[50%:]', [('train', 36, 40), ('test', 4, 8)]),
])
def test_split_syntax(toy_dir, spec, expected):
  data = tfds_reader.resolve('tfds:bit_tfds_toy', toy_dir, train_split=spec,
                          eval_split='test[:3]')
  # Which examples sit at which stored position is TFDS's business: ask it.
  full = {name: _reference(toy_dir, 'bit_tfds_toy', name)[0]
          for name in SPLIT_SIZES}
  want = [full[name][i] for name, lo, hi in expected for i in range(lo, hi)]
  got = data.read('train')
  assert data.train_size == len(got) == len(want)
  assert _numbers(got) == want
  assert _numbers(data.read('eval')) == full['test'][:3]


def test_default_eval_split_is_test_without_validation(tmp_path):
  class NoValidation(BitTfdsToy, skip_registration=True):
    name = 'bit_tfds_no_validation'
    splits = {'train': 8, 'test': 4}
  _prepare(NoValidation, tmp_path)
  data = tfds_reader.resolve('tfds:bit_tfds_no_validation', str(tmp_path))
  assert (data.eval_split, data.eval_size) == ('test', 4)


@pytest.mark.parametrize('kwargs, words', [
    (dict(dataset='tfds:bit_tfds_no_label'), 'class label'),
    (dict(dataset='tfds:bit_tfds_toy', train_split='trian'), 'trian'),
    (dict(dataset='tfds:bit_tfds_toy', eval_split='test[20:30]'),
     'test (8)'),
    (dict(dataset='tfds:no_such_dataset_anywhere'), 'no_such_dataset'),
    (dict(dataset='vtab:cifar10'), 'unknown VTAB-1k task'),
    (dict(dataset='tfds_dtd'), 'unknown dataset'),
])
def test_refused(toy_dir, kwargs, words):
  with pytest.raises(errors.BadInput) as e:
    tfds_reader.resolve(data_dir=toy_dir, prepare=False, **kwargs)
  assert words in str(e.value)
  if not any('split' in k for k in kwargs):
    assert 'vtab:TASK' in str(e.value) and 'tfds:NAME' in str(e.value)


class Downloaded(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A two-class dataset of 8x8 images whose preparation starts with a
  download (each test's subclass says which, in _split_generators)."""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(8, 8, 3)),
            'label': tfds.features.ClassLabel(num_classes=2)}))

  def _generate_examples(self):  # never reached
    yield from ()


def test_a_failed_download_leaves_no_folder_it_made(tmp_path):
  class BitTfdsOffline(Downloaded):
    """Its download fails, as without a network."""

    def _split_generators(self, dl_manager):
      os.makedirs(os.path.join(dl_manager.download_dir, 'part.tmp'))
      raise ConnectionError('Failed to resolve the host')

  new = tmp_path / 'new' / 'tfds'
  for data_dir in (new, tmp_path):  # one made for it, one that was there
    with pytest.raises(errors.BadInput, match='could not prepare '
                       'bit_tfds_offline.*Failed to resolve the host'):
      tfds_reader.resolve('tfds:bit_tfds_offline', data_dir=str(data_dir))
  assert not (tmp_path / 'new').exists()
  assert 'downloads' in os.listdir(tmp_path)  # TFDS's, in the user's folder


def test_offline_tfds_uses_the_files_it_has_and_fails_at_once_without(
    tmp_path, monkeypatch):
  # A bound socket that does not listen refuses connections, as a machine
  # offline. TFDS itself would retry each address for about 3 minutes.
  closed = socket.socket()
  closed.bind(('127.0.0.1', 0))
  nowhere = f'http://127.0.0.1:{closed.getsockname()[1]}'
  monkeypatch.setattr(tfds_reader, 'TFDS_MIRROR', nowhere)
  served = tmp_path / 'served'
  served.mkdir()
  images = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), np.uint8)
  np.save(served / 'part.npy', images)
  blob = (served / 'part.npy').read_bytes()
  handler = functools.partial(http.server.SimpleHTTPRequestHandler,
                              directory=str(served))
  handler.log_message = lambda *a: None
  server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  url = f'http://127.0.0.1:{server.server_port}/part.npy'

  class BitTfdsServed(Downloaded):
    """Its file lies on a server, at a registered address."""
    url_infos = {url: tfds.core.download.checksums.UrlInfo(
        size=len(blob), checksum=hashlib.sha256(blob).hexdigest(),
        filename='part.npy')}

    def _split_generators(self, dl_manager):
      path = dl_manager.download(url)
      return {'train': self._generate_examples(path),
              'test': self._generate_examples(path)}

    def _generate_examples(self, path):
      for i, image in enumerate(np.load(path)):
        yield i, {'image': image, 'label': i % 2}

  class BitTfdsByHand(Downloaded):
    MANUAL_DOWNLOAD_INSTRUCTIONS = 'Place part.npy in the manual_dir.'

    def _split_generators(self, dl_manager):
      os.listdir(dl_manager.manual_dir)  # TFDS refuses first: there is none

  online, offline = tmp_path / 'online', tmp_path / 'offline'
  try:
    assert tfds_reader.resolve('tfds:bit_tfds_served',
                               data_dir=str(online)).train_size == 6
  finally:
    server.shutdown()
    server.server_close()
  # Offline, what TFDS downloaded (here copied from another machine) is
  # enough, as it would be without the check.
  shutil.copytree(online / 'downloads', offline / 'downloads')
  assert tfds_reader.resolve('tfds:bit_tfds_served',
                             data_dir=str(offline)).train_size == 6
  # Offline, without the files: one line at once, and no folder left.
  start = time.monotonic()
  with pytest.raises(errors.BadInput, match=(
      r'tfds:bit_tfds_served: TFDS could not prepare it from the files it '
      r'has, and no server to download them from answers \(http://127.0.0.1'
      r'.*; NewConnectionError: .*Connection refused\); .*tfds_reader '
      r'tfds:bit_tfds_served --datadir D\)')):
    tfds_reader.resolve('tfds:bit_tfds_served', data_dir=str(tmp_path / 'n'))
  assert time.monotonic() - start < zoo.PROBE_TIMEOUT_S
  assert not (tmp_path / 'n').exists()
  # A dataset fetched by hand is not blamed on the network.
  with pytest.raises(errors.BadInput, match=(
      'could not prepare bit_tfds_by_hand .*Manual directory')):
    tfds_reader.resolve('tfds:bit_tfds_by_hand', data_dir=str(offline))
  closed.close()


def test_fewshot_subset_is_the_shared_one(toy_dir):
  split = tfds_reader.resolve('tfds:bit_tfds_toy', toy_dir).read('train')
  labels = split.labels
  idx = datasets.fewshot_indices(labels, 3, seed=7)
  few = split.subset(idx)
  np.testing.assert_array_equal(few.labels, labels[idx])
  assert np.bincount(few.labels).tolist() == [3] * len(CLASSES)
  assert _numbers(few) == [_numbers(split)[i] for i in idx]
  # A subset drawn before the whole split was read gives the same.
  lazy = tfds_reader.resolve('tfds:bit_tfds_toy', toy_dir).read('train')
  assert _numbers(lazy.subset(idx)) == _numbers(few)


def test_a_splits_fingerprint_names_its_records(toy_dir, tmp_path,
                                               monkeypatch):
  """What the few-shot feature cache is keyed on: the same records give the
  same fingerprint, other records (another split, a subset) another one; a
  subset's labels are not kept as the whole split's."""
  monkeypatch.setenv('BIT_CACHE', str(tmp_path / 'cache'))

  def read(split='train', **kwargs):
    return tfds_reader.resolve('tfds:bit_tfds_toy', toy_dir,
                               **kwargs).read(split)
  whole = read().fingerprint()
  assert read().fingerprint() == whole
  assert len({whole, read('eval').fingerprint(),
              read(train_split='train[:30]').fingerprint(),
              read().subset([0, 1, 2]).fingerprint(),
              read().subset([0, 1, 3]).fingerprint()}) == 5
  assert read().subset(np.arange(len(read()))).fingerprint() == whole
  assert len(read().subset([0, 1, 2]).labels) == 3
  assert not (tmp_path / 'cache').exists()


# --------------------------------------------------------------------------
# vtab:TASK, against google-research/task_adaptation.

def _stand_in(tfds_name, splits, example):
  """A builder with the real `tfds_name` builder's features (and name and
  version), holding `splits` {name: n} of example(i) in stored order i."""
  real = tfds.builder_cls(tfds_name)

  class StandIn(real, skip_registration=True):
    name = real.name
    pkg_dir_path = real._get_pkg_dir_path()  # pylint: disable=protected-access

    def _info(self):
      info = super()._info()
      info.as_proto.disable_shuffling = True  # stored order = generated
      return info

    def _split_generators(self, dl_manager):
      return {s: self._generate_examples(s, n) for s, n in splits.items()}

    def _generate_examples(self, split, n):  # pylint: disable=arguments-differ
      for i in range(n):
        yield i, example(split, i)
  return StandIn


def test_vtab_natural_task_caltech101(tmp_path):
  """Caltech101: VTAB keeps the first 90% of TFDS train as train, the rest
  as val; val200 is the first 200 of val; test is TFDS test."""
  def example(split, i):
    offset = 10_000 if split == 'test' else 0
    return {'image': _pixels(offset + i, (6, 5, 3)), 'label': i % 102,
            'image/file_name': f'{split}{i}.jpg'}
  _prepare(_stand_in('caltech101', {'train': 2010, 'test': 30}, example),
           tmp_path)
  n_train = 90 * 2010 // 100  # 1809
  published = {'train800': range(800),
               'val200': range(n_train, n_train + 200),
               'train800val200': list(range(800)) + list(range(n_train,
                                                               n_train + 200)),
               'test': range(10_000, 10_030),
               'val': range(n_train, 2010)}
  data = tfds_reader.resolve('vtab:caltech101', str(tmp_path))
  assert (data.train_split, data.eval_split) == ('train800val200', 'test')
  assert (data.train_size, data.eval_size) == (1000, 30)
  assert data.num_classes == 102
  for split, numbers in published.items():
    data = tfds_reader.resolve('vtab:caltech101', str(tmp_path),
                            train_split='train800', eval_split=split)
    got = data.read('eval')
    assert len(got) == data.eval_size == len(numbers)
    assert _numbers(got) == list(numbers)
    np.testing.assert_array_equal(got.labels,
                                  [n % 10_000 % 102 for n in numbers])
  sizes = {s: tfds_reader.resolve('vtab:caltech101', str(tmp_path),
                               train_split=s).train_size
           for s in ('train800', 'val200', 'train800val200', 'val+test')}
  assert sizes == {'train800': 800, 'val200': 200, 'train800val200': 1000,
                   'val+test': 201 + 30}


def _dsprites_example(split, i):
  del split
  image = np.zeros((64, 64, 1), np.uint8)
  image[i % 64, : 1 + i % 63] = 1  # holds 0 and 1 only, as dSprites does
  return {'image': image, 'label_shape': i % 3, 'label_scale': i % 6,
          'label_orientation': (i * 7) % 40,
          'label_x_position': (i * 5) % 32, 'label_y_position': i % 32,
          'value_shape': 0.0, 'value_scale': 0.0, 'value_orientation': 0.0,
          'value_x_position': 0.0, 'value_y_position': 0.0}


@pytest.fixture(scope='module')
def dsprites_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp('dsprites')
  _prepare(_stand_in('dsprites', {'train': 1250}, _dsprites_example),
           data_dir)
  return data_dir


def test_vtab_structured_task_dsprites(dsprites_dir):
  """dSprites: train, val and test are 80%, 10% and 10% of TFDS train;
  x position (32 values) and orientation (40 values) fall into 16 equal
  bins; images of 0/1 are scaled to 0/255 and read as RGB."""
  tmp_path = dsprites_dir
  n_train, n_val = 1000, 125
  published = {'train800val200': list(range(800)) + list(range(1000, 1200)),
               'test': list(range(n_train + n_val, 1250)),
               'val200': list(range(1000, 1200))}
  for task, feature, rule in (
      ('dsprites-xpos', 'label_x_position', lambda v: v // 2),
      ('dsprites-orientation', 'label_orientation',
       lambda v: int(v * 16 // 40))):
    for split, numbers in published.items():
      data = tfds_reader.resolve(f'vtab:{task}', str(tmp_path),
                              eval_split=split)
      assert data.num_classes == 16 and data.eval_size == len(numbers)
      got = data.read('eval')
      truth = [_dsprites_example(None, i) for i in numbers]
      np.testing.assert_array_equal(
          got.labels, [rule(t[feature]) for t in truth])
      assert got.labels.max() < 16
      for j in (0, len(numbers) - 1):
        image = _decoded(got, j)
        assert image.shape == (64, 64, 3)
        np.testing.assert_array_equal(
            image, np.repeat(truth[j]['image'], 3, axis=2) * 255)
  # Every bin of the orientation rule is hit by its 40 values, in order.
  rule = vtab.TASKS['dsprites-orientation'].label
  assert [rule({'label_orientation': v}) for v in range(40)] == [
      int(v // 2.5) for v in range(40)]


# --------------------------------------------------------------------------
# Validation in the three backends.

def _validate_args(module, argv):
  return module.argparser().parse_args(argv)


def test_validate_agrees_across_backends(tmp_path, capsys):
  from bit_jax import validate as jax_validate  # pylint: disable=import-outside-toplevel
  from bit_pytorch import validate as torch_validate  # pylint: disable=import-outside-toplevel
  from bit_tf2 import validate as tf2_validate  # pylint: disable=import-outside-toplevel
  folder = write_imagefolder(tmp_path / 'images', size=(32, 32), train=2,
                             val=5)
  npz = str(tmp_path / 'model.npz')
  np.savez(npz, **synthetic_weights('R14x0.5', head_size=3, seed=1))
  argv = ['--ckpt_path', npz, '--dataset', 'imagefolder', '--datadir',
          folder, '--crop_size', '32', '--batch_eval', '4', '--workers', '0']
  results = {}
  for name, module in (('pytorch', torch_validate), ('tf2', tf2_validate),
                       ('jax', jax_validate)):
    results[name] = module.main(_validate_args(module, argv))
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert printed.startswith('{"loss": ')
  ref = results['pytorch']
  assert ref['n'] == 15 and ref['top5'] == 1.0  # 3 classes: all in top-5
  for name in ('tf2', 'jax'):
    got = results[name]
    assert got['n'] == ref['n'] and got['top1'] == ref['top1'], name
    assert got['loss'] == pytest.approx(ref['loss'], rel=1e-5), name


def test_validate_metrics_against_numpy():
  from big_transfer.metrics import batch_sums, summarize  # pylint: disable=import-outside-toplevel
  logits = np.array([[0.0, 1.0, 2.0, 3.0, 4.0, 5.0],
                     [5.0, 4.0, 3.0, 2.0, 1.0, 0.0],
                     [0.0, 0.0, 9.0, 0.0, 0.0, 0.0]])
  labels = np.array([5, 5, 1])
  mask = np.array([True, True, False])
  result = summarize(batch_sums(logits, labels, mask))
  log_z = np.log(np.exp(logits[:2]).sum(1))
  assert result['n'] == 2
  assert result['top1'] == 0.5 and result['top5'] == 0.5
  assert result['loss'] == pytest.approx(np.mean(log_z - [5.0, 0.0]))


@pytest.mark.parametrize('backend', ['pytorch', 'tf2', 'jax'])
def test_validate_refuses_unknown_dataset(backend, capsys):
  """Exit status 2, naming every accepted form."""
  import importlib  # pylint: disable=import-outside-toplevel
  module = importlib.import_module(f'bit_{backend}.validate')
  with pytest.raises(SystemExit) as e:
    module.argparser().parse_args(['--ckpt_path', 'x.npz', '--dataset',
                                   'vtab:imagenet'])
  assert e.value.code == 2
  err = capsys.readouterr().err
  for form in ('imagefolder', 'cifar10', 'tfds:NAME', 'vtab:TASK',
               'clevr-count', 'fashion_mnist'):
    assert form in err


@pytest.mark.parametrize('backend', ['pytorch', 'tf2', 'jax'])
def test_validate_refuses_a_missing_checkpoint_before_the_dataset(
    backend, tmp_path, capsys, monkeypatch):
  """Exit status 2 naming the checkpoint (or the unwritable --output),
  where the dataset (cifar10, not in --datadir) would have been fetched
  first."""
  import importlib  # pylint: disable=import-outside-toplevel
  module = importlib.import_module(f'bit_{backend}.validate')
  monkeypatch.setattr(datasets, 'load', None)  # Reading it fails the test.
  for ckpt in [str(tmp_path / 'missing.npz'), 'BiT-M-R51x1'] + (
      [str(tmp_path / 'bit.pth.tar')] if backend == 'pytorch' else []):
    with pytest.raises(SystemExit) as e:
      module.cli(['--ckpt_path', ckpt, '--datadir', str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and ckpt in err, err
  for flags, words in ((['--output', '/proc/no/result.json'],
                        'give another --output'),
                       (['--dataset', 'digits', '--eval_split', 'test'],
                        '--eval_split applies to tfds:NAME'),
                       (['--dataset', 'imagefolder'],
                        '--dataset imagefolder needs --datadir.'),
                       (['--dataset', 'imagefolder', '--datadir',
                         str(tmp_path / 'none')], 'is not a folder'),
                       (['--workers', '-1'],
                        '--workers must be 0 or more, got -1.')):
    with pytest.raises(SystemExit) as e:
      module.cli(['--ckpt_path', 'BiT-R14x0.5-FashionMNIST', *flags])
    assert e.value.code == 2
    assert words in capsys.readouterr().err


@pytest.mark.parametrize('backend', ['pytorch', 'tf2', 'jax'])
def test_validate_reports_a_failed_weights_download_before_the_data(
    backend, tmp_path, capsys, weights_download_fails):
  del weights_download_fails
  import importlib  # pylint: disable=import-outside-toplevel
  module = importlib.import_module(f'bit_{backend}.validate')
  with pytest.raises(SystemExit) as e:
    module.cli(['--ckpt_path', 'BiT-S-R50x1', '--dataset', 'digits',
                '--bit_pretrained_dir', str(tmp_path / 'weights')])
  assert e.value.code == 2
  assert 'could not download' in capsys.readouterr().err
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize('dataset', ['tfds', 'vtab'])
def test_validate_tfds_and_vtab_agree_across_backends(dataset, tmp_path,
                                                      dsprites_dir):
  """A model evaluated on a tfds: dataset and on a VTAB-1k test split
  through the three validation commands."""
  from bit_jax import validate as jax_validate  # pylint: disable=import-outside-toplevel
  from bit_pytorch import validate as torch_validate  # pylint: disable=import-outside-toplevel
  from bit_tf2 import validate as tf2_validate  # pylint: disable=import-outside-toplevel
  if dataset == 'tfds':
    class Square(BitTfdsToy, skip_registration=True):
      name = 'bit_tfds_square'
      splits = {'train': 8, 'validation': 10}
      square = 32
    _prepare(Square, tmp_path)
    argv, classes, n = (['--dataset', 'tfds:bit_tfds_square', '--datadir',
                         str(tmp_path)], len(CLASSES), 10)
  else:  # 64 px images, evaluated at 64 px
    argv, classes, n = (['--dataset', 'vtab:dsprites-xpos', '--datadir',
                         str(dsprites_dir), '--eval_split', 'test'], 16, 125)
  npz = str(tmp_path / 'model.npz')
  np.savez(npz, **synthetic_weights('R14x0.5', head_size=classes, seed=2))
  argv += ['--ckpt_path', npz, '--crop_size', '32' if dataset == 'tfds'
           else '64', '--batch_eval', '8', '--workers', '0']
  results = {name: module.main(module.argparser().parse_args(argv))
             for name, module in (('pytorch', torch_validate),
                                  ('tf2', tf2_validate), ('jax', jax_validate))}
  ref = results['pytorch']
  assert ref['n'] == n
  for name in ('tf2', 'jax'):
    assert results[name]['n'] == n
    # One image of this random model's VTAB split has its top two logits
    # 1.3e-6 apart, below float32 rounding: it may go either way.
    assert abs(results[name]['top1'] - ref['top1']) <= 1 / n
    assert results[name]['loss'] == pytest.approx(ref['loss'], rel=1e-5)
