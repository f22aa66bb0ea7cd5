"""The tf.data input pipeline of `bit_tf2`, under the original repository's
module name (with its `get_data` and `get_dataset_info`, which return tf.data
datasets for TF2 and JAX code alike). The JAX backend itself reads through
big_transfer.loader, which needs no TensorFlow; both follow the one data
stream, so their batches hold the same examples, crops, flips and mixup.

API:

  data = load(args)
      Resolves `--dataset` (TFDS names, `imagefolder`, the offline arrays of
      `datasets.ARRAY_DATASETS`), checks it (bad input raises
      `errors.BadInput` before any long work) and draws the few-shot
      subset. `data` has `train_size` (after few-shot), `eval_size`,
      `num_classes`, `classes` (names, or None), `original_hw` (median
      (height, width) of the training images), `eval_split` and `describe()`
      (a dict for config.json).

  train_batches(data, stream, resize, crop, start_step=0, process_index=0,
                process_count=1, crop_scale=None)
      An endless `tf.data.Dataset`; its k-th element is the batch of training
      step `start_step + k` of the shared data stream `stream`
      (datastream.Stream): {'image': float32 [b, crop, crop, 3] in [-1, 1],
      'label': float32 [b, num_classes] one-hot (mixed when mixup is on)},
      b = batch / process_count (this process's share of the global batch).
      The examples, crops, flips and mixup are the stream's, so they are
      those of the PyTorch backend, whatever the number of processes, and
      the same whether the run started at 0 or resumed at k. With
      `crop_scale` (min, max), the crop is the Inception crop instead
      (distillation's): the box of datastream.inception_crop(seed, height,
      width, crop_scale) of each example's seed, resized to (crop, crop),
      flipped when the seed's 40th uniform is under 0.5; `resize` is not
      used.

  eval_batches(data, batch, crop, process_index=0, process_count=1)
      A finite `tf.data.Dataset` that covers this process's share of the
      evaluation split once: {'image': float32 [b, crop, crop, 3],
      'label': int64 [b], 'mask': bool [b]}; every batch has b = batch /
      process_count rows, the last one padded with rows whose mask is False.

Pre-processing is the HyperRule's: train images are resized to (resize,
resize), cropped to (crop, crop) and flipped left-right where the stream
says (or Inception-cropped, above); evaluation images are resized to (crop,
crop); an image already of the size is not resampled. Mixup mixes each
example with its partner in the stream, with the stream's lambda (one per
batch).

The original repository's functions are here too, with their arguments:
`get_dataset_info(dataset, split, examples_per_class)` and `get_data(dataset,
mode, repeats, batch_size, resize_size, crop_size, mixup_alpha,
examples_per_class, examples_per_class_seed, num_devices, tfds_manual_dir)`.
"""
import dataclasses
import io
import os

import numpy as np
import tensorflow as tf

from big_transfer import datasets, datastream, errors
import bit_hyperrule
from big_transfer import tfds_reader

# A TFDS training split larger than this is streamed (shuffle buffer) rather
# than held in memory as encoded images for random access.
IN_MEMORY_BYTES = 4 << 30
SHUFFLE_BUFFER = 20_000
# Extensions tf.io.decode_image reads; other files go through PIL.
_TF_DECODABLE = ('.jpg', '.jpeg', '.png', '.bmp', '.gif')


