"""Feature extraction and few-shot linear evaluation, shared by the three
`bit_*.features` and `bit_*.fewshot` commands: everything but the forward
pass and the backend's own data loader.

  python -m bit_{pytorch,tf2,jax}.features --model M --dataset D \\
      --split {train,eval} --out FILE.npz
  python -m bit_{pytorch,tf2,jax}.fewshot --model M --dataset D \\
      [--shots 1,5,10,25] [--seeds 3] [--l2 1024] [--out FILE.json]

The few-shot evaluation follows the method of big_vision's linear few-shot
evaluator: pre-logit features of k training examples per class (drawn by the
shared sampler, `datasets.fewshot_indices`, with seeds 0, 1, ...), each
feature standardised with the mean and standard deviation of those k-shot
examples, a closed-form L2-regularised least-squares fit to one-hot targets
(with an intercept that is not regularised), and top-1 of its argmax on the
whole evaluation split. The linear algebra is numpy/scipy, framework-free
(float64; large products in float32).

A backend is a module with
  load_data(args, logger) -> Splits
  load_model(weights) -> a model handle, callable on float32 NHWC images in
      [-1, 1] (numpy), returning numpy features (N, D); its `devices` is
      the number of devices it splits a batch over
  feature_batches(model, splits, split, crop, batch, args)
      -> iterator of (features (b, D), labels (b,)) numpy batches, in order.
The weights are zoo.load_weights's (every --model form, in every backend).
"""
import dataclasses
import hashlib
import json
import os
import time

import numpy as np

import bit_hyperrule
from big_transfer import datasets, errors, flags, progress, runfiles, zoo
from big_transfer.errors import BadInput

SPLITS = ('train', 'eval')
FRAMEWORK_NAMES = {'pytorch': 'PyTorch', 'tf2': 'TF2', 'jax': 'JAX'}
DEFAULT_SHOTS = '1,5,10,25'
# big_vision's default regularisation for its linear few-shot evaluator.
DEFAULT_L2 = '1024'
# Added to each feature's standard deviation before dividing by it, as a
# fraction of the features' mean standard deviation. big_vision adds 1e-5;
# with few examples, a feature that is almost constant over them is then
# scaled up to the weight of the informative ones, and the accuracy hangs
# on rounding between backends whose images differ by less than one grey
# level (docs/fewshot.md gives the figures).
STD_FLOOR = 0.1


# --------------------------------------------------------------------------
# Command lines.

def _parser(description, *groups):
  parser = flags.parser(
      description, flags.model(), flags.dataset(), flags.loading(),
      flags.images(64, 'Resize images to this square size (default: the '
                   'HyperRule evaluation (crop) size for the dataset).'),
      *groups)
  # What the data loaders expect of fine-tuning's arguments.
  parser.set_defaults(examples_per_class=None, examples_per_class_seed=0)
  return parser


def features_argparser(framework):
  parent, g = flags.group('features')
  g.add_argument('--split', required=True, choices=SPLITS,
                 help='train, or eval: the split fine-tuning evaluates on.')
  g.add_argument('--out', required=True, metavar='FILE.npz',
                 help='Where the arrays features (N, D) and labels (N,) go.')
  return _parser(f'Write the pre-logit features of every example of a '
                 f'dataset split ({framework}).', parent)


def fewshot_argparser(framework):
  parent, g = flags.group('few-shot linear evaluation')
  g.add_argument('--shots', default=DEFAULT_SHOTS,
                 help='Examples per class, comma-separated.')
  g.add_argument('--seeds', type=int, default=3,
                 help='Draws of each few-shot subset (seeds 0, 1, ...).')
  g.add_argument('--l2', default=DEFAULT_L2,
                 help='L2 regularisation of the least-squares fit; several '
                 'comma-separated values give a row each (the first is the one '
                 'reported under "shots").')
  g.add_argument('--out', default=None, metavar='FILE.json',
                 help='Also write the results here as JSON.')
  g.add_argument('--cache_dir', default=None,
                 help='Keep features here and reuse them when model file, '
                 'data, split and resolution are the same.')
  return _parser(f'Few-shot linear evaluation of a BiT model\'s pre-logit '
                 f'features ({framework}).', parent)


