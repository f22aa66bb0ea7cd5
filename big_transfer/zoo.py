"""The model zoo: every published BiT model by name (architecture, head size,
address), and their weight files: download, reading, checking against an
architecture, and the architecture read back from a file.

Weights travel between the three backends as {published key: array} in the
layout of the published `.npz` files (kernels HWIO).
"""
import dataclasses
import importlib.resources
import json
import os
import re
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile

import numpy as np

from big_transfer import runfiles, vtab
from big_transfer.errors import BadInput


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
LABEL_FILES = {
    1000: 'ilsvrc2012_wordnet_lemmas.txt',
    21843: 'imagenet21k_wordnet_lemmas.txt',
}
DOWNLOAD_TIMEOUT_S = 60  # a server silent this long is given up
PROBE_TIMEOUT_S = 10  # whether a server answers at all, before a download


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
  path: str = None   # the file, where it ships with the package
  labels: str = None  # its class names, one a line (a shipped file)

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
      for task in vtab.TASKS.values():
        name = f'BiT-M-{arch}-run{run}-{task.name}'
        register(ModelInfo(name, arch, task.num_classes,
                           f'{BASE_URL}vtab/{name}.npz'))
  for arch, file, alias in (('R50x1', 'R50x1_224', 'BiT-M-R50x1-distilled-224'),
                            ('R50x1', 'R50x1_160', 'BiT-M-R50x1-distilled-160'),
                            ('R152x2', 'R152x2_T_224', 'BiT-M-R152x2-teacher-224'),
                            ('R152x2', 'R152x2_T_384', 'BiT-M-R152x2-teacher-384')):
    register(ModelInfo(alias, arch, 1000, f'{BASE_URL}distill/{file}.npz'))


_register_published()


def asset(name):
  """The path of a file that ships inside the package (big_transfer/assets)."""
  return str(importlib.resources.files(__package__).joinpath('assets', name))


# Bundled with the package, so it works offline: an R14x0.5 pre-trained on
# Fashion-MNIST (class x quarter-turn: 40 classes). Provenance:
# big_transfer/assets/BiT-R14x0.5-FashionMNIST.md.
register(ModelInfo('BiT-R14x0.5-FashionMNIST', 'R14x0.5', 40,
                   path=asset('BiT-R14x0.5-FashionMNIST.npz'),
                   labels=asset('BiT-R14x0.5-FashionMNIST.labels.txt')))


def model_info(name):
  if name not in MODELS:
    close = [m for m in MODELS if name.lower() in m.lower()][:5]
    hint = f' Did you mean {", ".join(close)}?' if close else ''
    raise BadInput(f'unknown model {name!r}: give a registered name (see '
                   f'--help) or a path to a .npz file.{hint}')
  return MODELS[name]


# --------------------------------------------------------------------------
# Weight files: download, read, check.

def download(url, dest, opener=None, verify=None):
  """Fetches `url` into `dest` atomically, with a progress bar.

  The data goes to a temporary file beside `dest`, is synced to disk,
  checked by `verify` (which raises on a bad file), and only then renamed
  to `dest` (and the folder synced), so that a power cut leaves `dest`
  whole or absent. Whatever
  goes wrong, a server silent for DOWNLOAD_TIMEOUT_S included, no partial
  file is left behind, so a new call starts afresh, nor a folder that it
  made for `dest`. `opener` stands in for urllib's urlopen.
  """
  from tqdm import tqdm
  folder = os.path.dirname(os.path.abspath(dest))
  made = runfiles.missing_folders(folder)
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=f'.{os.path.basename(dest)}.',
                             suffix='.part')
  try:
    with os.fdopen(fd, 'wb') as f, (opener or urllib.request.urlopen)(
        url, timeout=DOWNLOAD_TIMEOUT_S) as response:
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
      f.flush()
      os.fsync(f.fileno())  # on disk before its name is: as runfiles.replaced
    if verify:
      verify(tmp)
    os.replace(tmp, dest)
    runfiles.sync_folder(folder)
  except (urllib.error.URLError, OSError, BadInput) as e:
    reason = getattr(e, 'reason', None) or e
    raise BadInput(f'could not download {url} ({reason}); fetch it yourself '
                   f'and put it at {os.path.abspath(dest)}') from e
  finally:
    if os.path.exists(tmp):  # failed: nothing of it is left behind
      os.remove(tmp)
      runfiles.remove_empty(made)
  return dest


