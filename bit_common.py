"""What the three backends share: the CLI, logging, run outputs, the model
registry, weight files (download, reading, checking), datasets that are not
framework-specific, and the few-shot sampler.

A backend never re-implements anything that lives here.
"""
import argparse
import dataclasses
import json
import logging
import os
import platform
import re
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile

import numpy as np

import bit_hyperrule

# --------------------------------------------------------------------------
# Errors: bad input ends a command with one line and exit status 2.


class BadInput(Exception):
  """Something the user gave is wrong; the message says what to do."""


def run_cli(main, *args, **kwargs):
  """Runs `main`; a BadInput becomes one line on stderr and exit status 2."""
  try:
    return main(*args, **kwargs)
  except BadInput as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


# --------------------------------------------------------------------------
# Architectures and the model registry.

BASE_URL = 'https://storage.googleapis.com/bit_models/'

# ResNet depth -> units in each of the four blocks.
DEPTHS = {
    14: (1, 1, 1, 1),
    26: (2, 2, 2, 2),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}
PUBLISHED_ARCHS = ('R50x1', 'R50x3', 'R101x1', 'R101x3', 'R152x2', 'R152x4')
H5_ARCHS = ('R50x1', 'R50x3', 'R101x1', 'R101x3', 'R152x4')
VTAB_ARCHS = ('R50x1', 'R101x1', 'R50x3', 'R101x3', 'R152x4')
# VTAB-1k task -> number of classes.
VTAB_TASKS = {
    'caltech101': 102, 'diabetic_retinopathy': 5, 'dtd': 47,
    'oxford_flowers102': 102, 'oxford_iiit_pet': 37, 'resisc45': 45,
    'sun397': 397, 'cifar100': 100, 'eurosat': 10, 'patch_camelyon': 2,
    'smallnorb-elevation': 9, 'svhn': 10, 'dsprites-orientation': 16,
    'smallnorb-azimuth': 18, 'clevr-distance': 6, 'clevr-count': 8,
    'dmlab': 6, 'kitti-distance': 4, 'dsprites-xpos': 16,
}
LABEL_FILES = {
    1000: 'ilsvrc2012_wordnet_lemmas.txt',
    21843: 'imagenet21k_wordnet_lemmas.txt',
}
LABEL_URLS = {f: BASE_URL + f for f in (
    'ilsvrc2012_wordnet_lemmas.txt', 'imagenet21k_wordnet_ids.txt',
    'imagenet21k_wordnet_lemmas.txt')}


@dataclasses.dataclass(frozen=True)
class Architecture:
  units: tuple   # units in each of the four blocks
  width: float   # width multiplier: the root has 64 * width channels

  @property
  def name(self):
    depth = 3 * sum(self.units) + 2
    return f'R{depth}x{self.width:g}'


def parse_arch(name):
  """'R50x1' -> Architecture((3, 4, 6, 3), 1)."""
  m = re.fullmatch(r'R(\d+)x(\d+(?:\.\d+)?)', name)
  if not m or int(m.group(1)) not in DEPTHS:
    raise BadInput(f'unknown architecture {name!r}; use R<depth>x<width> with '
                   f'depth in {sorted(DEPTHS)}, e.g. R50x1.')
  width = float(m.group(2))
  if (64 * width) % 32:
    raise BadInput(f'width {width:g} gives {64 * width:g} root channels; '
                   'GroupNorm needs a multiple of 32 (use 0.5, 1, 1.5, ...).')
  return Architecture(DEPTHS[int(m.group(1))], width)


@dataclasses.dataclass(frozen=True)
class ModelInfo:
  name: str
  arch: str          # e.g. 'R50x1'
  head_size: int     # classes of the file's head
  url: str = None    # where the .npz is published (None: ships with us)
  h5_url: str = None
  path: str = None   # a bundled file, relative to this repository
  labels: str = None  # its class names, one a line (relative to the repo)

  @property
  def architecture(self):
    return parse_arch(self.arch)

  def filename(self, fmt='npz'):
    url = self.h5_url if fmt == 'h5' else self.url
    return os.path.basename(url) if url else os.path.basename(self.path)


MODELS = {}


def register(info):
  MODELS[info.name] = info
  return info


def _register_published():
  for arch in PUBLISHED_ARCHS:
    for family, head in (('S', 1000), ('M', 21843)):
      name = f'BiT-{family}-{arch}'
      register(ModelInfo(name, arch, head, f'{BASE_URL}{name}.npz',
                         f'{BASE_URL}{name}.h5' if arch in H5_ARCHS else None))
    name = f'BiT-M-{arch}-ILSVRC2012'
    register(ModelInfo(name, arch, 1000, f'{BASE_URL}{name}.npz'))
  register(ModelInfo('BiT-M-R50x1-CIFAR10', 'R50x1', 10,
                     f'{BASE_URL}BiT-M-R50x1-CIFAR10.npz'))
  for arch in VTAB_ARCHS:
    for run in range(3):
      for task, classes in VTAB_TASKS.items():
        name = f'BiT-M-{arch}-run{run}-{task}'
        register(ModelInfo(name, arch, classes, f'{BASE_URL}vtab/{name}.npz'))
  for arch, file, alias in (('R50x1', 'R50x1_224', 'BiT-M-R50x1-distilled-224'),
                            ('R50x1', 'R50x1_160', 'BiT-M-R50x1-distilled-160'),
                            ('R152x2', 'R152x2_T_224', 'BiT-M-R152x2-teacher-224'),
                            ('R152x2', 'R152x2_T_384', 'BiT-M-R152x2-teacher-384')):
    register(ModelInfo(alias, arch, 1000, f'{BASE_URL}distill/{file}.npz'))


