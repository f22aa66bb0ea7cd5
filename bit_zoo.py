"""The model zoo: every published BiT model by name (architecture, head size,
address), and their weight files: download, reading, checking against an
architecture, and the architecture read back from a file.

Weights travel between the three backends as {published key: array} in the
layout of the published `.npz` files (kernels HWIO).
"""
import dataclasses
import os
import re
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile

import numpy as np

from bit_common import BadInput


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