def weights_path(model, pretrained_dir='.', fmt=None, opener=None):
  """The local file for `model` (a registered name or a file path).

  A registered model is read from `pretrained_dir` in format `fmt` ('npz'
  or 'h5'); with `fmt` None, as `.npz` where that file is there, else as
  the published `.h5` where that one is. A file missing from
  `pretrained_dir` is downloaded there (the `.npz` when `fmt` is None).
  """
  if model.endswith(('.npz', '.h5')):
    _check_file(model)
    return model
  info = model_info(model)
  if info.path:
    return info.path
  if fmt is None:
    local_h5 = info.h5_url and os.path.join(pretrained_dir,
                                            info.filename('h5'))
    fmt = ('h5' if local_h5 and os.path.exists(local_h5) and not
           os.path.exists(os.path.join(pretrained_dir, info.filename('npz')))
           else 'npz')
  url = info.h5_url if fmt == 'h5' else info.url
  if url is None:
    raise BadInput(f'{model} is not published as .{fmt}; use its .npz.')
  dest = os.path.join(pretrained_dir, os.path.basename(url))
  if not os.path.exists(dest):
    verify = load_npz if fmt == 'npz' else None
    download(url, dest, opener, verify)
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
  """Writes {key: array} as an uncompressed .npz, whole or not at all
  (runfiles.replaced)."""
  with runfiles.replaced(path, 'wb') as f:
    np.savez(f, **weights)
  return path


# --------------------------------------------------------------------------
# Published Keras-2 .h5 files, read by variable name.

# Where a Keras-2 variable name ends, e.g. the tail of
# 'block1/resnet/block1/unit01/a/group_norm/gamma:0'.
_H5_VARIABLE = re.compile(
    r'(root_block/standardized_conv2d(?:_\d+)?/kernel'
    r'|block\d+/unit\d+/[abc]/(?:proj/)?(?:group_norm/(?:gamma|beta)'
    r'|standardized_conv2d(?:_\d+)?/kernel)'
    r'|group_norm/(?:gamma|beta)'
    r'|head/(?:dense|conv2d)/(?:kernel|bias))(?::\d+)?$')


def load_h5(path):
  """{published key: array} from a BiT Keras-2 `.h5` weights file.

  Every dataset is matched by the ending of its name, so the file's group
  layout and layer order do not matter; a Dense head (C, K) becomes the
  published 1x1 convolution (1, 1, C, K). Refuses unknown datasets.
  """
  try:
    import h5py  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise BadInput(f'{path} is an .h5 file: reading it needs h5py '
                   '(pip install h5py).') from e
  weights = {}

  def visit(name, obj):
    if not isinstance(obj, h5py.Dataset) or name.startswith(
        'optimizer_weights'):
      return
    m = _H5_VARIABLE.search(name)
    if not m:
      raise BadInput(f'{path}: dataset {name} is no BiT ResNet variable; '
                     'is this a BiT .h5 file?')
    key = _canonical_key('resnet/' + m.group(1).split(':')[0])
    array = obj[()]
    if key == 'resnet/head/dense/kernel':
      key, array = 'resnet/head/conv2d/kernel', array[None, None]
    key = key.replace('head/dense/', 'head/conv2d/')
    if key in weights:
      raise BadInput(f'{path}: {key} appears twice (again as {name}).')
    weights[key] = array

  try:
    with h5py.File(path, 'r') as f:
      f.visititems(visit)
  except OSError as e:
    raise BadInput(f'{path} is not a readable .h5 file ({e}); delete it '
                   'and download it again.') from e
  if not weights:
    raise BadInput(f'{path} holds no BiT weights.')
  return weights


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
# One entry point for weights: a registered name, a file, a run folder or a
# Hugging Face Hub repository, always as {published key: float32 array}.