_register_published()
# Bundled with this repository, so it works offline: an R14x0.5 pre-trained
# on Fashion-MNIST (class x quarter-turn: 40 classes). Provenance:
# bit_models/BiT-R14x0.5-FashionMNIST.md.
register(ModelInfo('BiT-R14x0.5-FashionMNIST', 'R14x0.5', 40,
                   path='bit_models/BiT-R14x0.5-FashionMNIST.npz',
                   labels='bit_models/BiT-R14x0.5-FashionMNIST.labels.txt'))
REPO_DIR = os.path.dirname(os.path.abspath(__file__))


def model_info(name):
  if name not in MODELS:
    close = [m for m in MODELS if name.lower() in m.lower()][:5]
    hint = f' Did you mean {", ".join(close)}?' if close else ''
    raise BadInput(f'unknown model {name!r}: give a registered name (see '
                   f'--help) or a path to a .npz file.{hint}')
  return MODELS[name]


# --------------------------------------------------------------------------
# Weight files: download, read, check.

def download(url, dest, opener=urllib.request.urlopen, verify=None):
  """Fetches `url` into `dest` atomically, with a progress bar.

  The data goes to a temporary file beside `dest`, is checked by `verify`
  (which raises on a bad file), and only then renamed to `dest`. Whatever
  goes wrong, no partial file is left behind, so a new call starts afresh.
  """
  from tqdm import tqdm
  folder = os.path.dirname(os.path.abspath(dest))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=f'.{os.path.basename(dest)}.',
                             suffix='.part')
  try:
    with os.fdopen(fd, 'wb') as f, opener(url) as response:
      total = int(response.headers.get('Content-Length') or 0)
      done = 0
      with tqdm(total=total or None, unit='B', unit_scale=True,
                desc=os.path.basename(dest), file=sys.stderr) as bar:
        while chunk := response.read(1 << 20):
          f.write(chunk)
          done += len(chunk)
          bar.update(len(chunk))
      if total and done != total:
        raise OSError(f'connection closed after {done} of {total} bytes')
    if verify:
      verify(tmp)
    os.replace(tmp, dest)
  except (urllib.error.URLError, OSError, BadInput) as e:
    reason = getattr(e, 'reason', None) or e
    raise BadInput(f'could not download {url} ({reason}); fetch it yourself '
                   f'and put it at {os.path.abspath(dest)}') from e
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return dest


def weights_path(model, pretrained_dir='.', fmt='npz', opener=None):
  """The local file for `model` (a registered name or a file path).

  A registered model missing from `pretrained_dir` is downloaded there.
  """
  if model.endswith(('.npz', '.h5')):
    if not os.path.isfile(model):
      raise BadInput(f'weights file {model} does not exist.')
    return model
  info = model_info(model)
  if info.path:
    return os.path.join(REPO_DIR, info.path)
  url = info.h5_url if fmt == 'h5' else info.url
  if url is None:
    raise BadInput(f'{model} is not published as .{fmt}; use its .npz.')
  dest = os.path.join(pretrained_dir, os.path.basename(url))
  if not os.path.exists(dest):
    verify = load_npz if fmt == 'npz' else None
    download(url, dest, opener or urllib.request.urlopen, verify)
  return dest


def _canonical_key(key):
  # Some published files number their convolutions: standardized_conv2d_3.
  return re.sub(r'standardized_conv2d_\d+', 'standardized_conv2d', key)


def load_npz(path):
  """{published key: array} from a BiT .npz file; refuses unreadable files."""
  try:
    with np.load(path, allow_pickle=False) as f:
      weights = {_canonical_key(k): f[k] for k in f.files}
  except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
    raise BadInput(f'{path} is not a readable .npz file ({e}); delete it and '
                   'download or export it again.') from e
  if not weights or not all(k.startswith('resnet/') for k in weights):
    raise BadInput(f'{path} is not a BiT checkpoint: its keys do not start '
                   'with "resnet/".')
  return weights


