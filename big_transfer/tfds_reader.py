"""TFDS datasets and the VTAB-1k tasks, read the same way by every backend.

  --dataset tfds:NAME     any TFDS dataset (NAME may carry a config and a
                          version: eurosat/rgb, cifar10:3.0.2) with an image
                          and a class label
  --dataset vtab:TASK     one of the 19 VTAB-1k tasks, with the benchmark's
                          splits and labels

API (framework-neutral; the pipelines of the three backends build on it):

  is_tfds(dataset) -> bool         whether --dataset is a tfds:/vtab: form
  accepted_forms() -> str          those forms in words, for error messages
  resolve(dataset, data_dir=None, manual_dir=None, train_split=None,
          eval_split=None, prepare=True) -> Dataset
      Finds the builder, prepares it when it is not (as array_record, which
      every backend reads; without retrying downloads where none of the
      servers to download it from answers), finds the image and label
      features and checks both splits. Bad input raises errors.BadInput.
  Dataset: name, classes, num_classes, train_split, eval_split, train_size,
      eval_size, original_hw (typical (height, width)), random_access,
      describe() (a dict for config.json), read('train' | 'eval') -> Split
  Split: len(split), split.labels (int64 [n]), split.encoded (object [n] of
      encoded image bytes: PNG, JPEG, ...), split[i] -> (bytes, int label),
      split.examples(indices), split.subset(indices) -> Split (the images
      decoded by datasets.decode). With array_record files a Split
      reads nothing until asked and pickles (for data-loader workers); the
      labels of a whole split, once read, are kept in the package's cache
      (runfiles.cache_dir('tfds_labels')) for the next run.
  (The VTAB-1k tasks, their splits and labels are big_transfer.vtab's.)

  add_array_record(prepared_dir) -> bool
      Writes array_record copies beside the files of a dataset prepared in
      another format (TFDS's default, tfrecord), so that it is read from disk
      at random; False where it already has them.

  python -m big_transfer.tfds_reader DATASET... [--datadir D]
      [--tfds_manual_dir M]
      prepares datasets ahead of a run (`vtab` stands for the 19 tasks), and
      adds array_record files to those prepared as tfrecord.

Prepared files in array_record format are read through TFDS's random-access
data source, which needs neither TensorFlow nor any other framework. A
dataset that has only files of the older tfrecord format is read whole into
memory through `as_dataset`, which needs TensorFlow; `resolve` refuses one
that would not fit (`copies` times its two splits above half the memory).
"""
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import shutil
import tempfile
import urllib.parse

import numpy as np

from big_transfer import hardware, preprocess, progress, runfiles, vtab, zoo
from big_transfer.errors import BadInput

TFDS_PREFIX = 'tfds:'
VTAB_PREFIX = 'vtab:'
# How many images the typical size is measured on.
SIZE_SAMPLE = 256
CHUNK = 1024  # records read at once


def accepted_forms():
  """The forms --dataset takes beyond the named ones, for error messages."""
  return ('tfds:NAME (any prepared or downloadable TFDS dataset with an '
          'image and a class label, e.g. tfds:dtd, tfds:eurosat/rgb, '
          'tfds:svhn_cropped; --datadir is the TFDS data_dir) or vtab:TASK '
          f'with TASK one of {", ".join(vtab.TASKS)}')


def is_tfds(dataset):
  """Whether `dataset` (a --dataset value) is read by this module."""
  return dataset.startswith((TFDS_PREFIX, VTAB_PREFIX))


# --------------------------------------------------------------------------
# Reading.

def _tfds():
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise BadInput('tfds: and vtab: datasets need tensorflow-datasets '
                   '(pip install tensorflow-datasets array_record).') from e
  return tfds


class _Reader:
  """Random access to the records of one TFDS split expression (images left
  encoded). Picklable: the data source is reopened in each process."""

  def __init__(self, prepared_dir, spec, image_key, random_access):
    self.prepared_dir, self.spec = prepared_dir, spec
    self.image_key, self.random_access = image_key, random_access
    self._source = None

  def __getstate__(self):
    return dict(self.__dict__, _source=None)

  def _builder(self):
    return _tfds().builder_from_directory(self.prepared_dir)

  def _decoders(self):
    return {self.image_key: _tfds().decode.SkipDecoding()}

  def records(self, indices):
    if self._source is None:
      self._source = self._builder().as_data_source(
          split=self.spec, decoders=self._decoders())
    return self._source.__getitems__([int(i) for i in indices])

  def all_records(self):
    """Every record, in order, of tfrecord files (through TensorFlow; files
    read at random are read with `records`)."""
    ds = self._builder().as_dataset(split=self.spec, shuffle_files=False,
                                    decoders=self._decoders())
    yield from _tfds().as_numpy(ds)