def parse_list(text, flag, kind):
  try:
    values = [kind(v) for v in text.split(',') if v.strip()]
  except ValueError:
    values = []
  if not values or any(v <= 0 for v in values):
    raise BadInput(f'--{flag} {text!r}: give positive numbers, '
                   'comma-separated (e.g. --shots 1,5,10,25).')
  return values


def _check_common(args):
  flags.check_at_least(args, ('resolution', 'batch'))
  datasets.check_source(args)
  zoo.check_model(args.model)


# --------------------------------------------------------------------------
# Features.

@dataclasses.dataclass
class Splits:
  """A dataset as a backend loaded it: the classes, the typical image size,
  each split's size and labels (None where only known after reading it, as
  for streamed TFDS splits), and the backend's own data object."""
  num_classes: int
  original_hw: tuple
  sizes: dict
  labels: dict
  handle: object = None


def resolution(args, splits):
  """The evaluation resolution: --resolution, or the HyperRule's crop."""
  return bit_hyperrule.resolution(splits.original_hw,
                                  crop_size=args.resolution)[1]


@dataclasses.dataclass
class Features:
  features: np.ndarray   # float32 (N, D)
  labels: np.ndarray     # int64 (N,)
  seconds: float = 0.0   # time the extraction took (0 when read from cache)

  @property
  def images_per_sec(self):
    return len(self.labels) / self.seconds if self.seconds else None


def extract(backend, model, splits, split, crop, batch, args, logger):
  """Features of every example of `split`, in dataset order, with a
  progress bar; the time it took (first batch included) is in .seconds."""
  n = splits.sizes[split]
  logger.info(f'{split} split: {n} images at {crop} px, batches of {batch}')
  feats, labels = [], []
  start = time.perf_counter()
  for f, y in progress.images(
      backend.feature_batches(model, splits, split, crop, batch, args), n,
      lambda batch: len(batch[1]), f'features ({split})'):
    feats.append(np.asarray(f, np.float32))
    labels.append(np.asarray(y, np.int64))
  seconds = time.perf_counter() - start
  out = Features(np.concatenate(feats), np.concatenate(labels), seconds)
  if len(out.labels) != n:
    raise AssertionError(f'{len(out.labels)} features for {n} examples')
  logger.info(f'{split}: {n} feature vectors of {out.features.shape[1]} in '
              f'{seconds:.1f}s ({out.images_per_sec:.1f} images/s)')
  return out


def save_features(path, feats, info):
  """features, labels (and info, a JSON string) as an .npz, atomically."""
  return zoo.save_npz(path, {'features': feats.features,
                                 'labels': feats.labels,
                                 'info': np.array(json.dumps(info))})


def load_features(path):
  with np.load(path, allow_pickle=False) as f:
    return Features(f['features'], f['labels'])


def _cache_path(args, framework, splits, split, crop, weights_file):
  key = json.dumps([framework, runfiles.file_stamp(weights_file),
                    args.dataset, split,
                    source_of(splits, split).fingerprint(), crop])
  digest = hashlib.sha256(key.encode()).hexdigest()[:16]
  name = f'{framework}-{args.dataset}-{split}-{crop}px-{digest}.npz'
  return os.path.join(args.cache_dir, name)


def _weights_file(args):
  # The file the features come from (for the cache key); registered names
  # resolve to the file in --bit_pretrained_dir (or the bundled one).
  if os.path.isdir(args.model):
    return os.path.join(args.model, runfiles.MODEL)
  if os.path.isfile(args.model):
    return args.model
  info = zoo.MODELS.get(args.model)
  if info is None:
    return None  # hf-hub:...: no cache
  if info.path:
    return info.path
  for fmt, url in (('npz', info.url), ('h5', info.h5_url)):
    path = url and os.path.join(args.bit_pretrained_dir, info.filename(fmt))
    if path and os.path.exists(path):
      return path
  return None