def save_npz(path, weights):
  """Writes {key: array} atomically as an uncompressed .npz."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, suffix='.npz.part')
  try:
    with os.fdopen(fd, 'wb') as f:
      np.savez(f, **weights)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def unit_name(block, unit):
  return f'resnet/block{block}/unit{unit:02d}'


def expected_shapes(arch, head_size=None):
  """{published key: shape} of a checkpoint for `arch` (an Architecture).

  With head_size None the head is left out (fine-tuning replaces it).
  """
  w = arch.width
  root = int(64 * w)
  shapes = {'resnet/root_block/standardized_conv2d/kernel': (7, 7, 3, root)}
  cin = root
  for b, units in enumerate(arch.units, start=1):
    cmid = int(64 * w * 2 ** (b - 1))
    cout = 4 * cmid
    for u in range(1, units + 1):
      p = unit_name(b, u)
      shapes[f'{p}/a/group_norm/gamma'] = (cin,)
      shapes[f'{p}/a/group_norm/beta'] = (cin,)
      shapes[f'{p}/a/standardized_conv2d/kernel'] = (1, 1, cin, cmid)
      for part in 'bc':
        shapes[f'{p}/{part}/group_norm/gamma'] = (cmid,)
        shapes[f'{p}/{part}/group_norm/beta'] = (cmid,)
      shapes[f'{p}/b/standardized_conv2d/kernel'] = (3, 3, cmid, cmid)
      shapes[f'{p}/c/standardized_conv2d/kernel'] = (1, 1, cmid, cout)
      if u == 1:
        shapes[f'{p}/a/proj/standardized_conv2d/kernel'] = (1, 1, cin, cout)
      cin = cout
  shapes['resnet/group_norm/gamma'] = (cin,)
  shapes['resnet/group_norm/beta'] = (cin,)
  if head_size is not None:
    shapes['resnet/head/conv2d/kernel'] = (1, 1, cin, head_size)
    shapes['resnet/head/conv2d/bias'] = (head_size,)
  return shapes


def check_weights(weights, arch, head_size=None, source='checkpoint'):
  """Raises BadInput unless `weights` has exactly the keys `arch` needs, in
  shape (head keys aside when head_size is None)."""
  expected = expected_shapes(arch, head_size)
  extra = sorted(k for k in weights if k not in expected and
                 not (head_size is None and k.startswith('resnet/head/')))
  if extra:
    raise BadInput(f'{source} has {extra[0]}, which {arch.name} does not '
                   f'have ({len(extra)} such keys); it was made for another '
                   'architecture.')
  for key, shape in expected.items():
    if key not in weights:
      raise BadInput(f'{source} has no {key} (needed by {arch.name}); it was '
                     'made for another architecture or is damaged.')
    if tuple(weights[key].shape) != shape:
      raise BadInput(f'{source}: {key} has shape {tuple(weights[key].shape)} '
                     f'but {arch.name} needs {shape}.')


def model_arch(model, head_size=None, weights=None):
  """(Architecture, head size) for a registered name, an architecture name
  ('R50x1') or a weights dict (read from its shapes); `head_size` wins over
  the file's or the registry's head."""
  if weights is not None:
    arch, default_head = infer_arch(weights)
  elif model in MODELS:
    arch, default_head = MODELS[model].architecture, MODELS[model].head_size
  else:
    arch, default_head = parse_arch(model), None
  head = head_size or default_head
  if head is None:
    raise BadInput(f'{model}: the head size is unknown; give one.')
  return arch, head


def infer_arch(weights):
  """(Architecture, head_size or None) of a checkpoint, from its shapes."""
  try:
    root = weights['resnet/root_block/standardized_conv2d/kernel'].shape[-1]
  except KeyError:
    raise BadInput('checkpoint has no root_block: not a BiT ResNet.') from None
  units = []
  for b in range(1, 5):
    n = 0
    while f'{unit_name(b, n + 1)}/a/standardized_conv2d/kernel' in weights:
      n += 1
    units.append(n)
  units = tuple(units)
  if units not in DEPTHS.values():
    raise BadInput(f'checkpoint has {units} units per block, which is no '
                   'known ResNet depth.')
  head = weights.get('resnet/head/conv2d/bias')
  return Architecture(units, root / 64), (None if head is None else
                                          int(head.shape[0]))


# --------------------------------------------------------------------------
# Command line.

TORCH_OR_TFDS_DATASETS = ('cifar10', 'cifar100', 'oxford_iiit_pet',
                          'oxford_flowers102', 'imagenet2012')


def argparser(known_models=None):
  """The CLI every `bit_*.train` shares (the original flags, then ours)."""
  known_models = list(known_models or MODELS)
  parser = argparse.ArgumentParser(
      description='Fine-tune a BiT model with the BiT-HyperRule.',
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument('--name', required=True,
                      help='Name of this run; outputs go to LOGDIR/NAME, and '
                      'a run started again with the same name resumes.')
  parser.add_argument('--model', default='BiT-M-R50x1',
                      help='A registered model (e.g. ' +
                      ', '.join(known_models[:4]) + ', ...; the full list is '
                      'in the README) or a path to a .npz file.')
  parser.add_argument('--logdir', required=True,
                      help='Where the log, metrics and checkpoints go.')
  parser.add_argument('--bit_pretrained_dir', default='.',
                      help='Where pre-trained weights are looked for, and '
                      'downloaded to when missing.')
  parser.add_argument('--dataset', default='cifar10',
                      choices=TORCH_OR_TFDS_DATASETS + ('imagefolder',) +
                      tuple(ARRAY_DATASETS),
                      help='Dataset to fine-tune on; imagefolder reads '
                      'DATADIR/train/<class>/* and DATADIR/val (or test)/...')
  parser.add_argument('--datadir', default=None,
                      help='Dataset folder: the image folder, the ImageNet '
                      'root, or where a downloadable dataset is stored.')
  parser.add_argument('--tfds_manual_dir', default=None,
                      help='TFDS manual_dir, for datasets TFDS cannot '
                      'download itself (TF2 and JAX).')
  parser.add_argument('--examples_per_class', type=int, default=None,
                      help='Few-shot: draw this many training examples from '
                      'each class.')
  parser.add_argument('--examples_per_class_seed', type=int, default=0,
                      help='Seed of the few-shot draw.')
  parser.add_argument('--batch', type=int, default=512,
                      help='Global batch size.')
  parser.add_argument('--batch_split', type=int, default=1,
                      help='Split each batch into this many micro-batches and '
                      'accumulate their gradients (saves memory).')
  parser.add_argument('--batch_eval', type=int, default=None,
                      help='Evaluation batch size (default: BATCH / '
                      'BATCH_SPLIT).')
  parser.add_argument('--base_lr', type=float, default=0.003,
                      help='Base learning rate of the HyperRule schedule.')
  parser.add_argument('--eval_every', type=int, default=None,
                      help='Evaluate every N steps (and always at the end).')
  parser.add_argument('--workers', type=int, default=min(8, os.cpu_count()),
                      help='Data-loading workers.')
  parser.add_argument('--no-save', dest='save', action='store_false',
                      help='Write no checkpoint.')
  parser.add_argument('--total_steps', type=int, default=None,
                      help='Stretch or compress the HyperRule schedule to this '
                      'many steps, keeping its shape.')
  parser.add_argument('--resize_size', type=int, default=None,
                      help='Override the HyperRule resize resolution.')
  parser.add_argument('--crop_size', type=int, default=None,
                      help='Override the HyperRule crop resolution.')
  parser.add_argument('--seed', type=int, default=0,
                      help='Seed of every random choice of the run.')
  parser.add_argument('--precision', default='fp32',
                      choices=('fp32', 'bf16', 'fp16'),
                      help='Compute precision.')
  parser.add_argument('--skip_bad_images', action='store_true',
                      help='Leave out unreadable images instead of stopping.')
  return parser


def check_args(args, devices=1):
  """Refuses flag values that cannot work, before any long work starts."""
  for flag in ('batch', 'batch_split', 'total_steps', 'resize_size',
               'crop_size', 'eval_every', 'batch_eval', 'examples_per_class'):
    value = getattr(args, flag, None)
    if value is not None and value < 1:
      raise BadInput(f'--{flag} must be a positive number, got {value}.')
  if args.batch % (args.batch_split * devices):
    raise BadInput(f'--batch {args.batch} is not divisible by --batch_split '
                   f'{args.batch_split} times {devices} device(s); choose a '
                   'multiple of their product.')
  if args.dataset in ('imagefolder', 'imagenet2012') and not args.datadir:
    raise BadInput(f'--dataset {args.dataset} needs --datadir.')
  if args.datadir and args.dataset == 'imagefolder' and not os.path.isdir(
      args.datadir):
    raise BadInput(f'--datadir {args.datadir} is not a folder.')
  if (args.resize_size and args.crop_size and
      args.crop_size > args.resize_size):
    raise BadInput(f'--crop_size {args.crop_size} is larger than '
                   f'--resize_size {args.resize_size}.')
  if not args.model.endswith(('.npz', '.h5')):
    model_info(args.model)


def backend_argparser(add_flags):
  """The shared parser plus a backend's own flags (`add_flags(parser)`)."""
  return add_flags(argparser())