HF_HUB_PREFIX = 'hf-hub:'
# Tried in this order in a Hub repository (timm and transformers both
# publish safetensors; older repositories only the PyTorch pickle).
HF_HUB_FILES = ('model.safetensors', 'pytorch_model.bin')


def load_weights(model, pretrained_dir='.'):
  """{published key: float32 array} for `model`, checked for NaN/inf.

  `model` is a registered name (its `.npz` or published `.h5` in
  `pretrained_dir`, the `.npz` downloaded there when missing), a `.npz` or
  `.h5` path (the published Keras-2 files), a run folder holding
  `model.npz`, or
  `hf-hub:ORG/NAME[@REVISION]`: a timm or transformers BiT checkpoint on the
  Hugging Face Hub (safetensors or .bin), fetched and cached by
  huggingface_hub (its cache, HF_HUB_OFFLINE honoured) and mapped to the
  published layout. Hub files are checked against the architecture read
  from their own shapes, so nothing in them is silently skipped.
  """
  check_model(model)
  if model.startswith(HF_HUB_PREFIX):
    path = hub_file(model[len(HF_HUB_PREFIX):])
    state = read_torch_file(path)
    if torch_layout_format(state) == 'transformers':
      check_transformers_config(os.path.join(os.path.dirname(path),
                                             'config.json'), model)
    weights = from_torch_layout(state, source=path)
    arch, head = infer_arch(weights)
    check_weights(weights, arch, head, source=path)
  else:
    if os.path.isdir(model) and os.path.isfile(os.path.join(
        model, runfiles.MODEL)):
      model = os.path.join(model, runfiles.MODEL)
    if model.endswith(('.safetensors', '.bin')):
      path = model
      weights = from_torch_layout(read_torch_file(path), source=path)
    else:
      path = weights_path(model, pretrained_dir)
      weights = load_h5(path) if path.endswith('.h5') else load_npz(path)
  weights = {k: np.asarray(v, np.float32) for k, v in weights.items()}
  check_finite(weights, path)
  return weights


def fetch(pretrained_dir, *models):
  """Makes each of `models` local without reading it: a registered model's
  file is downloaded into `pretrained_dir` where missing, a Hub
  repository's into the Hugging Face cache (a local file is left to
  check_model). Commands call it before they read the data, so that a
  failed download is reported before long work, and call load_weights
  after."""
  for model in models:
    if model.startswith(HF_HUB_PREFIX):
      hub_file(model[len(HF_HUB_PREFIX):])
    elif model in MODELS:
      weights_path(model, pretrained_dir)


def check_model(model):
  """Refuses a --model value that names nothing loadable, at once and
  without the network: it must be a registered name, a weights file
  (.npz, .h5, .safetensors, .bin) that exists (it is read later), a run
  folder holding model.npz, or hf-hub:ORG/NAME[@REVISION]."""
  if model.startswith(HF_HUB_PREFIX):
    repo_id = model[len(HF_HUB_PREFIX):].partition('@')[0]
    if repo_id.count('/') != 1 or not all(repo_id.split('/')):
      raise BadInput(f'{model}: give a repository as hf-hub:ORG/NAME '
                     '(optionally @REVISION), e.g. '
                     'hf-hub:timm/resnetv2_50x1_bit.goog_in21k')
  elif os.path.isdir(model):
    if not os.path.isfile(os.path.join(model, runfiles.MODEL)):
      raise BadInput(f'{model} is a folder without model.npz; give a run '
                     'folder, a weights file or a registered name.')
  elif model.endswith(('.npz', '.h5', '.safetensors', '.bin')):
    _check_file(model)
  else:
    model_info(model)
  return model


def _check_file(path):
  """Refuses a weights file that does not exist; where its name is a
  registered model's file, says how to name that model instead."""
  if os.path.isfile(path):
    return
  name = os.path.splitext(os.path.basename(path))[0]
  hint = (f' For the registered {name}, give --model {name}: its file is '
          'looked for in --bit_pretrained_dir and downloaded there.'
          if name in MODELS and os.path.dirname(path) == '' else '')
  raise BadInput(f'weights file {path} does not exist.{hint}')