def _info(args, framework, split, crop, n):
  return {'framework': framework, 'model': args.model, 'dataset': args.dataset,
          'datadir': args.datadir, 'split': split, 'resolution': crop, 'n': n}


def features_main(args, backend):
  """The `bit_*.features` command; returns the Features written."""
  _check_common(args)
  runfiles.check_out(args.out)
  zoo.fetch(args.bit_pretrained_dir, args.model)  # downloads before the data
  logger = runfiles.console_logger('fewshot', stamped=True)
  splits = backend.load_data(args, logger)
  model = backend.load_model(zoo.load_weights(args.model,
                                              args.bit_pretrained_dir))
  crop = resolution(args, splits)
  feats = extract(backend, model, splits, args.split, crop, args.batch, args,
                  logger)
  info = _info(args, backend.NAME, args.split, crop, len(feats.labels))
  info.update(images_per_sec=feats.images_per_sec, devices=model.devices)
  save_features(args.out, feats, info)
  logger.info(f'wrote {args.out}: features {feats.features.shape}, labels '
              f'{feats.labels.shape}')
  return feats


# --------------------------------------------------------------------------
# The least-squares classifier.

# Products of more multiply-adds than this run in float32 (Gram matrix,
# scores); smaller ones, and every solve, in float64. 1,000 classes x 25
# shots of 2048 features is 1e11: float32 halves its time.
FLOAT32_ABOVE = 1e9


def _dtype(work):
  return np.float32 if work > FLOAT32_ABOVE else np.float64


@dataclasses.dataclass
class Ridge:
  """A linear classifier on standardised features: argmax of
  ((x - mean) / std) @ w + b."""
  mean: np.ndarray
  std: np.ndarray
  w: np.ndarray   # (D, classes)
  b: np.ndarray   # (classes,)

  def scores(self, x):
    x = np.asarray(x)
    dtype = _dtype(x.size * self.w.shape[1])
    z = x.astype(dtype, copy=False) - self.mean.astype(dtype)
    z /= self.std.astype(dtype)
    return z @ self.w.astype(dtype) + self.b.astype(dtype)

  def predict(self, x, chunk=8192):
    return np.concatenate([np.argmax(self.scores(x[i:i + chunk]), axis=1)
                           for i in range(0, len(x), chunk)])

  def accuracy(self, x, labels):
    return float(np.mean(self.predict(x) == np.asarray(labels)))


def fit_ridge(x, labels, num_classes, l2s):
  """[Ridge for each l2 in `l2s`] fitted to (x, one-hot labels).

  Minimises |z w + b - onehot|^2 + l2 |w|^2 over w and b, where z is x
  standardised with its own per-feature mean and std (the std plus
  STD_FLOOR times the mean std, so that no feature is scaled up by more
  than 1 / STD_FLOOR of the typical scale). Since z is centred, the
  intercept is the mean target and w solves the centred problem in closed
  form: (z'z + l2 I)^-1 z'(t - mean t) when there are at least as many
  examples as features, else z'(zz' + l2 I)^-1 (t - mean t). The Gram
  matrix is formed once for all l2 values (in float32 when large), each
  system solved by Cholesky in float64.
  """
  import scipy.linalg
  import scipy.sparse
  x = np.asarray(x)
  labels = np.asarray(labels)
  n, d = x.shape
  mean = x.mean(axis=0, dtype=np.float64)
  std = x.std(axis=0, dtype=np.float64)
  std = np.maximum(std + STD_FLOOR * std.mean(), 1e-12)
  dtype = _dtype(n * d * min(n, d))
  z = x.astype(dtype, copy=False) - mean.astype(dtype)
  z /= std.astype(dtype)
  onehot = scipy.sparse.csr_matrix(
      (np.ones(n, dtype), (labels, np.arange(n))), shape=(num_classes, n))
  b = np.asarray(onehot.sum(axis=1), np.float64).ravel() / n
  primal = n >= d
  gram = np.asarray(z.T @ z if primal else z @ z.T, np.float64)
  # rhs: z' (t - mean t) = z' t, as z is centred; the dual needs t centred.
  rhs = (np.asarray((onehot @ z).T, np.float64) if primal else
         onehot.T.toarray().astype(np.float64) - b)
  out = []
  for l2 in l2s:
    a = gram.copy()
    a[np.diag_indices_from(a)] += l2
    sol = scipy.linalg.cho_solve(scipy.linalg.cho_factor(
        a, overwrite_a=True, check_finite=False), rhs, check_finite=False)
    w = sol if primal else z.T.astype(np.float64) @ sol
    out.append(Ridge(mean, std, w, b))
  return out