def with_backend_defaults(args, add_flags):
  """`args` from the shared parser, completed with the defaults of the
  backend's own flags (for in-process use)."""
  defaults = add_flags(argparse.ArgumentParser()).parse_args([])
  return argparse.Namespace(**{**vars(defaults), **vars(args)})


def resolution(args, original_hw):
  """(resize, crop): the HyperRule's for images of `original_hw`, with the
  --resize_size/--crop_size overrides."""
  resize, crop = bit_hyperrule.get_resolution(original_hw)
  if args.crop_size and not args.resize_size:
    resize = max(args.crop_size, round(args.crop_size * resize / crop))
  return args.resize_size or resize, args.crop_size or crop


# --------------------------------------------------------------------------
# Logging and run outputs under LOGDIR/NAME.

def run_dir(args):
  return os.path.join(args.logdir, args.name)


def setup_logger(args):
  """Logger to stderr and LOGDIR/NAME/train.log."""
  os.makedirs(run_dir(args), exist_ok=True)
  logger = logging.getLogger(f'bit.{args.name}')
  logger.setLevel(logging.INFO)
  logger.propagate = False
  for h in list(logger.handlers):
    logger.removeHandler(h)
    h.close()
  fmt = logging.Formatter('%(asctime)s %(levelname)s %(message)s',
                          '%Y-%m-%d %H:%M:%S')
  for h in (logging.StreamHandler(sys.stderr),
            logging.FileHandler(os.path.join(run_dir(args), 'train.log'))):
    h.setFormatter(fmt)
    logger.addHandler(h)
  return logger


