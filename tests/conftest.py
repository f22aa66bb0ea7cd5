"""Fixtures every test may use: synthetic BiT checkpoints and image folders.

Nothing here touches the network.
"""
import atexit
import functools
import os
import shutil
import tempfile
import threading

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')


def _scratch_folder(variable, prefix):
  """Names a new temporary folder in `variable`, removed at exit."""
  os.environ[variable] = tempfile.mkdtemp(prefix=prefix)
  atexit.register(shutil.rmtree, os.environ[variable], True)


# The package's cache (big_transfer.runfiles.cache_dir) of the tests and of
# the commands they start, apart from the user's: one per test process.
_scratch_folder('BIT_CACHE', 'bit_cache_')
# JAX's persistent compilation cache, one for the whole session: the tests'
# tiny runs compile the same steps again and again, in the test processes
# and the commands they start. The process that starts the session (not a
# pytest-xdist worker, which inherits it) makes it and removes it. A run
# reads a step compiled by another run of the same program, so the same
# command twice still compiles nothing differently. JAX reads these
# variables when it is imported.
if 'PYTEST_XDIST_WORKER' not in os.environ:
  _scratch_folder('JAX_COMPILATION_CACHE_DIR', 'bit_jax_cache_')
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  # The temporary folder of the pytest-xdist workers and of every command
  # the tests start, removed with the session: the commands that the tests
  # kill leave what their exit would have removed (multiprocessing's
  # pymp-*, torchrun's torchelastic_*, TensorFlow's autograph files), and
  # TFDS leaves an empty folder each time it looks up an unprepared
  # dataset's metadata; a suite left about 600 of them. This process keeps
  # the folder it already uses (tempfile read it above), where pytest keeps
  # the tests' tmp_path.
  _scratch_folder('TMPDIR', 'bit_tests_tmp_')
  # torch's Inductor cache too: importing torchvision (below) makes the
  # cache's folder, under this process's /tmp, and puts it in
  # TORCHINDUCTOR_CACHE_DIR, which every process started after inherits.
  os.environ['TORCHINDUCTOR_CACHE_DIR'] = os.path.join(os.environ['TMPDIR'],
                                                       'torchinductor')

# One thread per process, for PyTorch (OMP_NUM_THREADS, read when torch
# starts) in the test processes and in every process they start: the suite
# runs two at a time on two cores. With two threads beside a busy core,
# PyTorch's threads wait for each other at every operation (figures in
# docs/development.md). And results that tests compare exactly between an
# in-process run and a command need the same thread count in both.
os.environ['OMP_NUM_THREADS'] = '1'

# torchvision (through triton, in torch's CUDA wheels) crashes when it is
# imported after TensorFlow in one process; imported first, both work. Tests
# of every backend share one pytest process, so settle the order here.
import torch  # noqa: E402,F401
import torchvision  # noqa: E402,F401
# TensorFlow's results repeat from run to run only with one inter-op thread
# (bit_tf2.engine.deterministic), which can be set only before TF starts:
# the in-process TF runs of the tests get it here.
from bit_tf2 import engine as tf2_engine  # noqa: E402

tf2_engine.deterministic()

from big_transfer import datasets, progress  # noqa: E402