def check_finite(weights, source='checkpoint'):
  """Refuses weights holding NaN or infinite values, naming the key."""
  for key, value in weights.items():
    if not np.all(np.isfinite(value)):
      bad = int(np.size(value) - np.count_nonzero(np.isfinite(value)))
      raise BadInput(f'{source}: {key} holds {bad} NaN or infinite values; '
                     'the file is damaged or came from a diverged run. Use '
                     'another checkpoint.')
  return weights


# {(repository, cache folder): its weight file} resolved in this process: a
# command fetches the weights before it reads the data and loads them after,
# and asks the Hub only the first time.
_HUB_FILES_RESOLVED = {}


def hub_file(repo):
  """Local path of a Hub repository's weight file, via huggingface_hub's
  cache (downloaded there when missing, unless HF_HUB_OFFLINE is set);
  the Hub is asked once per process."""
  try:
    import huggingface_hub
    from huggingface_hub import constants, errors
  except ImportError as e:
    raise BadInput('hf-hub: models need the huggingface_hub package: '
                   'pip install huggingface_hub') from e
  check_model(HF_HUB_PREFIX + repo)
  resolved = (repo, constants.HF_HUB_CACHE)
  if os.path.isfile(_HUB_FILES_RESOLVED.get(resolved, '')):
    return _HUB_FILES_RESOLVED[resolved]
  repo_id, _, revision = repo.partition('@')
  offline = constants.HF_HUB_OFFLINE
  # Where the Hub does not answer, huggingface_hub would retry for about
  # 25 s before it said that the file is not in the cache.
  unreachable = None if offline else _hub_silence()
  missing = []
  for filename in HF_HUB_FILES:
    try:
      _HUB_FILES_RESOLVED[resolved] = huggingface_hub.hf_hub_download(
          repo_id, filename, revision=revision or None,
          local_files_only=offline or unreachable is not None)
      return _HUB_FILES_RESOLVED[resolved]
    except errors.LocalEntryNotFoundError as e:  # not in the cache
      missing.append(filename)
      if not offline and unreachable is None:  # the Hub stopped answering
        unreachable = e.__cause__ or e
    except errors.EntryNotFoundError:  # not in the repository
      missing.append(filename)
    except errors.RepositoryNotFoundError as e:
      raise BadInput(f'hf-hub:{repo}: no such repository on the Hub (or it '
                     'is private: log in with `hf auth login`).') from e
    except errors.RevisionNotFoundError as e:
      raise BadInput(f'hf-hub:{repo}: no revision {revision!r}.') from e
    except (errors.HfHubHTTPError, OSError, ValueError) as e:
      raise BadInput(f'hf-hub:{repo}: could not fetch {filename} ({e}).') \
          from e
  files = ' nor '.join(missing)
  if offline:
    raise BadInput(f'hf-hub:{repo}: neither {files} is in the local Hugging '
                   'Face cache, and HF_HUB_OFFLINE is set: run once online, '
                   f'or `hf download {repo_id}`.')
  if unreachable is not None:
    reason = str(unreachable).splitlines()[0] if str(unreachable) else \
        type(unreachable).__name__
    raise BadInput(f'hf-hub:{repo}: the Hugging Face Hub is unreachable '
                   f'({reason}) and the local cache has neither {files}; '
                   f'connect, or fill the cache (`hf download {repo_id}`) '
                   'and set HF_HUB_OFFLINE=1.')
  raise BadInput(f'hf-hub:{repo}: the repository has neither {files}; is '
                 'it a timm or transformers BiT model?')


def _hub_silence():
  """None where the Hugging Face Hub answers one request (sent as
  huggingface_hub sends its own: proxies, certificates); else the error."""
  from huggingface_hub import constants, utils
  try:
    utils.get_session().head(constants.ENDPOINT, timeout=PROBE_TIMEOUT_S)
    return None
  except Exception as e:  # pylint: disable=broad-except
    return e  # the transport errors of its HTTP client, which has changed