@dataclasses.dataclass
class Source:
  """One split: `n` examples and how to get example i as uint8 [h, w, 3].

  `table` holds per example either the encoded image bytes, the file path
  (`paths` True), or nothing when `images` is a uint8 array; `records` is a
  TFDS dataset of {'image': encoded, 'label'} for splits too large to hold;
  `held` is the file of a run's held images (big_transfer.held), which
  then come from it, resized already.
  """
  n: int
  labels: np.ndarray = None           # int64 [n]; None for a streamed split
  images: np.ndarray = None           # uint8 [n, h, w, 3]
  table: np.ndarray = None            # object [n] of bytes or str
  paths: bool = False
  use_pil: bool = False
  records: tf.data.Dataset = None
  held: str = None

  @property
  def random_access(self):
    return self.records is None

  @property
  def decoded(self):
    """Whether its images are decoded when read (files or bytes)."""
    return self.table is not None

  def pil(self, i):
    """Image i as a PIL RGB image, decoded by PIL (for big_transfer.held)."""
    if self.paths:
      return datasets.decode_file(self.table[i])
    return datasets.decode(io.BytesIO(self.table[i]))

  def subset(self, idx):
    return dataclasses.replace(
        self, n=len(idx), labels=self.labels[idx],
        images=None if self.images is None else self.images[idx],
        table=None if self.table is None else self.table[idx])

  def loader(self):
    """A tf function: index -> (uint8 image [h, w, 3], int64 label)."""
    labels = tf.constant(self.labels)
    if self.held:
      held = np.load(self.held, mmap_mode='r')  # the file mapped, not copied

      def image(i):
        return tf.ensure_shape(tf.numpy_function(
            lambda j: np.asarray(held[j]), [i], tf.uint8, stateful=False),
                               held.shape[1:])
      return lambda i: (image(i), tf.gather(labels, i))
    if self.images is not None:
      images = tf.constant(self.images)
      return lambda i: (tf.gather(images, i), tf.gather(labels, i))
    table = tf.constant([os.fsencode(p) for p in self.table] if self.paths
                        else list(self.table))
    read = tf.io.read_file if self.paths else tf.identity
    decode = _decode_pil if self.use_pil else _decode_tf
    return lambda i: (decode(read(tf.gather(table, i))), tf.gather(labels, i))


def _decode_tf(encoded):
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  return tf.ensure_shape(image, [None, None, 3])


def _decode_pil(encoded):
  def decode(data):
    return np.asarray(datasets.decode(io.BytesIO(data)))
  image = tf.numpy_function(decode, [encoded], tf.uint8, stateful=False)
  return tf.ensure_shape(image, [None, None, 3])


@dataclasses.dataclass
class Data:
  name: str
  train: Source
  eval: Source
  num_classes: int
  classes: list
  original_hw: tuple
  eval_split: str
  full_train_size: int
  workers: int = None

  @property
  def train_size(self):
    return self.train.n

  @property
  def eval_size(self):
    return self.eval.n

  def describe(self):
    return {'dataset': self.name, 'train_size': self.train_size,
            'full_train_size': self.full_train_size,
            'eval_size': self.eval_size, 'eval_split': self.eval_split,
            'num_classes': self.num_classes, 'original_hw': self.original_hw}


# --------------------------------------------------------------------------
# Resolving --dataset.

def load(args, logger=None):
  """The dataset of `args`, checked, with its few-shot subset drawn."""
  if args.dataset == 'imagefolder':
    data = _imagefolder(args, logger)
  elif args.dataset in datasets.ARRAY_DATASETS:
    data = _arrays(args.dataset)
  elif tfds_reader.is_tfds(args.dataset):
    data = _tfds_or_vtab(args)
  elif args.dataset in datasets.NAMED_DATASETS:
    data = _tfds(args, logger)
  else:
    raise errors.BadInput(f'unknown dataset {args.dataset!r}; give one '
                              f'of {datasets.dataset_forms()}.')
  data.workers = getattr(args, 'workers', None)
  if args.examples_per_class:
    if not data.train.random_access:
      raise AssertionError('few-shot sources are always held in memory')
    idx = datasets.fewshot_indices(data.train.labels,
                                     args.examples_per_class,
                                     args.examples_per_class_seed)
    data.train = data.train.subset(idx)
  return data