# Units per block of each depth: R50, R101 and R152 as published; the
# smaller R14 and R26 of the tests follow depth = 3 x units + 2 as they do.
UNITS = {14: (1, 1, 1, 1), 26: (2, 2, 2, 2), 50: (3, 4, 6, 3),
         101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


def published_shapes(arch, head_size):
  """{key: shape} of a BiT checkpoint of `arch` ('R50x1'), written from the
  published layout (the original repository's .npz files) and nothing of
  this project: keys under resnet/; kernels HWIO; the root convolution
  7x7 to 64w channels; in block b, cmid = 64 w 2^(b-1) and cout = 4 cmid;
  each unit's a, b, c parts a GroupNorm then a standardised convolution
  (1x1 cin->cmid, 3x3 cmid->cmid, 1x1 cmid->cout), the first unit of a
  block with a 1x1 projection cin->cout; a final GroupNorm; a 1x1 head."""
  depth, width = arch[1:].split('x')
  w = float(width)
  shapes = {'resnet/root_block/standardized_conv2d/kernel':
                (7, 7, 3, int(64 * w))}
  cin = int(64 * w)
  for b, units in enumerate(UNITS[int(depth)], start=1):
    cmid = int(64 * w * 2 ** (b - 1))
    cout = 4 * cmid
    for u in range(1, units + 1):
      unit = f'resnet/block{b}/unit{u:02d}'
      # (The order of the keys decides which random draw goes where.)
      shapes[f'{unit}/a/group_norm/gamma'] = (cin,)
      shapes[f'{unit}/a/group_norm/beta'] = (cin,)
      shapes[f'{unit}/a/standardized_conv2d/kernel'] = (1, 1, cin, cmid)
      for part in 'bc':
        shapes[f'{unit}/{part}/group_norm/gamma'] = (cmid,)
        shapes[f'{unit}/{part}/group_norm/beta'] = (cmid,)
      shapes[f'{unit}/b/standardized_conv2d/kernel'] = (3, 3, cmid, cmid)
      shapes[f'{unit}/c/standardized_conv2d/kernel'] = (1, 1, cmid, cout)
      if u == 1:
        shapes[f'{unit}/a/proj/standardized_conv2d/kernel'] = (1, 1, cin,
                                                               cout)
      cin = cout
  shapes['resnet/group_norm/gamma'] = shapes['resnet/group_norm/beta'] = (
      cin,)
  shapes['resnet/head/conv2d/kernel'] = (1, 1, cin, head_size)
  shapes['resnet/head/conv2d/bias'] = (head_size,)
  return shapes


def synthetic_weights(arch='R14x0.5', head_size=10, seed=0):
  """{published key: array} for `arch`, drawn at random from the published
  layout (published_shapes), not from this project's table nor any
  backend's model, so it checks the loaders independently."""
  rng = np.random.default_rng(seed)
  weights = {}
  for key, shape in published_shapes(arch, head_size).items():
    if key.endswith('gamma'):
      value = 1 + 0.1 * rng.standard_normal(shape)
    elif key.endswith(('beta', 'bias')):
      value = 0.1 * rng.standard_normal(shape)
    else:
      value = rng.standard_normal(shape) * (0.05 if 'head' in key else 1)
    weights[key] = value.astype(np.float32)
  return weights


def tied_max_pool_case(size):
  """(x, dy, want) for the stem's 3x3 max pool of stride 2: x of few
  distinct values, so that many windows hold ties; want: the gradient
  computed by hand, each window's dy added at its first maximum in
  row-major order (PyTorch's rule)."""
  rng = np.random.default_rng(size)
  x = rng.integers(0, 3, (2, size, size + 1, 3)).astype(np.float32)
  dy = rng.normal(size=(2, (size - 3) // 2 + 1, (size - 2) // 2 + 1, 3))
  dy = dy.astype(np.float32)
  want = np.zeros_like(x)
  for n, a, b, c in np.ndindex(*dy.shape):
    window = x[n, 2 * a:2 * a + 3, 2 * b:2 * b + 3, c]
    i, j = np.unravel_index(np.argmax(window), (3, 3))  # the first maximum
    want[n, 2 * a + i, 2 * b + j, c] += dy[n, a, b, c]
  return x, dy, want


@pytest.fixture
def make_npz(tmp_path):
  """make_npz(arch, head_size, seed, name) -> path of a synthetic .npz."""
  def make(arch='R14x0.5', head_size=10, seed=0, name=None):
    path = tmp_path / (name or f'{arch}-{head_size}-{seed}.npz')
    np.savez(path, **synthetic_weights(arch, head_size, seed))
    return str(path)
  return make


def group_norm_inputs(shape, seed=7):
  """(x, dy, gamma, beta) in float32 for a GroupNorm test; x has a large
  mean beside a small spread, where a one-pass variance would fail."""
  rng = np.random.default_rng(seed)
  return ((rng.standard_normal(shape) * 0.5 + 4).astype(np.float32),
          rng.standard_normal(shape).astype(np.float32),
          (1 + 0.2 * rng.standard_normal(shape[-1])).astype(np.float32),
          (0.2 * rng.standard_normal(shape[-1])).astype(np.float32))


def group_norm_and_gradients(x, dy, gamma, beta, groups=32, eps=1e-5):
  """[y, dx, dgamma, dbeta] of GroupNorm over NHWC `x` with output
  gradient `dy`, in float64 from the closed form (no autodiff)."""
  n, c = x.shape[0], x.shape[-1]
  g = x.astype(np.float64).reshape(n, -1, groups, c // groups)
  rstd = 1 / np.sqrt(g.var((1, 3), keepdims=True) + eps)
  normal = (g - g.mean((1, 3), keepdims=True)) * rstd
  scale = gamma.reshape(groups, -1)
  dyg = dy.astype(np.float64).reshape(g.shape) * scale
  dx = rstd * (dyg - dyg.mean((1, 3), keepdims=True) -
               normal * (dyg * normal).mean((1, 3), keepdims=True))
  dyn = dy.astype(np.float64).reshape(g.shape)
  return [(normal * scale + beta.reshape(groups, -1)).reshape(x.shape),
          dx.reshape(x.shape), (dyn * normal).sum((0, 1)).reshape(c),
          dyn.sum((0, 1)).reshape(c)]


def write_imagefolder(root, classes=('cat', 'dog', 'owl'), train=8, val=4,
                      size=(40, 48), seed=0, split_names=('train', 'val')):
  """A folder root/{train,val}/<class>/*.png whose classes are learnable:
  each class has its own colour, with noise. Returns root."""
  from PIL import Image
  rng = np.random.default_rng(seed)
  colours = rng.integers(0, 256, (len(classes), 3))
  for split, n in zip(split_names, (train, val)):
    for c, name in enumerate(classes):
      d = os.path.join(root, split, name)
      os.makedirs(d, exist_ok=True)
      for i in range(n):
        noise = rng.integers(-40, 41, (*size, 3))
        img = np.clip(colours[c] + noise, 0, 255).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(d, f'{i:03d}.png'))
  return str(root)


def truncate_image(path):
  """Cut an image file after its first 100 bytes: its header still reads
  (so a folder listing accepts it), its pixels do not decode."""
  with open(path, 'rb') as f:
    head = f.read(100)
  with open(path, 'wb') as f:
    f.write(head)


@pytest.fixture
def imagefolder(tmp_path):
  return write_imagefolder(tmp_path / 'images')


@pytest.fixture
def compiled_nets(monkeypatch):
  """The networks given to torch.compile (a list, filled as they come),
  which compiles them through TorchDynamo and AOT Autograd but without
  Inductor's code generation: that took 2.5 minutes for a distillation's
  two tiny networks on 2 CPU cores, and test_commands.py::
  test_pytorch_compile runs it."""
  nets = []
  aot_eager = functools.partial(torch.compile, backend='aot_eager')
  monkeypatch.setattr(torch, 'compile',
                      lambda net: nets.append(net) or aot_eager(net))
  return nets


@pytest.fixture
def sigterm_after_step(monkeypatch):
  """sigterm_after_step(k): the process receives SIGTERM right after
  training step k (k=None disarms), which is how a run is interrupted in
  the resume tests; the harness then stops with a checkpoint at step k."""
  import signal
  update = progress.Progress.update

  def arm(k):
    def update_then_sigterm(self, step):
      update(self, step)
      if step == k:
        os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(progress.Progress, 'update',
                        update if k is None else update_then_sigterm)
  return arm


@pytest.fixture
def weights_download_fails(monkeypatch):
  """Every weights download fails as without a network, and reading a
  dataset fails the test: a command must report the download first."""
  import urllib.error
  import urllib.request

  def offline(url, *args, **kwargs):
    raise urllib.error.URLError('no network in this test')

  def read(*args, **kwargs):
    raise AssertionError('the data was read before the weights were fetched')
  monkeypatch.setattr(urllib.request, 'urlopen', offline)
  monkeypatch.setattr(datasets, 'load', read)


# `make test` runs the suite on two workers (pytest-xdist, --dist loadgroup):
# most runs are single-threaded subprocesses, so two at a time use both
# cores. A file's tests form one group, run by one worker, and share that
# file's runs; in the files of BY_BACKEND each backend's tests form a group
# of their own. The longest groups (as measured) are handed out first, so
# that no worker is left with a long one at the end.
BY_BACKEND = ('test_trainers.py', 'test_multiprocess.py')
LONGEST_FIRST = (
    'test_trainers.py:tf2', 'test_trainers.py:jax', 'test_commands.py',
    'test_gpu_check.py',
    'test_multiprocess.py:jax', 'test_distill.py', 'test_notebooks.py',
    'test_trainers.py:pytorch', 'test_multiprocess.py:tf2',
    'test_end_to_end_benchmark.py', 'test_jax_models.py', 'test_demo.py')


def backend_param(item):
  """The test's `backend` parameter, or None."""
  callspec = getattr(item, 'callspec', None)
  return callspec.params.get('backend') if callspec else None


def xdist_group_of(item):
  """The xdist group of a test: its file, with its backend in BY_BACKEND's
  files (a `backend` parameter, else a backend its name holds)."""
  name = item.path.name
  if name not in BY_BACKEND:
    return name
  backend = backend_param(item) or next(
      (b for b in ('pytorch', 'tf2', 'jax', 'torchrun')
       if b in item.originalname), None)
  return f'{name}:{backend}' if backend else name


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items):
  rank = {group: i for i, group in enumerate(LONGEST_FIRST)}
  for item in items:
    item.add_marker(pytest.mark.xdist_group(xdist_group_of(item)))
    # test_distill's tests of its runs (the `setup` fixture: a teacher, a
    # folder) are whole distillation runs.
    if item.path.name == 'test_distill.py' and 'setup' in getattr(
        item, 'fixturenames', ()):
      item.add_marker(pytest.mark.slow)
  items.sort(key=lambda item: rank.get(xdist_group_of(item), len(rank)))


def stand_in_nvidia_smi(folder, listing, status=0):
  """A folder holding an `nvidia-smi` that prints `listing` (lines, each
  ending in a newline) and exits with `status`, to put first on PATH."""
  folder.mkdir(exist_ok=True)
  smi = folder / 'nvidia-smi'
  smi.write_text(f"#!/bin/sh\ncat <<'END'\n{listing}END\nexit {status}\n")
  smi.chmod(0o755)
  return folder


class Votes:
  """harness.Run.any_process for threads standing in for processes: each
  call returns the flags of every thread's call ORed (a collective)."""

  def __init__(self, n):
    self.barrier = threading.Barrier(n, timeout=60)
    self.cast = {}

  def __call__(self, flags):
    self.cast[threading.current_thread().name] = flags
    self.barrier.wait()
    result = np.any(list(self.cast.values()), axis=0).tolist()
    self.barrier.wait()  # every thread has read the votes of this call
    return result


def as_processes(n, fn):
  """fn(index, votes) in n threads p0 ... p{n-1} that share one Votes:
  {name: its result or its error}."""
  votes, ends = Votes(n), {}

  def process(index):
    try:
      ends[f'p{index}'] = fn(index, votes)
    except Exception as e:  # pylint: disable=broad-exception-caught
      ends[f'p{index}'] = e

  threads = [threading.Thread(target=process, args=(i,), name=f'p{i}')
             for i in range(n)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  return ends