def check_transformers_config(path, model):
  """Refuses a transformers BiT whose config.json (when the repository has
  one beside the weights) asks for another network than BiT's: TF-style
  'SAME' padding or a post-activation ('bottleneck') ResNet."""
  if not os.path.isfile(path):
    try:  # fetched beside the weights, or from the cache when offline
      import huggingface_hub
      repo_id, _, revision = model[len(HF_HUB_PREFIX):].partition('@')
      path = huggingface_hub.hf_hub_download(repo_id, 'config.json',
                                             revision=revision or None)
    except Exception:  # pylint: disable=broad-except
      return  # no config: the keys and shapes are checked all the same
  try:
    with open(path) as f:
      config = json.load(f)
  except (OSError, ValueError) as e:
    raise BadInput(f'{path} is not readable JSON ({e}).') from e
  padding = str(config.get('global_padding') or '').upper()
  if config.get('layer_type', 'preactivation') != 'preactivation' or \
      padding == 'SAME' or config.get('embedding_dynamic_padding'):
    raise BadInput(f'{model}: its config.json asks for layer_type='
                   f'{config.get("layer_type")!r}, global_padding='
                   f'{config.get("global_padding")!r}, embedding_dynamic_'
                   f'padding={config.get("embedding_dynamic_padding")!r}; '
                   'BiT models here are pre-activation ResNets with fixed '
                   'symmetric padding (like google/bit-50).')


def read_torch_file(path):
  """{name: float32 numpy array} of a safetensors file (read without torch)
  or of a PyTorch `.bin` state dict (needs torch)."""
  if path.endswith('.safetensors'):
    from safetensors import SafetensorError
    try:
      from safetensors.numpy import load_file
      try:
        return load_file(path)
      except (TypeError, KeyError):  # bfloat16 and the like: through torch
        from safetensors.torch import load_file as load_torch
        return {k: v.float().numpy() for k, v in load_torch(path).items()}
    except (SafetensorError, OSError, ValueError) as e:
      raise BadInput(f'{path} is not a readable safetensors file ({e}); '
                     'delete it and fetch it again.') from e
  try:
    import torch
  except ImportError as e:
    raise BadInput(f'{path} is a PyTorch pickle: reading it needs torch '
                   '(pip install torch); or use a .safetensors file.') from e
  try:
    state = torch.load(path, map_location='cpu', weights_only=True)
  except (OSError, RuntimeError, EOFError, ValueError) as e:
    raise BadInput(f'{path} is not a readable PyTorch state dict ({e}); '
                   'delete it and fetch it again.') from e
  if isinstance(state, dict) and isinstance(state.get('state_dict'), dict):
    state = state['state_dict']
  if not isinstance(state, dict):
    raise BadInput(f'{path} holds no state dict.')
  return {k: v.float().numpy() for k, v in state.items()
          if isinstance(v, torch.Tensor)}


# Parameter names inside one pre-activation unit: timm and transformers use
# the same ones; -> published names relative to the unit.
_UNIT_KEYS = {
    'norm1.weight': 'a/group_norm/gamma', 'norm1.bias': 'a/group_norm/beta',
    'conv1.weight': 'a/standardized_conv2d/kernel',
    'norm2.weight': 'b/group_norm/gamma', 'norm2.bias': 'b/group_norm/beta',
    'conv2.weight': 'b/standardized_conv2d/kernel',
    'norm3.weight': 'c/group_norm/gamma', 'norm3.bias': 'c/group_norm/beta',
    'conv3.weight': 'c/standardized_conv2d/kernel',
    'downsample.conv.weight': 'a/proj/standardized_conv2d/kernel',
}
# (format, pattern of a unit's prefix, {whole key: published key}).
_LAYOUTS = {
    'timm': (r'stages\.(\d+)\.blocks\.(\d+)\.', {
        'stem.conv.weight': 'resnet/root_block/standardized_conv2d/kernel',
        'norm.weight': 'resnet/group_norm/gamma',
        'norm.bias': 'resnet/group_norm/beta',
        'head.fc.weight': 'resnet/head/conv2d/kernel',
        'head.fc.bias': 'resnet/head/conv2d/bias'}),
    'transformers': (r'(?:bit\.)?encoder\.stages\.(\d+)\.layers\.(\d+)\.', {
        'embedder.convolution.weight':
            'resnet/root_block/standardized_conv2d/kernel',
        'norm.weight': 'resnet/group_norm/gamma',
        'norm.bias': 'resnet/group_norm/beta',
        'classifier.1.weight': 'resnet/head/conv2d/kernel',
        'classifier.1.bias': 'resnet/head/conv2d/bias'}),
}