def write_json(path, obj):
  """Writes `obj` as JSON atomically (temporary file, then rename)."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, suffix='.json.part')
  with os.fdopen(fd, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=_json_default)
    f.write('\n')
  os.replace(tmp, path)


def _json_default(obj):
  if isinstance(obj, np.generic):
    return obj.item()
  if isinstance(obj, (np.ndarray, tuple, set)):
    return list(obj)
  return str(obj)


class Metrics:
  """Appends one JSON object per line to LOGDIR/NAME/metrics.jsonl.

  On resume, lines from steps after the checkpoint are dropped first, so the
  file reads as one uninterrupted run.
  """

  def __init__(self, args, resume_step=0):
    self.path = os.path.join(run_dir(args), 'metrics.jsonl')
    kept = []
    if resume_step and os.path.exists(self.path):
      with open(self.path) as f:
        kept = [l for l in f if l.strip() and json.loads(l)['step'] <= resume_step]
    self._file = open(self.path, 'w')
    self._file.writelines(kept)
    self._file.flush()

  def write(self, step, split, **values):
    record = {'step': int(step), 'split': split}
    record.update({k: _json_default(v) if isinstance(v, np.generic) else v
                   for k, v in values.items()})
    self._file.write(json.dumps(record) + '\n')
    self._file.flush()

  def close(self):
    self._file.close()


def versions(*modules):
  out = {'python': platform.python_version(), 'numpy': np.__version__}
  for m in modules:
    out[m.__name__] = getattr(m, '__version__', '?')
  return out


class Progress:
  """Training progress: a tqdm bar on a terminal, else a line every 10%.

  Shows loss, lr, images/s and ETA either way.
  """

  def __init__(self, total_steps, start_step, logger):
    from tqdm import tqdm
    self.logger, self.total, self.step = logger, total_steps, start_step
    self._t0, self._step0 = time.time(), start_step
    self._tty = sys.stderr.isatty()
    self._bar = tqdm(total=total_steps, initial=start_step, unit='step',
                     file=sys.stderr, dynamic_ncols=True) if self._tty else None
    self._every = max(1, total_steps // 10)

  def update(self, step, images_per_sec, **values):
    self.step = step
    if self._bar is not None:
      self._bar.update(step - self._bar.n)
      self._bar.set_postfix(img_s=f'{images_per_sec:.1f}',
                            **{k: f'{v:.4g}' for k, v in values.items()})
    elif step % self._every == 0 or step == self.total:
      rate = (step - self._step0) / max(time.time() - self._t0, 1e-9)
      eta = (self.total - step) / rate if rate else float('inf')
      shown = ' '.join(f'{k}={v:.4g}' for k, v in values.items())
      self.logger.info(f'step {step}/{self.total} {shown} '
                       f'images/s={images_per_sec:.1f} ETA {eta:.0f}s')

  def close(self):
    if self._bar is not None:
      self._bar.close()


# --------------------------------------------------------------------------
# A fine-tuning run: what every trainer does the same way.

def run_logger(args, lead=True):
  """The run's logger on the lead process; a silent one elsewhere."""
  return setup_logger(args) if lead else logging.getLogger('bit.quiet')


def hyperrule(args, dataset_size, original_hw):
  """(resize, crop, schedule, mixup alpha) of a run: the BiT-HyperRule for
  its data, with the command line's overrides."""
  return (*resolution(args, original_hw),
          bit_hyperrule.get_schedule(dataset_size, args.total_steps),
          bit_hyperrule.get_mixup(dataset_size))


def run_settings(args, classes, dataset_size, schedule, resize, crop):
  """What a resumed run must share with the checkpoint it resumes."""
  return dict(model=args.model, dataset=args.dataset, classes=classes,
              dataset_size=dataset_size, batch=args.batch,
              schedule=list(schedule), resolution=[resize, crop],
              seed=args.seed, examples_per_class=args.examples_per_class,
              examples_per_class_seed=args.examples_per_class_seed,
              base_lr=args.base_lr)


def check_same_run(saved, run, where):
  """Refuses to resume from `where` when its settings differ from `run`."""
  differ = [k for k in run if saved.get(k) != run[k]]
  if differ:
    raise BadInput(
        f'{where} belongs to a run with other settings ('
        + ', '.join(f'{k}: {saved.get(k)!r} there, {run[k]!r} now'
                    for k in differ)[:500]
        + '); choose another --name or delete that folder.')


def log_validation(logger, step, result):
  logger.info(f'step {step}: validation loss {result["loss"]:.4f}, '
              f'top-1 {result["top1"]:.2%}, top-5 {result["top5"]:.2%} '
              f'({result["n"]} examples)')