# --------------------------------------------------------------------------
# The evaluation: shots x seeds x l2.

def check_shots(labels, shots):
  """BadInput (exit 2) when a class has fewer training examples than the
  largest k; cheap, so it runs before any feature is extracted."""
  datasets.fewshot_indices(labels, max(shots), 0)


def evaluate(train, test, num_classes, shots, seeds, l2s, logger=None):
  """{l2: {k: [top-1 of seed 0, 1, ...]}} and the fit times in seconds."""
  results = {l2: {k: [] for k in shots} for l2 in l2s}
  fit_seconds = []
  for k in shots:
    for seed in range(seeds):
      idx = datasets.fewshot_indices(train.labels, k, seed)
      start = time.perf_counter()
      models = fit_ridge(train.features[idx], train.labels[idx], num_classes,
                         l2s)
      fit_seconds.append(time.perf_counter() - start)
      for l2, ridge in zip(l2s, models):
        results[l2][k].append(ridge.accuracy(test.features, test.labels))
      if logger:
        logger.info(f'{k}-shot, seed {seed}: top-1 ' + ', '.join(
            f'{results[l2][k][-1]:.1%} (l2 {l2:g})' for l2 in l2s) +
                    f'; fit {fit_seconds[-1] * 1000:.0f} ms')
  return results, fit_seconds


def table(results):
  """Markdown: top-1 (%) median, min and max over seeds, per k and l2."""
  lines = ['| shots | l2 | top-1 median | min | max |',
           '| --- | --- | --- | --- | --- |']
  for k in next(iter(results.values())):
    for l2, by_k in results.items():
      accs = 100 * np.asarray(by_k[k])
      lines.append(f'| {k} | {l2:g} | {np.median(accs):.1f} | '
                   f'{accs.min():.1f} | {accs.max():.1f} |')
  return '\n'.join(lines)


def _by_k(by_k):
  return {str(k): v for k, v in by_k.items()}


def split_features(backend, model, splits, split, crop, args, logger):
  """Features of `split`, from --cache_dir when there, else extracted (and
  put there)."""
  weights_file = args.cache_dir and _weights_file(args)
  path = weights_file and _cache_path(args, backend.NAME, splits, split, crop,
                                      weights_file)
  if path and os.path.exists(path):
    logger.info(f'{split} features from the cache: {path}')
    return load_features(path)
  feats = extract(backend, model, splits, split, crop, args.batch, args,
                  logger)
  if path:
    os.makedirs(args.cache_dir, exist_ok=True)
    save_features(path, feats, _info(args, backend.NAME, split, crop,
                                     len(feats.labels)))
  return feats


def command(backend):
  """(argparser, main, cli) of `python -m bit_BACKEND.fewshot`, where
  `backend` is that backend's features module: its `cli(argv)` runs the
  command with one line and exit status 2 on bad input."""
  return _command(fewshot_argparser, fewshot_main, backend)


def features_command(backend):
  """(argparser, main, cli) of `python -m bit_BACKEND.features`, where
  `backend` is that features module."""
  return _command(features_argparser, features_main, backend)