def _tfds_or_vtab(args):
  """tfds:NAME and vtab:TASK, read through big_transfer.tfds_reader (as PyTorch reads
  them: the same examples in the same order)."""
  d = tfds_reader.resolve(args.dataset, args.datadir, args.tfds_manual_dir,
                       getattr(args, 'train_split', None),
                       getattr(args, 'eval_split', None))
  train, evaluation = (d.read(s) for s in ('train', 'eval'))
  train, evaluation = (Source(len(s), s.labels, table=s.encoded)
                       for s in (train, evaluation))
  return Data(args.dataset, train, evaluation, d.num_classes, d.classes,
              d.original_hw, d.eval_split, train.n)


def _arrays(name):
  d = datasets.load_array_dataset(name)
  train = Source(len(d.train_labels), np.asarray(d.train_labels, np.int64),
                 images=d.train_images)
  val = Source(len(d.val_labels), np.asarray(d.val_labels, np.int64),
               images=d.val_images)
  return Data(name, train, val, len(d.classes), list(d.classes),
              tuple(d.train_images.shape[1:3]), 'val', train.n)


def _imagefolder(args, logger):
  classes, train, val = datasets.scan_imagefolder(args.datadir)
  train, val = (_readable(s, args, logger) for s in (train, val))
  sources = []
  for split in (train, val):
    use_pil = not all(p.lower().endswith(_TF_DECODABLE) for p in split.paths)
    sources.append(Source(len(split.paths), split.labels,
                          table=np.array(split.paths, dtype=object),
                          paths=True, use_pil=use_pil))
  eval_split = os.path.basename(os.path.dirname(os.path.dirname(
      val.paths[0])))
  hw = bit_hyperrule.typical_size(datasets.image_sizes(train.paths))
  return Data('imagefolder', sources[0], sources[1], len(classes), classes,
              hw, eval_split, sources[0].n)


def _readable(split, args, logger):
  """The split without unreadable files (--skip_bad_images), or BadImage.
  tf.data cannot leave a file out once decoding it fails, so with
  --skip_bad_images whole files are checked up front; otherwise headers."""
  skip = getattr(args, 'skip_bad_images', False)
  keep = datasets.readable_images(split.paths, skip, logger)
  return datasets.FileSplit([split.paths[i] for i in keep],
                              split.labels[keep])


def _tfds(args, logger):
  import tensorflow_datasets as tfds
  builder = tfds.builder(args.dataset, data_dir=args.datadir)
  try:
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=args.tfds_manual_dir))
  except (AssertionError, OSError, tfds.core.download.DownloadError) as e:
    raise errors.BadInput(
        f'TFDS could not prepare {args.dataset} ({str(e).splitlines()[0]}); '
        'check --datadir, or give --tfds_manual_dir for datasets that must be '
        'downloaded by hand.') from e
  info = builder.info
  splits = info.splits
  eval_split = 'validation' if 'validation' in splits else 'test'
  num_classes = info.features['label'].num_classes
  classes = info.features['label'].names

  def records(split):
    """{'image': encoded bytes, 'label'} of `split`, in its stored order."""
    return builder.as_dataset(
        split=split, shuffle_files=False,
        decoders={'image': tfds.decode.SkipDecoding()}).map(
            lambda r: {'image': r['image'], 'label': r['label']})

  def held(split):
    encoded, labels = [], []
    for batch in records(split).batch(1024).as_numpy_iterator():
      encoded += list(batch['image'])
      labels.append(batch['label'])
    return Source(len(encoded), np.concatenate(labels).astype(np.int64),
                  table=np.array(encoded, dtype=object))

  def source(split, random_access):
    if random_access:
      return held(split)
    return Source(splits[split].num_examples, records=records(split))

  small = splits['train'].num_bytes <= IN_MEMORY_BYTES
  if logger:
    logger.info(f'reading {args.dataset} from TFDS ({builder.data_dir})')
  train = source('train', small or bool(args.examples_per_class))
  evaluation = source(eval_split, splits[eval_split].num_bytes <=
                      IN_MEMORY_BYTES)
  shape = info.features['image'].shape
  if shape[0] and shape[1]:
    hw = tuple(shape[:2])
  else:
    sample = records('train').take(256).map(
        lambda r: tf.shape(_decode_tf(r['image']))[:2])
    hw = bit_hyperrule.typical_size(list(sample.as_numpy_iterator()))
  return Data(args.dataset, train, evaluation, num_classes, classes, hw,
              eval_split, splits['train'].num_examples)