def _to_bytes(value):
  return value if isinstance(value, bytes) else bytes(value)


def _scaled_binary_png(encoded):
  """An image holding 0/1 as one holding 0/255 (lossless PNG)."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  with Image.open(io.BytesIO(encoded)) as im:
    pixels = np.asarray(im)
  scaled = np.where(pixels.squeeze() > 0, 255, 0).astype(np.uint8)
  out = io.BytesIO()
  Image.fromarray(scaled).save(out, format='PNG')
  return out.getvalue()


class Split:
  """One split: n examples of (encoded image bytes, int64 label).

  With array_record files nothing is read until asked: `split[i]` reads one
  example, `labels` reads every record once and keeps only the labels (a
  split larger than memory stays on disk; a split pickled for data-loader
  workers holds no images), `encoded` reads and keeps the whole split. Files
  in the older tfrecord format are read whole at the first access. The
  labels of a whole split (`names`: what decides them besides its records)
  are kept in the cache once read, and read from there by the next run.
  """

  def __init__(self, spec, n, reader, convert, indices=None, names=None):
    self.spec, self.n, self._names = spec, n, names
    self._reader, self._convert = reader, convert
    self._whole = indices is None
    self._indices = np.arange(n) if indices is None else np.asarray(indices)
    self._labels = self._encoded = None

  def __len__(self):
    return self.n

  @property
  def random_access(self):
    return self._reader.random_access

  def __getitem__(self, i):
    if self._encoded is not None:
      return self._encoded[i], int(self._labels[i])
    if not self.random_access:
      self._read_all()
      return self[i]
    return self._convert(self._reader.records([self._indices[i]])[0])

  def examples(self, indices):
    """[(bytes, label)] of `indices`, in one read."""
    if self._encoded is not None or not self.random_access:
      return [self[i] for i in indices]
    return [self._convert(r) for r in self._reader.records(
        self._indices[np.asarray(indices, np.int64)])]

  def _read_all(self):
    if self._encoded is not None:
      return
    if self.random_access:
      got = [e for lo in range(0, self.n, CHUNK) for e in self._chunk(lo)]
    else:
      got = [self._convert(r) for r in self._reader.all_records()]
      got = [got[i] for i in self._indices]
    self._encoded = np.empty(len(got), dtype=object)
    self._encoded[:] = [g[0] for g in got]
    self._labels = np.array([g[1] for g in got], np.int64)

  def _chunk(self, lo):
    """The examples lo, lo + 1, ... of one read of CHUNK."""
    return self.examples(range(lo, min(self.n, lo + CHUNK)))

  @property
  def labels(self):
    """int64 [n]."""
    if self._labels is None and self.random_access:
      cached = self._label_file()
      self._labels = _read_cache(cached, self.n)
      if self._labels is None:
        starts = progress.images(range(0, self.n, CHUNK), self.n,
                                 lambda lo: min(self.n, lo + CHUNK) - lo,
                                 f'labels of {self.spec}')
        self._labels = np.array([label for lo in starts
                                 for _, label in self._chunk(lo)], np.int64)
        _write_cache(cached, self._labels)
    elif self._labels is None:
      self._read_all()
    return self._labels

  def _label_file(self):
    """The cache file of this whole split's labels (None for a subset):
    named by a hash of the prepared files' dataset_info.json (which TFDS
    writes anew whenever it prepares them), the split, the dataset and
    label as named here, and the label rules (big_transfer/vtab.py)."""
    if self._names is None or not self._whole:
      return None
    return runfiles.cache_dir('tfds_labels', self._digest(self._names)[:32] +
                              '.npy')

  def _digest(self, *extra):
    """A hash of the prepared files' dataset_info.json, the split, the label
    rules and `extra`."""
    digest = hashlib.sha256(json.dumps(
        [os.path.realpath(self._reader.prepared_dir), self.spec,
         *extra]).encode())
    for path in (os.path.join(self._reader.prepared_dir, 'dataset_info.json'),
                 vtab.__file__):
      with open(path, 'rb') as f:
        digest.update(f.read())
    return digest.hexdigest()

  def fingerprint(self):
    """A hash of what decides these examples: the prepared files, the split,
    the label rules, and which of the split's records (a subset's)."""
    return self._digest(self._names, hashlib.sha256(
        self._indices.astype('<i8').tobytes()).hexdigest())

  @property
  def encoded(self):
    """object [n] of encoded image bytes (PNG, JPEG, ...)."""
    self._read_all()
    return self._encoded

  def subset(self, indices):
    """The examples at `indices` (e.g. datasets.fewshot_indices), in that
    order."""
    indices = np.asarray(indices, np.int64)
    out = Split(self.spec, len(indices), self._reader, self._convert,
                self._indices[indices], self._names)
    if self._labels is not None:
      out._labels = self._labels[indices]
    if self._encoded is not None:
      out._encoded = self._encoded[indices]
    return out

  def sizes(self, limit=SIZE_SAMPLE):
    """(height, width), upright, of up to `limit` images spread over the
    split."""
    from PIL import Image  # pylint: disable=import-outside-toplevel
    if self.random_access or self._encoded is not None:
      step = max(1, self.n // limit)
      encoded = [e for e, _ in self.examples(range(0, self.n, step)[:limit])]
    else:  # the first ones: reading all of a large split would take long
      encoded = []
      for record in self._reader.all_records():
        encoded.append(self._convert(record)[0])
        if len(encoded) == limit:
          break
    sizes = []
    for e in encoded:
      with Image.open(io.BytesIO(e)) as im:
        sizes.append(preprocess.upright_size(im))
    return sizes


def _read_cache(path, n):
  """The labels kept at `path`, or None (no path, none kept, or not n of
  them)."""
  if path is None:
    return None
  try:
    labels = np.load(path, allow_pickle=False)
  except (OSError, ValueError, EOFError):  # none, or a damaged file
    return None
  return labels if labels.shape == (n,) else None


def _write_cache(path, labels):
  """Keeps `labels` at `path` (a cache that cannot be written costs only the
  next run's time)."""
  if path is None:
    return
  try:
    with runfiles.replaced(path, 'wb') as f:
      np.save(f, labels)
  except OSError:
    pass


@dataclasses.dataclass
class Dataset:
  """A resolved tfds:/vtab: dataset; `read('train')`/`read('eval')` give
  the chosen splits."""
  name: str              # as given: tfds:NAME or vtab:TASK
  tfds_name: str
  data_dir: str          # the prepared dataset's folder (NAME/VERSION)
  image_key: str
  label_key: str         # the label feature, or 'derived' (VTAB structured)
  classes: list
  train_split: str       # as the user wrote them (VTAB names for vtab:)
  eval_split: str
  tfds_splits: dict      # user split -> TFDS split expression
  sizes: dict            # user split -> number of examples
  original_hw: tuple = None
  random_access: bool = True
  version: str = ''
  _convert: object = None

  @property
  def num_classes(self):
    return len(self.classes)

  @property
  def train_size(self):
    return self.sizes[self.train_split]

  @property
  def eval_size(self):
    return self.sizes[self.eval_split]

  def read(self, split):
    """The Split of 'train' or 'eval' (or of train_split / eval_split)."""
    split = {'train': self.train_split, 'eval': self.eval_split}.get(
        split, split)
    spec = self.tfds_splits[split]
    reader = _Reader(self.data_dir, spec, self.image_key, self.random_access)
    return Split(spec, self.sizes[split], reader, self._convert,
                 names=[self.name, self.label_key])

  def describe(self):
    return {'dataset': self.name, 'tfds_name': self.tfds_name,
            'tfds_version': self.version, 'data_dir': self.data_dir,
            'train_split': self.train_split, 'eval_split': self.eval_split,
            'tfds_train_split': self.tfds_splits[self.train_split],
            'tfds_eval_split': self.tfds_splits[self.eval_split],
            'train_size': self.train_size, 'eval_size': self.eval_size,
            'num_classes': self.num_classes, 'image': self.image_key,
            'label': self.label_key, 'original_hw': self.original_hw,
            'random_access': self.random_access}


def _builder(tfds_name, data_dir, manual_dir, prepare, shown):
  """The dataset's TFDS builder, prepared where `prepare`. A failed
  preparation leaves no folder that it made for `data_dir` behind."""
  tfds = _tfds()
  with runfiles.removed_on_failure(data_dir):
    try:
      builder = tfds.builder(tfds_name, data_dir=data_dir)
    except (tfds.core.registered.DatasetNotFoundError, ValueError,
            AssertionError) as e:
      raise BadInput(f'no TFDS dataset {tfds_name!r} for --dataset {shown} '
                     f'({str(e).splitlines()[0]}); --dataset takes '
                     f'{accepted_forms()}.') from e
    if prepare and not _prepared(builder):
      silent = _silent_servers(builder)
      try:
        with _download_retries(0 if silent else None):
          builder.download_and_prepare(
              file_format='array_record',
              download_config=tfds.download.DownloadConfig(
                  manual_dir=manual_dir))
      except Exception as e:  # pylint: disable=broad-except
        # TFDS raises many kinds (download, missing manual files, checksums).
        if silent:
          raise BadInput(
              f'--dataset {shown}: TFDS could not prepare it from the files '
              f'it has, and no server to download them from answers '
              f'({silent}); connect, or prepare it where there is a network '
              f'(python -m big_transfer.tfds_reader {shown} --datadir D) '
              'and give that folder as --datadir.') from e
        raise BadInput(
            f'TFDS could not prepare {tfds_name} in {builder.data_dir} '
            f'({type(e).__name__}: {str(e).strip().splitlines()[0][:300]}); '
            'check --datadir (the TFDS data_dir), or give --tfds_manual_dir '
            'for datasets that must be downloaded by hand.') from e
  return builder


# Where TFDS downloads a dataset that it has prepared itself, before it
# tries the dataset's own addresses.
TFDS_MIRROR = 'https://storage.googleapis.com'


def _silent_servers(builder):
  """Where none of the servers that TFDS would download `builder`'s files
  from answers one request (its mirror, the hosts of the dataset's
  registered addresses), those servers and why, in words; else None.
  Datasets downloaded by hand, and those that register no address, are
  taken to be reachable."""
  urls = builder.url_infos or {}
  if builder.MANUAL_DOWNLOAD_INSTRUCTIONS or not urls:
    return None
  hosts = sorted({TFDS_MIRROR} | {
      f'{u.scheme}://{u.netloc}' for u in map(urllib.parse.urlsplit, urls)
      if u.scheme in ('http', 'https')})
  import requests  # TFDS downloads with it (proxies, certificates)

  def failure(host):
    try:
      requests.head(host, timeout=zoo.PROBE_TIMEOUT_S)
      return None
    except requests.RequestException as e:
      return e

  with concurrent.futures.ThreadPoolExecutor(len(hosts)) as pool:
    failures = list(pool.map(failure, hosts))
  if not all(failures):
    return None
  error = failures[0]  # requests wraps urllib3's, which names the cause
  cause = getattr(error.args[0], 'reason', error) if error.args else error
  return (f'{", ".join(hosts)}; {type(cause).__name__}: '
          f'{str(cause).splitlines()[0][:300]}')


@contextlib.contextmanager
def _download_retries(count):
  """TFDS's downloader tries each address MAX_RETRIES (10) times, for about
  3 minutes where no server answers; `count` times inside, unless None (or
  a TFDS without that setting). Files that TFDS downloaded before (or that
  were copied into its downloads/ folder) are still used, offline too."""
  from tensorflow_datasets.core.download import downloader  # pylint: disable=import-outside-toplevel
  kept = getattr(downloader, 'MAX_RETRIES', None)
  if count is None or kept is None:
    yield
    return
  downloader.MAX_RETRIES = count
  try:
    yield
  finally:
    downloader.MAX_RETRIES = kept


def _prepared(builder):
  return os.path.exists(os.path.join(str(builder.data_dir),
                                     'dataset_info.json'))


def _find_features(info, shown):
  """(image key, label key) of a TFDS dataset: its supervised keys when
  they are an image and a class label, else its only top-level image and
  class label (or those named 'image' and 'label')."""
  tfds = _tfds()
  features = info.features
  images = [k for k, f in features.items()
            if isinstance(f, tfds.features.Image)]
  labels = [k for k, f in features.items()
            if isinstance(f, tfds.features.ClassLabel)]
  keys = info.supervised_keys
  if (isinstance(keys, tuple) and len(keys) == 2 and
      all(isinstance(k, str) for k in keys) and keys[0] in images and
      keys[1] in labels):
    return keys

  def pick(found, preferred, what):
    if len(found) == 1:
      return found[0]
    if preferred in found:
      return preferred
    have = f'has {", ".join(found)}' if found else 'has none'
    raise BadInput(f'--dataset {shown}: need a single {what} feature, but it '
                   f'{have} (features: {", ".join(features.keys())}); '
                   f'--dataset takes {accepted_forms()}.')

  return (pick(images, 'image', 'image (tfds.features.Image)'),
          pick(labels, 'label', 'class label (tfds.features.ClassLabel)'))


def _parts(spec, info):
  """(SplitInfo, examples taken from it) of each part of the TFDS split
  expression `spec`."""
  tfds = _tfds()
  for part in tfds.core.ReadInstruction.from_spec(spec).to_absolute(
      info.splits):
    split = info.splits[part.splitname]
    yield split, len(range(split.num_examples)[slice(part.from_, part.to)])


def _split_size(spec, info, shown, flag):
  """Examples in the TFDS split expression `spec`, or BadInput."""
  try:
    n = sum(taken for _, taken in _parts(spec, info))
  except (ValueError, KeyError, AssertionError, AttributeError) as e:
    raise BadInput(f'{flag} {spec!r} is not a split of {shown} '
                   f'({str(e).splitlines()[0]}); its splits: '
                   f'{", ".join(f"{k} ({v.num_examples})" for k, v in info.splits.items())}'
                   '; slices as in TFDS: train[:800], train[80%:], '
                   'train+validation.') from e
  if not n:
    raise BadInput(f'{flag} {spec!r} of {shown} has no examples.')
  return n


def _label_names(feature):
  return [str(n) for n in feature.names]


def resolve(dataset, data_dir=None, manual_dir=None, train_split=None,
            eval_split=None, prepare=True, copies=1):
  """The Dataset of --dataset tfds:NAME or vtab:TASK (see module doc).

  Default splits: tfds: train, and validation where it exists, else test;
  vtab: train800val200 and test (VTAB-1k as published). vtab: splits are
  VTAB's names, or several joined with '+'; tfds: splits are TFDS split
  expressions. `copies`: how many processes of the run hold a dataset read
  whole into memory (tfrecord files only), for the check that it fits.
  """
  if dataset.startswith(VTAB_PREFIX):
    return _resolve_vtab(dataset, data_dir, manual_dir, train_split,
                         eval_split, prepare, copies)
  if not dataset.startswith(TFDS_PREFIX) or not dataset[len(TFDS_PREFIX):]:
    raise BadInput(f'unknown dataset {dataset!r}; --dataset takes '
                   f'{accepted_forms()}.')
  tfds_name = dataset[len(TFDS_PREFIX):]
  builder = _builder(tfds_name, data_dir, manual_dir, prepare, dataset)
  info = builder.info
  image_key, label_key = _find_features(info, dataset)
  if train_split is None:
    if 'train' not in info.splits:
      raise BadInput(f'{dataset} has no train split; give --train_split '
                     f'(its splits: {", ".join(info.splits.keys())}).')
    train_split = 'train'
  if eval_split is None:
    eval_split = next((s for s in ('validation', 'test')
                       if s in info.splits), None)
    if eval_split is None:
      raise BadInput(f'{dataset} has neither a validation nor a test split; '
                     f'give --eval_split (its splits: '
                     f'{", ".join(info.splits.keys())}).')
  sizes = {s: _split_size(s, info, dataset, flag)
           for s, flag in ((train_split, '--train_split'),
                           (eval_split, '--eval_split'))}
  convert = _Convert(image_key, label_key)
  return _finish(Dataset(
      dataset, tfds_name, str(builder.data_dir), image_key, label_key,
      _label_names(info.features[label_key]), train_split, eval_split,
      {s: s for s in sizes}, sizes, _convert=convert), builder, copies)


def _resolve_vtab(dataset, data_dir, manual_dir, train_split, eval_split,
                  prepare, copies):
  task_name = dataset[len(VTAB_PREFIX):]
  task = vtab.TASKS.get(task_name)
  if task is None:
    raise BadInput(f'unknown VTAB-1k task {task_name!r}; --dataset takes '
                   f'{accepted_forms()}.')
  builder = _builder(task.tfds_name, data_dir, manual_dir, prepare, dataset)
  info = builder.info
  counts = {k: v.num_examples for k, v in info.splits.items()}
  try:
    table = vtab.split_table(task.splits[0], counts, task.splits[1])
  except KeyError as e:
    raise BadInput(f'{task.tfds_name} in {builder.data_dir} has no {e} '
                   f'split, which {dataset} needs.') from e
  train_split = train_split or vtab.DEFAULT_SPLITS[0]
  eval_split = eval_split or vtab.DEFAULT_SPLITS[1]
  tfds_splits, sizes = {}, {}
  for split, flag in ((train_split, '--train_split'),
                      (eval_split, '--eval_split')):
    parts = split.split('+')
    unknown = [p for p in parts if p not in table]
    if unknown:
      raise BadInput(f'{flag} {split!r}: {dataset} splits are '
                     f'{", ".join(vtab.SPLITS)} (or several joined by +).')
    tfds_splits[split] = '+'.join(table[p] for p in parts)
    sizes[split] = _split_size(tfds_splits[split], info, dataset, flag)
  label_key = vtab.label_feature(task)
  if task.label is None:
    classes = _label_names(info.features['label'])
  elif task.class_names is None:
    classes = _label_names(info.features[label_key])
  else:
    classes = list(task.class_names)
  if len(classes) != task.num_classes:
    raise BadInput(f'{task.tfds_name} in {builder.data_dir} has '
                   f'{len(classes)} classes; {dataset} expects '
                   f'{task.num_classes}.')
  label = task.label
  if isinstance(label, vtab.KittiDistance):
    label = vtab.KittiDistance(info.features['objects']['type'].names)
  convert = _Convert(task.image_key, 'label' if label is None else None,
                     label, task.binary_pixels)
  return _finish(Dataset(
      dataset, task.tfds_name, str(builder.data_dir), task.image_key,
      label_key, classes, train_split, eval_split, tfds_splits, sizes,
      _convert=convert), builder, copies)


def _random_access(info):
  formats = _tfds().core.file_adapters.FileFormat
  return formats.ARRAY_RECORD in info.available_file_formats()


def _stored_bytes(spec, info):
  """The bytes on disk of the examples of a (valid) split expression: each
  part's share of its split's files."""
  return sum(int(split.num_bytes) * taken // max(1, split.num_examples)
             for split, taken in _parts(spec, info))


def _finish(data, builder, copies=1):
  info = builder.info
  data.version = str(builder.version)
  data.random_access = _random_access(info)
  if not data.random_access:
    stored = info.file_format.value if info.file_format else 'tfrecord'
    root = data.data_dir[:-len(info.full_name)].rstrip(os.sep)
    add = f'python -m big_transfer.tfds_reader {data.name} --datadir {root}'
    try:
      import tensorflow  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    except ImportError as e:
      raise BadInput(
          f'{data.tfds_name} in {builder.data_dir} is prepared as '
          f'{stored}, which only TensorFlow reads; install '
          f'tensorflow, or add array_record files beside it ({add}, once, '
          'with TensorFlow installed).') from e
    held = copies * sum(_stored_bytes(data.tfds_splits[s], info)
                        for s in (data.train_split, data.eval_split))
    if held > hardware.memory_bytes() // 2:
      raise BadInput(
          f'{data.tfds_name} in {builder.data_dir} is prepared as '
          f'{stored}, which is read whole into memory: '
          f'{held / 2**30:.1f} GiB in {copies} process(es) (the trainer and '
          f'its --workers), above half of this machine\'s '
          f'{hardware.memory_bytes() / 2**30:.0f} GiB; add array_record '
          f'files beside it, read from disk as needed ({add}, once; the '
          f'{stored} files stay).')
  shape = info.features[data.image_key].shape
  if shape[0] and shape[1]:
    data.original_hw = (int(shape[0]), int(shape[1]))
  else:
    import bit_hyperrule  # pylint: disable=import-outside-toplevel
    data.original_hw = tuple(bit_hyperrule.typical_size(
        data.read('train').sizes()))
  return data


def add_array_record(prepared_dir):
  """Writes array_record copies of the shards of the dataset prepared in
  `prepared_dir` (NAME/VERSION) beside them and, last, names the format in
  its dataset_info.json: TFDS then reads it from these files, at random. The
  old files stay. Each shard is written under a temporary name and renamed
  when whole; an interrupted run leaves the dataset as it was, and the next
  one goes on from the shards done. False where the format is there already.
  """
  tfds = _tfds()
  adapters = tfds.core.file_adapters
  info = tfds.builder_from_directory(prepared_dir).info
  if _random_access(info):
    return False
  new = adapters.FileFormat.ARRAY_RECORD
  read = adapters.ADAPTER_FOR_FORMAT[
      info.file_format or adapters.FileFormat.TFRECORD]
  write = adapters.ADAPTER_FOR_FORMAT[new]
  shards = []
  for split in info.splits.values():
    old_names = split.filename_template
    new_names = old_names.replace(filetype_suffix=new.value)
    for k, n in enumerate(split.shard_lengths):
      shards.append((os.fspath(old_names.sharded_filepath(
          shard_index=k, num_shards=len(split.shard_lengths))),
                     os.fspath(new_names.sharded_filepath(
                         shard_index=k, num_shards=len(split.shard_lengths))),
                     n))
  todo = [s for s in shards if not os.path.exists(s[1])]
  need = sum(os.path.getsize(old) for old, _, _ in todo)
  free = shutil.disk_usage(prepared_dir).free
  if need > free:
    raise BadInput(f'adding array_record files to {prepared_dir} needs about '
                   f'{need / 2**30:.1f} GiB, and its disk has '
                   f'{free / 2**30:.1f} GiB free.')
  for old, new_path, _ in progress.images(
      todo, sum(n for _, _, n in todo), lambda shard: shard[2],
      f'array_record files of {info.full_name}'):
    part = new_path + '.incomplete'
    write.write_examples(part, enumerate(
        read.make_tf_data(old).as_numpy_iterator()))
    os.replace(part, new_path)
  info.add_alternative_file_format(new)
  with tempfile.TemporaryDirectory(dir=prepared_dir) as scratch:
    info.write_dataset_info_json(scratch)
    os.replace(os.path.join(scratch, 'dataset_info.json'),
               os.path.join(prepared_dir, 'dataset_info.json'))
  return True


class _Convert:
  """A record -> (encoded image bytes, int label). Picklable."""

  def __init__(self, image_key, label_key, label_fn=None,
               binary_pixels=False):
    self.image_key, self.label_key = image_key, label_key
    self.label_fn, self.binary_pixels = label_fn, binary_pixels

  def __call__(self, record):
    image = _to_bytes(record[self.image_key])
    if self.binary_pixels:
      image = _scaled_binary_png(image)
    label = (record[self.label_key] if self.label_fn is None else
             self.label_fn(record))
    return image, int(label)


def main(argv=None):
  """python -m big_transfer.tfds_reader DATASET... [--datadir D]
  [--tfds_manual_dir M]: prepares each dataset (as array_record, which every
  backend reads; one prepared as tfrecord gets array_record files beside its
  own) and prints what the backends will see; `vtab` stands for the 19
  tasks."""
  import argparse  # pylint: disable=import-outside-toplevel
  import json  # pylint: disable=import-outside-toplevel
  # Not flags.parser: flags imports datasets, which imports this module.
  parser = argparse.ArgumentParser(
      prog='python -m big_transfer.tfds_reader',
      description='Prepare tfds:NAME / vtab:TASK datasets for every backend.')
  parser.add_argument('datasets', nargs='+',
                      help='tfds:NAME, vtab:TASK, or vtab for all 19 tasks.')
  parser.add_argument('--datadir', default=None, help='TFDS data_dir.')
  parser.add_argument('--tfds_manual_dir', default=None,
                      help='TFDS manual_dir, for datasets TFDS cannot '
                      'download itself (e.g. diabetic_retinopathy).')
  parser.add_argument('--train_split', default=None,
                      help='The training split described, as the trainers\' '
                      '--train_split.')
  parser.add_argument('--eval_split', default=None,
                      help='The evaluation split described, as the '
                      'trainers\' --eval_split.')
  args = parser.parse_args(argv)
  names = []
  for name in args.datasets:
    names += ([VTAB_PREFIX + t for t in vtab.TASKS] if name == 'vtab'
              else [name])
  for name in names:
    data = resolve(name, args.datadir, args.tfds_manual_dir,
                   args.train_split, args.eval_split, copies=0)
    if not data.random_access:
      add_array_record(data.data_dir)
      data = resolve(name, args.datadir, args.tfds_manual_dir,
                     args.train_split, args.eval_split)
    print(json.dumps(data.describe()), flush=True)


if __name__ == '__main__':
  from big_transfer import errors  # pylint: disable=import-outside-toplevel
  errors.run_cli(main)