def fine_tune_loop(args, step, n_train, train_step, evaluate, save, logger,
                   metrics, stop_vote=lambda stop: stop):
  """Runs the HyperRule schedule from `step` to its end; returns
  (final evaluation, step).

  `train_step(step, lr)` does the update of `step` and returns its loss; `evaluate(step)`
  evaluates (and checkpoints) at `step`; `save(step)` checkpoints when
  SIGINT/SIGTERM stops the run early, which then exits with 128 + signal.
  `metrics` is None on all but the lead process. `stop_vote(stop)` tells
  whether any process was asked to stop, so that all stop together.
  """
  import signal
  total = bit_hyperrule.get_schedule(n_train, args.total_steps)[-1]
  progress = Progress(total, step, logger) if metrics else None
  result = None
  with StopSignals() as signals:
    t0 = time.time()
    while step < total and not stop_vote(signals.signum is not None):
      lr = bit_hyperrule.get_lr(step, n_train, args.base_lr, args.total_steps)
      loss = train_step(step, lr)
      step += 1
      t1 = time.time()
      speed = args.batch / max(t1 - t0, 1e-9)
      t0 = t1
      if metrics:
        metrics.write(step, 'train', loss=loss, lr=lr, images_per_sec=speed)
        progress.update(step, speed, loss=loss, lr=lr)
      if args.eval_every and step % args.eval_every == 0 or step == total:
        result = evaluate(step)
        t0 = time.time()
    if step < total:
      save(step)
      logger.info(f'stopped by signal at step {step}/{total}'
                  + ('; run again with the same --name to resume.'
                     if args.save else '.'))
      raise SystemExit(128 + (signals.signum or signal.SIGTERM))
  if progress:
    progress.close()
  if result is None:  # Resumed after the last step: evaluate once more.
    result = evaluate(step)
  return result, step


def write_results(args, result, step, n_train, logger):
  """results.json, the last file a run writes."""
  write_json(os.path.join(run_dir(args), 'results.json'), dict(
      result, step=step, split='val', name=args.name, model=args.model,
      dataset=args.dataset, dataset_size=n_train,
      examples_per_class=args.examples_per_class))
  logger.info(f'done: top-1 {result["top1"]:.2%} after {step} steps.')


# --------------------------------------------------------------------------
# Few-shot sampling, shared so every backend draws the same subset.

def fewshot_indices(labels, examples_per_class, seed):
  """Sorted indices of `examples_per_class` examples from each class.

  Classes are visited in sorted order and each draws without replacement
  from a generator seeded with `seed`, so the same labels and seed give the
  same subset in every backend.
  """
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  chosen = []
  for c in np.unique(labels):
    idx = np.flatnonzero(labels == c)
    if len(idx) < examples_per_class:
      raise BadInput(f'class {c} has only {len(idx)} training examples; '
                     f'--examples_per_class {examples_per_class} needs more.')
    chosen.append(rng.choice(idx, examples_per_class, replace=False))
  return np.sort(np.concatenate(chosen))


# --------------------------------------------------------------------------
# Image folders: every backend reads them the same way.

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif',
                    '.tiff', '.webp')


@dataclasses.dataclass
class FileSplit:
  paths: list
  labels: np.ndarray


def _scan_split(folder, classes=None):
  found = sorted(d for d in os.listdir(folder)
                 if os.path.isdir(os.path.join(folder, d)))
  if classes is None:
    classes = found
  elif set(found) - set(classes):
    raise BadInput(f'{folder} has classes that train/ lacks: '
                   f'{sorted(set(found) - set(classes))}.')
  paths, labels = [], []
  for label, c in enumerate(classes):
    d = os.path.join(folder, c)
    files = sorted(f for f in os.listdir(d) if f.lower().endswith(
        IMAGE_EXTENSIONS)) if os.path.isdir(d) else []
    if not files and folder.endswith('train'):
      raise BadInput(f'class folder {d} has no images; add some or remove it.')
    paths += [os.path.join(d, f) for f in files]
    labels += [label] * len(files)
  return classes, FileSplit(paths, np.array(labels, dtype=np.int64))


def scan_imagefolder(datadir):
  """(classes, train split, evaluation split) of an image folder.

  Classes are the sorted subfolders of train/; files are sorted by name.
  The evaluation split is val/, or test/ where there is no val/.
  """
  train = os.path.join(datadir, 'train')
  if not os.path.isdir(train):
    raise BadInput(f'{datadir} has no train/ folder; expected '
                   'train/<class>/* and val/<class>/*.')
  evals = [os.path.join(datadir, s) for s in ('val', 'test')
           if os.path.isdir(os.path.join(datadir, s))]
  if not evals:
    raise BadInput(f'{datadir} has no val/ or test/ folder to evaluate on.')
  classes, train_split = _scan_split(train)
  if len(classes) < 2:
    raise BadInput(f'{train} has {len(classes)} class folder(s); need 2+.')
  _, eval_split = _scan_split(evals[0], classes)
  if not eval_split.paths:
    raise BadInput(f'{evals[0]} has no images.')
  return classes, train_split, eval_split


class BadImage(BadInput):
  """An image file that cannot be read."""

  @classmethod
  def of(cls, path, error):
    return cls(f'cannot read image {path} ({error}); delete or replace it, '
               'or pass --skip_bad_images to leave such files out.')


def _image_error(path, verify):
  from PIL import Image
  try:
    with Image.open(path) as im:
      if verify:
        im.verify()
    return None
  except Exception as e:  # pylint: disable=broad-except
    return e  # PIL raises many kinds of error on damaged files.