# --------------------------------------------------------------------------
# Batches.

def _options(data):
  options = tf.data.Options()
  options.deterministic = True
  if data.workers:
    options.threading.private_threadpool_size = data.workers
  return options


def _to_unit_range(image):
  return (tf.cast(image, tf.float32) - 127.5) / 127.5


def _resize(image, size):
  """Float (size, size, 3); an image already of that size is left as is."""
  def resize():
    return tf.clip_by_value(
        tf.image.resize(image, (size, size), antialias=True), 0.0, 255.0)
  same = tf.reduce_all(tf.shape(image)[:2] == size)
  return tf.ensure_shape(
      tf.cond(same, lambda: tf.cast(image, tf.float32), resize),
      [size, size, 3])


def _inception_crop(image, seed, crop, scale):
  """The box of datastream.inception_crop(seed, height, width, scale),
  resized to (crop, crop)."""
  shape = tf.shape(image)
  box = tf.numpy_function(
      lambda s, h, w: np.array(datastream.inception_crop(
          int(s), int(h), int(w), scale), np.int32),
      [seed, shape[0], shape[1]], tf.int32, stateful=False)
  box = tf.ensure_shape(box, [4])
  return _resize(tf.image.crop_to_bounding_box(image, *tf.unstack(box)),
                 crop)


def _augment(image, resize, crop, top, left, flip, seed, scale):
  """Resize, crop at (top, left) (or the Inception crop of `seed` when
  `scale`), flip when `flip`: as the stream says."""
  if scale:
    image = _inception_crop(image, seed, crop, scale)
  else:
    image = tf.image.crop_to_bounding_box(
        _resize(image, resize), tf.cast(top, tf.int32),
        tf.cast(left, tf.int32), crop, crop)
  image = tf.cond(flip, lambda: tf.image.flip_left_right(image),
                  lambda: image)
  return _to_unit_range(tf.ensure_shape(image, [crop, crop, 3]))


def train_batches(data, stream, resize, crop, start_step=0, process_index=0,
                  process_count=1, crop_scale=None):
  """Endless training batches of the data stream from step `start_step` on
  (see the module doc)."""
  scale = tuple(crop_scale) if crop_scale else None
  if stream.batch % process_count:
    raise errors.BadInput(f'--batch {stream.batch} is not divisible by '
                              f'the {process_count} processes.')
  local = stream.batch // process_count
  rows, partner = stream.rows(process_index * local,
                              (process_index + 1) * local)
  src = data.train

  def plan(step):
    """This process's rows of `step`: example, crop, flip, augmentation
    seed and mixup lambda."""
    seeds = stream.aug_seeds(step)[rows]
    if scale:  # the box needs the image's size: see _inception_crop
      top = left = np.zeros(len(rows), np.int64)
      flip = datastream.uniforms(seeds, 40) < 0.5
    else:
      top, left, flip = datastream.crop_flip(seeds, resize, crop)
    lam = np.full(len(rows), stream.lam(step), np.float32)
    return (stream.indices(step)[rows], top, left, flip,
            seeds.astype(np.int64), lam)

  plan_types = (tf.int64, tf.int64, tf.int64, tf.bool, tf.int64, tf.float32)
  if src.random_access:
    load = src.loader()

    def step_examples(step):
      return tf.data.Dataset.from_tensor_slices(tuple(
          tf.ensure_shape(t, [len(rows)]) for t in tf.numpy_function(
              plan, [step], plan_types, stateful=False)))

    examples = tf.data.Dataset.counter(start_step).flat_map(step_examples)
    examples = examples.map(lambda i, *rest: (*load(i), *rest),
                            num_parallel_calls=tf.data.AUTOTUNE)
  else:
    examples = _streamed(src, stream, rows, start_step, plan, plan_types)

  def preprocess(image, label, top, left, flip, seed, lam):
    return (_augment(image, resize, crop, top, left, flip, seed, scale),
            tf.one_hot(label, data.num_classes, dtype=tf.float32), lam)

  ds = examples.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(len(rows), drop_remainder=True)

  def finish(images, labels, lam):
    """This process's own rows, mixed up with their partners."""
    own = slice(0, local)
    if stream.mixup_alpha:
      lam = lam[0]
      return {'image': lam * images[own] + (1 - lam) * tf.gather(images,
                                                                 partner),
              'label': lam * labels[own] + (1 - lam) * tf.gather(labels,
                                                                 partner)}
    return {'image': images[own], 'label': labels[own]}

  ds = ds.map(finish, num_parallel_calls=tf.data.AUTOTUNE)
  return ds.prefetch(tf.data.AUTOTUNE).with_options(_options(data))