def torch_layout_format(state):
  """'timm' or 'transformers' from the keys of a PyTorch BiT state dict."""
  if 'stem.conv.weight' in state:
    return 'timm'
  if any(k in state for k in ('bit.embedder.convolution.weight',
                              'embedder.convolution.weight')):
    return 'transformers'
  return None


def from_torch_layout(state, source='checkpoint'):
  """{published key: array} from a timm or transformers BiT state dict
  (kernels OIHW, a Linear or 1x1-conv head); every key must map."""
  fmt = torch_layout_format(state)
  if fmt is None:
    raise BadInput(f'{source} is neither a timm nor a transformers BiT '
                   f'checkpoint (it has {", ".join(sorted(state)[:3])}, ...; '
                   'expected stem.conv.weight or '
                   'bit.embedder.convolution.weight).')
  unit_re, whole = _LAYOUTS[fmt]
  unit_re = re.compile(unit_re)
  weights = {}
  for key, value in state.items():
    name = key[4:] if fmt == 'transformers' and key.startswith('bit.') else key
    m = unit_re.match(key)
    if m and key[m.end():] in _UNIT_KEYS:
      published = (f'{unit_name(int(m.group(1)) + 1, int(m.group(2)) + 1)}/'
                   f'{_UNIT_KEYS[key[m.end():]]}')
    elif name in whole:
      published = whole[name]
    else:
      raise BadInput(f'{source}: {key} is no parameter of a BiT ResNet-v2 '
                     f'({fmt} layout); is this a BiT checkpoint (not a '
                     'batch-norm ResNet-v2 or a hybrid backbone)?')
    value = np.asarray(value, np.float32)
    if published.endswith('/kernel'):
      if value.ndim == 2:  # a Linear head (K, C) -> (1, 1, C, K)
        value = value.T[None, None]
      elif value.ndim == 4:  # OIHW -> HWIO
        value = value.transpose(2, 3, 1, 0)
      else:
        raise BadInput(f'{source}: {key} has shape {value.shape}, no '
                       'convolution kernel.')
    weights[published] = np.ascontiguousarray(value)
  return weights


def to_timm_layout(weights):
  """{timm state-dict key: array (OIHW)} from published weights: the
  inverse of `from_torch_layout` for timm's ResNetV2."""
  inverse_unit = {v: k for k, v in _UNIT_KEYS.items()}
  inverse_whole = {v: k for k, v in _LAYOUTS['timm'][1].items()}
  unit_re = re.compile(r'resnet/block(\d+)/unit(\d+)/(.*)$')
  state = {}
  for key, value in weights.items():
    m = unit_re.match(key)
    if m:
      name = (f'stages.{int(m.group(1)) - 1}.blocks.{int(m.group(2)) - 1}.'
              f'{inverse_unit[m.group(3)]}')
    else:
      name = inverse_whole[key]
    value = np.asarray(value, np.float32)
    if value.ndim == 4:
      value = value.transpose(3, 2, 0, 1)
    state[name] = np.ascontiguousarray(value)
  return state


def known_models(build):
  """The original repository's KNOWN_MODELS for one backend: {registered
  name: constructor(head_size=None, zero_head=False)}, where the backend's
  `build(architecture, head_size, zero_head)` makes its model."""
  def constructor(info):
    def make(head_size=None, zero_head=False):
      return build(info.architecture, head_size or info.head_size, zero_head)
    make.__doc__ = f'{info.name}: {info.arch}, {info.head_size}-class head.'
    return make
  return {name: constructor(info) for name, info in MODELS.items()}