def _command(make_parser, run, backend):
  def argparser():
    return make_parser(FRAMEWORK_NAMES[backend.NAME])

  def main(args):
    return run(args, backend)

  def cli(argv=None):
    errors.run_cli(lambda: main(argparser().parse_args(argv)))
  return argparser, main, cli


def fewshot_main(args, backend):
  """The `bit_*.fewshot` command; returns the JSON-ready result."""
  _check_common(args)
  shots = parse_list(args.shots, 'shots', int)
  l2s = parse_list(args.l2, 'l2', float)
  flags.check_at_least(args, ('seeds',))
  if args.out:
    runfiles.check_out(args.out)
  zoo.fetch(args.bit_pretrained_dir, args.model)  # downloads before the data
  logger = runfiles.console_logger('fewshot', stamped=True)
  splits = backend.load_data(args, logger)
  if splits.labels['train'] is not None:
    check_shots(splits.labels['train'], shots)
  model = backend.load_model(zoo.load_weights(args.model,
                                              args.bit_pretrained_dir))
  crop = resolution(args, splits)
  feats = {split: split_features(backend, model, splits, split, crop, args,
                                 logger) for split in SPLITS}
  check_shots(feats['train'].labels, shots)
  results, fit_seconds = evaluate(feats['train'], feats['eval'],
                                  splits.num_classes, shots, args.seeds, l2s,
                                  logger)
  text = table(results)
  out = {
      'shots': _by_k(results[l2s[0]]), 'l2': l2s[0],
      'seeds': args.seeds, 'framework': backend.NAME, 'model': args.model,
      'dataset': args.dataset, 'resolution': crop,
      'num_classes': splits.num_classes,
      'train_size': len(feats['train'].labels),
      'eval_size': len(feats['eval'].labels),
      'feature_dim': int(feats['train'].features.shape[1]),
      'images_per_sec': {s: f.images_per_sec for s, f in feats.items()},
      'fit_seconds_max': max(fit_seconds), 'table': text,
  }
  if len(l2s) > 1:
    out['by_l2'] = {f'{l2:g}': _by_k(r) for l2, r in results.items()}
  print(f'\nFew-shot linear top-1 (%) of {args.model} on {args.dataset} '
        f'({out["eval_size"]} evaluation images, {crop} px, {args.seeds} '
        f'seeds; {backend.NAME})\n\n{text}\n', flush=True)
  if args.out:
    runfiles.write_json(args.out, out)
  return out


# --------------------------------------------------------------------------
# The data of the backends, which read big_transfer.datasets.

def splits_of(data):
  """The Splits of a datasets.Data (its `handle`)."""
  return Splits(data.num_classes, tuple(data.original_hw),
                {'train': len(data.train), 'eval': len(data.val)},
                {'train': data.train.labels, 'eval': data.val.labels}, data)


def source_of(splits, split):
  """The datasets.Source of `split` ('train' or 'eval')."""
  return splits.handle.train if split == 'train' else splits.handle.val


def padded(images, devices):
  """`images` (numpy, N first) with rows of zeros after them, up to a
  multiple of `devices`, to be split evenly over them."""
  images = np.asarray(images)
  extra = flags.round_up(len(images), devices) - len(images)
  return np.concatenate([images, np.zeros((extra, *images.shape[1:]),
                                          images.dtype)]) if extra else images


def loader_feature_batches(model, splits, split, crop, batch, args):
  """feature_batches of the backends that read through big_transfer.loader
  (JAX, TF2), for a model with `devices`: (features, labels) of `split` in
  order, `batch` rounded up to a multiple of the devices."""
  # Imported here: PyTorch's install has no grain.
  from big_transfer import loader  # pylint: disable=import-outside-toplevel
  for b in loader.eval_batches(source_of(splits, split),
                               flags.round_up(batch, model.devices), crop,
                               workers=args.workers):
    yield model(b['image'])[b['mask']], b['label'][b['mask']]