def readable_images(paths, skip=False, logger=None, verify=False):
  """Indices of the `paths` that open as images (headers read in threads;
  with `verify`, whole files checked, which also finds truncated ones).

  An unreadable file stops the run with its name (BadImage), or with `skip`
  is left out with a warning.
  """
  import concurrent.futures
  import functools
  with concurrent.futures.ThreadPoolExecutor(16) as pool:
    errors = list(pool.map(functools.partial(_image_error, verify=verify),
                           paths, chunksize=64))
  bad = [i for i, e in enumerate(errors) if e is not None]
  if bad and not skip:
    raise BadImage.of(paths[bad[0]], errors[bad[0]])
  for i in bad:
    if logger:
      logger.warning(f'leaving out unreadable image {paths[i]} ({errors[i]})')
  if len(bad) == len(paths):
    raise BadInput(f'no readable image among {len(paths)}.')
  return np.setdiff1d(np.arange(len(paths)), bad)


def image_sizes(paths, limit=256):
  """(height, width) of up to `limit` images spread over `paths`."""
  from PIL import Image
  step = max(1, len(paths) // limit)
  sizes = []
  for p in paths[::step][:limit]:
    try:
      with Image.open(p) as im:
        sizes.append((im.height, im.width))
    except OSError as e:
      raise BadInput(f'cannot read image {p} ({e}).') from e
  return sizes


# --------------------------------------------------------------------------
# Datasets that ship offline as arrays: uint8 images (N, H, W, 3) and labels.

@dataclasses.dataclass
class ArrayData:
  train_images: np.ndarray
  train_labels: np.ndarray
  val_images: np.ndarray
  val_labels: np.ndarray
  classes: list


def _gray_to_rgb(images):
  return np.repeat(images[..., None], 3, axis=-1)


def load_digits():
  """scikit-learn's handwritten digits (UCI): 8x8, 10 classes, 1797 images.

  The first 1000 images train, the other 797 evaluate.
  """
  from sklearn.datasets import load_digits as sk_digits
  d = sk_digits()
  images = _gray_to_rgb(np.round(d.images * 255 / 16).astype(np.uint8))
  labels = d.target.astype(np.int64)
  return ArrayData(images[:1000], labels[:1000], images[1000:], labels[1000:],
                   [str(i) for i in range(10)])


FASHION_MNIST_DIR = os.environ.get('FASHION_MNIST_DIR',
                                   '/usr/share/datasets/fashion-mnist')
FASHION_MNIST_CLASSES = ['T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat',
                         'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot']


def _read_idx(path):
  """An IDX file (optionally gzipped) as a uint8 array."""
  import gzip
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rb') as f:
    data = f.read()
  if len(data) < 4 or data[:3] != b'\x00\x00\x08':  # magic: 0, 0, uint8
    raise BadInput(f'{path} is not an IDX file of bytes.')
  ndim = data[3]
  shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], 'big')
                for i in range(ndim))
  array = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
  if array.size != int(np.prod(shape)):
    raise BadInput(f'{path} is truncated: {array.size} values for {shape}.')
  return array.reshape(shape)


def load_fashion_mnist(folder=None):
  """Zalando's Fashion-MNIST: 28x28 grey clothing photos, 10 classes,
  60000 train / 10000 test, read from the IDX files that Debian's
  dataset-fashion-mnist package installs (or $FASHION_MNIST_DIR)."""
  folder = folder or FASHION_MNIST_DIR
  def read(stem):
    for name in (f'{stem}.gz', stem):
      if os.path.exists(os.path.join(folder, name)):
        return _read_idx(os.path.join(folder, name))
    raise BadInput(f'Fashion-MNIST is not in {folder} (no {stem}.gz); install '
                   'it with "apt-get install dataset-fashion-mnist" or set '
                   'FASHION_MNIST_DIR to a folder with its IDX files.')
  return ArrayData(_gray_to_rgb(read('train-images-idx3-ubyte')),
                   read('train-labels-idx1-ubyte').astype(np.int64),
                   _gray_to_rgb(read('t10k-images-idx3-ubyte')),
                   read('t10k-labels-idx1-ubyte').astype(np.int64),
                   list(FASHION_MNIST_CLASSES))


ARRAY_DATASETS = {'digits': load_digits, 'fashion_mnist': load_fashion_mnist}


def load_array_dataset(name):
  return ARRAY_DATASETS[name]()


# --------------------------------------------------------------------------
# Prediction: everything but the forward pass, shared by the predict CLIs.