def _streamed(src, stream, rows, start_step, plan, plan_types):
  """(image, label, *plan) of this process's rows of a split too large to
  hold, from `start_step`: epoch e is the split through a shuffle buffer
  seeded by (seed, e), the one exception to the stream's order (crops,
  flips and mixup are the stream's). Every process reads every record."""
  start = start_step * stream.batch
  first_epoch = start // src.n

  def epoch(e):
    # The order must not depend on TF's global seed, which bit_tf2 sets from
    # --seed and get_data leaves unset (and with which, when it is 0, TF
    # cannot take a tensor as the shuffle's seed): no graph-level seed in
    # this traced function, so the shuffle's seeds are TF's default and
    # `seed`.
    tf.compat.v1.get_default_graph().seed = None
    return src.records.shuffle(SHUFFLE_BUFFER,
                               seed=stream.seed * 1_000_003 + e,
                               reshuffle_each_iteration=False)

  records = tf.data.Dataset.counter(first_epoch).flat_map(epoch)
  records = records.skip(start - first_epoch * src.n).batch(
      stream.batch, drop_remainder=True)

  def step_rows(step, batch):
    _, *augment = tf.numpy_function(plan, [step], plan_types, stateful=False)
    return tf.data.Dataset.from_tensor_slices((
        tf.gather(batch['image'], rows), tf.gather(batch['label'], rows),
        *augment))

  ds = tf.data.Dataset.zip(tf.data.Dataset.counter(start_step), records)
  return ds.flat_map(step_rows).map(
      lambda image, *rest: (_decode_tf(image), *rest),
      num_parallel_calls=tf.data.AUTOTUNE)


def named_errors(batches, files=None):
  """Yields from `batches` (an iterator over this module's datasets); an
  unreadable image ends the run with one line (errors.BadInput) instead
  of a TensorFlow traceback. `files(k)` lists the image files the k-th
  element may have read, in the order to check them, so that the line
  names the file."""
  k = 0
  try:
    for batch in batches:
      yield batch
      k += 1
  except tf.errors.OpError as e:
    bad = datasets.first_unreadable(files(k)) if files else None
    if bad:
      raise datasets.BadImage.of(*bad) from None
    raise errors.BadInput(
        f'cannot read an image ({e.message.strip().splitlines()[-1]}); fix '
        'or remove it, or pass --skip_bad_images.') from None


def train_files(data, stream, start_step, ahead=32):
  """`files` for named_errors over train_batches(data, stream, ...,
  start_step): the files of the steps the pipeline may have read ahead,
  then every training file."""
  if not data.train.paths:
    return None
  table = data.train.table

  def files(k):
    steps = range(start_step + max(k - 1, 0), start_step + k + ahead)
    near = np.unique(np.concatenate([stream.indices(s) for s in steps]))
    return [table[i] for i in near] + list(table)
  return files


def eval_files(data):
  """`files` for named_errors over eval_batches(data, ...)."""
  return (lambda k: list(data.eval.table)) if data.eval.paths else None


def eval_batches(data, batch, crop, process_index=0, process_count=1):
  """Every evaluation example once, in order, padded batches with a mask."""
  if batch % process_count:
    raise errors.BadInput(f'evaluation batch {batch} is not divisible by '
                              f'the {process_count} processes.')
  local = batch // process_count
  src = data.eval
  mine = len(range(process_index, src.n, process_count))
  # Every process runs the same number of batches, padded to the longest.
  longest = len(range(0, src.n, process_count))
  padded = -(-longest // local) * local
  if src.random_access:
    load = src.loader()
    ds = tf.data.Dataset.range(process_index, src.n, process_count).map(
        load, num_parallel_calls=tf.data.AUTOTUNE)
  else:
    ds = src.records.shard(process_count, process_index).map(
        lambda r: (_decode_tf(r['image']), r['label']),
        num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.map(lambda image, label: {
      'image': _to_unit_range(_resize(image, crop)), 'label': label,
      'mask': tf.constant(True)}, num_parallel_calls=tf.data.AUTOTUNE)
  pad = tf.data.Dataset.from_tensors({
      'image': tf.zeros((crop, crop, 3), tf.float32),
      'label': tf.constant(0, tf.int64), 'mask': tf.constant(False)})
  ds = ds.concatenate(pad.repeat(padded - mine)).batch(local)
  return ds.prefetch(tf.data.AUTOTUNE).with_options(_options(data))


# --------------------------------------------------------------------------
# The original repository's API, on top of the above.

def _original_args(dataset, examples_per_class=None, examples_per_class_seed=0,
                   tfds_manual_dir=None, data_dir=None):
  import argparse
  return argparse.Namespace(
      dataset=dataset, datadir=data_dir, tfds_manual_dir=tfds_manual_dir,
      examples_per_class=examples_per_class,
      examples_per_class_seed=examples_per_class_seed,
      skip_bad_images=False, workers=None)


def get_dataset_info(dataset, split, examples_per_class, data_dir=None):
  """{'original_num_examples', 'num_examples', 'num_classes'} of `split`
  ('train', or the evaluation split) of `dataset`, as in the original
  repository; num_examples counts the few-shot subset."""
  data = load(_original_args(dataset, data_dir=data_dir))
  n = data.train.n if split == 'train' else data.eval.n
  return {'original_num_examples': n,
          'num_examples': (examples_per_class * data.num_classes
                           if examples_per_class else n),
          'num_classes': data.num_classes}


def get_data(dataset, mode, repeats, batch_size, resize_size, crop_size,
             mixup_alpha, examples_per_class, examples_per_class_seed,
             num_devices, tfds_manual_dir, data_dir=None, seed=0):
  """The original repository's batches: a tf.data.Dataset of {'image':
  [num_devices, batch_size / num_devices, crop, crop, 3], 'label': one-hot
  [num_devices, ..., classes]}. mode 'train': the data stream of `seed`
  (endless with repeats None, else `repeats` epochs); any other mode: the
  evaluation split once (`repeats` ignored), with a 'mask' of the real rows
  (the last batch is padded, not dropped)."""
  data = load(_original_args(dataset, examples_per_class,
                             examples_per_class_seed, tfds_manual_dir,
                             data_dir))
  if mode == 'train':
    stream = datastream.Stream(data.train_size, batch_size, seed,
                             mixup_alpha or 0.0)
    ds = train_batches(data, stream, resize_size, crop_size)
    if repeats is not None:
      ds = ds.take(-(-repeats * data.train_size // batch_size))
  else:
    ds = eval_batches(data, batch_size, crop_size).map(
        lambda b: dict(b, label=tf.one_hot(b['label'], data.num_classes)))
  return ds.map(lambda b: {k: tf.reshape(v, [num_devices, -1,
                                             *v.shape[1:]])
                           for k, v in b.items()})