def predict_argparser(framework):
  parser = argparse.ArgumentParser(
      description=f'Classify images with a BiT model ({framework}).',
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument('inputs', nargs='+',
                      help='Image files and/or folders (searched recursively).')
  parser.add_argument('--model', default='BiT-M-R50x1-ILSVRC2012',
                      help='A registered model or a path to a .npz file.')
  parser.add_argument('--bit_pretrained_dir', default='.',
                      help='Where weights and label files are looked for; '
                      'missing registered weights are downloaded there.')
  parser.add_argument('--resolution', type=int, default=None,
                      help='Resize images to this square size (default: the '
                      'HyperRule crop size for the images given).')
  parser.add_argument('--labels', default=None,
                      help='Class names, one a line (default: the model\'s '
                      'own, or the ImageNet label file in '
                      '--bit_pretrained_dir for 1000/21843-class heads).')
  parser.add_argument('--top_k', type=int, default=5,
                      help='How many classes to print per image.')
  parser.add_argument('--batch', type=int, default=32,
                      help='Images per forward pass.')
  parser.add_argument('--save_logits', default=None, metavar='FILE.npy',
                      help='Also save the logits, (images, classes), here.')
  return parser


def list_images(inputs):
  """Image files named in `inputs` (files or folders), folders sorted."""
  paths = []
  for item in inputs:
    if os.path.isdir(item):
      paths += sorted(os.path.join(d, f) for d, _, files in os.walk(item)
                      for f in files if f.lower().endswith(IMAGE_EXTENSIONS))
    elif os.path.isfile(item):
      paths.append(item)
    else:
      raise BadInput(f'{item} is neither an image file nor a folder.')
  if not paths:
    raise BadInput(f'no images found in {", ".join(inputs)}.')
  return paths


def load_image(path, size):
  """uint8 (size, size, 3) RGB array: the image resized bilinearly."""
  from PIL import Image
  try:
    with Image.open(path) as im:
      return np.asarray(im.convert('RGB').resize((size, size),
                                                 Image.BILINEAR))
  except OSError as e:
    raise BadInput(f'cannot read image {path} ({e}).') from e


def to_model_input(images):
  """uint8 RGB images -> float32 in [-1, 1], the range BiT models take."""
  return (np.asarray(images, np.float32) - 127.5) / 127.5


def read_labels(path):
  with open(path) as f:
    return [line.strip() for line in f if line.strip()]


def label_names(args, head_size, logger=None):
  """Class names for a head of `head_size`, or None where none are known."""
  path = args.labels
  info = MODELS.get(args.model)
  if path is None and info is not None and info.labels:
    path = os.path.join(REPO_DIR, info.labels)
  if path is None and head_size in LABEL_FILES:
    path = os.path.join(args.bit_pretrained_dir, LABEL_FILES[head_size])
    if not os.path.exists(path):
      if logger:
        logger.info(f'no label names: fetch {LABEL_URLS[LABEL_FILES[head_size]]}'
                    f' into {args.bit_pretrained_dir} to see them.')
      return None
  if path is None:
    return None
  if not os.path.exists(path):
    raise BadInput(f'label file {path} does not exist.')
  names = read_labels(path)
  if len(names) != head_size:
    raise BadInput(f'{path} has {len(names)} names but the model has '
                   f'{head_size} classes.')
  return names


def predict(args, load_model, logger=None, read_weights=None):
  """The predict CLI's work, given the backend's `load_model(weights)` that
  returns (head_size, logits_fn: float32 NHWC batch -> numpy logits), and
  optionally its `read_weights(model, pretrained_dir)` -> {key: array}
  (default: the .npz)."""
  if args.top_k < 1 or args.batch < 1:
    raise BadInput('--top_k and --batch must be positive.')
  paths = list_images(args.inputs)
  read_weights = read_weights or (lambda model, folder: load_npz(
      weights_path(model, folder)))
  weights = read_weights(args.model, args.bit_pretrained_dir)
  head_size, logits_fn = load_model(weights)
  names = label_names(args, head_size, logger)
  size = args.resolution or bit_hyperrule.get_resolution_from_image_sizes(
      image_sizes(paths))[1]
  logits = []
  for i in range(0, len(paths), args.batch):
    batch = np.stack([load_image(p, size) for p in paths[i:i + args.batch]])
    logits.append(np.asarray(logits_fn(to_model_input(batch)), np.float32))
  logits = np.concatenate(logits)
  if args.save_logits:
    np.save(args.save_logits, logits)
  probs = np.exp(logits - logits.max(1, keepdims=True))
  probs /= probs.sum(1, keepdims=True)
  k = min(args.top_k, head_size)
  for path, p in zip(paths, probs):
    top = np.argsort(-p, kind='stable')[:k]
    shown = ', '.join(f'{names[c] if names else c} ({p[c]:.1%})' for c in top)
    print(f'{path}: {shown}')
  return logits


# --------------------------------------------------------------------------
# Stopping cleanly: SIGINT/SIGTERM ask a training loop to stop at the next
# step (where it writes its checkpoint) instead of killing it.

class StopSignals:
  """Context manager; `signum` is the first SIGINT/SIGTERM received, or None.

  Handlers are only installed from the main thread (elsewhere it is inert).
  """

  def __init__(self):
    self.signum, self._old = None, {}

  def __enter__(self):
    import signal
    import threading
    if threading.current_thread() is threading.main_thread():
      for s in (signal.SIGINT, signal.SIGTERM):
        self._old[s] = signal.signal(s, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.signum = signum
    # A second signal of the same kind acts as if we were not here (a
    # second Ctrl-C interrupts at once).
    import signal
    signal.signal(signum, self._old[signum])

  def __exit__(self, *exc):
    import signal
    for s, old in self._old.items():
      signal.signal(s, old)
