"""bit_common: registry, downloads, checkpoint checks, CLI, few-shot, folders."""
import argparse
import functools
import http.server
import io
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest

from big_transfer import (datasets, errors, flags, harness, predict, runfiles,
                          zoo)
import bit_common
from conftest import (REPO, published_shapes, synthetic_weights,
                      truncate_image, write_imagefolder)


# ---------------------------------------------------------------- registry

def test_registry_covers_every_published_family():
  names = set(zoo.MODELS)
  for arch in ('R50x1', 'R50x3', 'R101x1', 'R101x3', 'R152x2', 'R152x4'):
    assert {f'BiT-S-{arch}', f'BiT-M-{arch}', f'BiT-M-{arch}-ILSVRC2012'} <= names
  assert 'BiT-M-R50x1-CIFAR10' in names
  vtab = [n for n in names if '-run' in n]
  assert len(vtab) == 5 * 3 * 19
  assert 'BiT-M-R152x4-run2-dsprites-xpos' in names
  assert {'BiT-M-R50x1-distilled-224', 'BiT-M-R50x1-distilled-160',
          'BiT-M-R152x2-teacher-224', 'BiT-M-R152x2-teacher-384'} <= names


@pytest.mark.parametrize('name, url, arch, head', [
    ('BiT-M-R50x1', 'bit_models/BiT-M-R50x1.npz', (3, 4, 6, 3), 21843),
    ('BiT-S-R101x3', 'bit_models/BiT-S-R101x3.npz', (3, 4, 23, 3), 1000),
    ('BiT-M-R152x4-ILSVRC2012', 'bit_models/BiT-M-R152x4-ILSVRC2012.npz',
     (3, 8, 36, 3), 1000),
    ('BiT-M-R50x3-run1-dtd', 'bit_models/vtab/BiT-M-R50x3-run1-dtd.npz',
     (3, 4, 6, 3), 47),
    ('BiT-M-R50x1-distilled-160', 'bit_models/distill/R50x1_160.npz',
     (3, 4, 6, 3), 1000),
    ('BiT-M-R152x2-teacher-384', 'bit_models/distill/R152x2_T_384.npz',
     (3, 8, 36, 3), 1000),
])
def test_registry_entries(name, url, arch, head):
  info = zoo.model_info(name)
  assert info.url == 'https://storage.googleapis.com/' + url
  assert info.architecture.units == arch
  assert info.head_size == head


def test_every_registered_model_resolves():
  for info in zoo.MODELS.values():
    assert info.url or info.path
    arch = info.architecture
    assert arch.name == info.arch
    assert info.head_size > 0


def test_h5_only_where_published():
  assert zoo.MODELS['BiT-S-R50x1'].h5_url.endswith('BiT-S-R50x1.h5')
  assert zoo.MODELS['BiT-M-R152x4'].h5_url.endswith('BiT-M-R152x4.h5')
  assert zoo.MODELS['BiT-M-R152x2'].h5_url is None
  with pytest.raises(errors.BadInput, match='not published as .h5'):
    zoo.weights_path('BiT-M-R152x2', '.', fmt='h5')


def test_unknown_names_are_refused_with_a_hint():
  with pytest.raises(errors.BadInput, match='Did you mean'):
    zoo.model_info('r50x1')
  with pytest.raises(errors.BadInput, match='unknown architecture'):
    zoo.parse_arch('R51x1')
  with pytest.raises(errors.BadInput, match='GroupNorm'):
    zoo.parse_arch('R50x0.25')


# ---------------------------------------------------------------- downloads

class FakeResponse(io.BytesIO):
  def __init__(self, data, length=None, fail_after=None):
    super().__init__(data)
    self.headers = {'Content-Length': str(len(data) if length is None else length)}
    self._fail_after = fail_after

  def read(self, n=-1):
    if self._fail_after is not None and self.tell() >= self._fail_after:
      raise ConnectionResetError('connection reset by peer')
    return super().read(n if self._fail_after is None else
                        min(n, self._fail_after - self.tell()) or 1)


def npz_bytes(arch='R14x0.5'):
  buf = io.BytesIO()
  np.savez(buf, **synthetic_weights(arch))
  return buf.getvalue()


def test_download_writes_the_file_atomically(tmp_path):
  data = npz_bytes()
  dest = tmp_path / 'w' / 'BiT-M-R50x1.npz'
  seen = []
  zoo.download('http://x/BiT-M-R50x1.npz', str(dest),
                      opener=lambda url, timeout: (seen.append(url), FakeResponse(data))[1],
                      verify=zoo.load_npz)
  assert seen == ['http://x/BiT-M-R50x1.npz']
  assert dest.read_bytes() == data
  assert os.listdir(dest.parent) == ['BiT-M-R50x1.npz']


def test_a_download_is_on_disk_before_its_name_is(tmp_path, monkeypatch):
  # As every file the package writes (runfiles.replaced): a power cut must
  # not leave the name of a file whose data never reached the disk.
  events = []
  fsync, replace = os.fsync, os.replace
  monkeypatch.setattr(os, 'fsync', lambda fd: (
      events.append(('fsync', os.readlink(f'/proc/self/fd/{fd}'))), fsync(fd)))
  monkeypatch.setattr(os, 'replace', lambda a, b: (
      events.append(('replace', str(b))), replace(a, b)))
  dest = tmp_path / 'model.npz'
  zoo.download('http://x/model.npz', str(dest),
               opener=lambda url, timeout: FakeResponse(npz_bytes()),
               verify=zoo.load_npz)
  assert [e[0] for e in events] == ['fsync', 'replace', 'fsync']
  assert events[0][1].endswith('.part') and events[1][1] == str(dest)
  assert events[2][1] == str(tmp_path)


@pytest.mark.parametrize('response', [
    lambda d: FakeResponse(d, fail_after=len(d) // 2),   # connection reset
    lambda d: FakeResponse(d[:len(d) // 2], length=len(d)),  # short body
    lambda d: FakeResponse(d[:len(d) // 2], length=0),   # no length, bad zip
])
def test_interrupted_download_leaves_nothing(tmp_path, response):
  data = npz_bytes()
  dest = tmp_path / 'model.npz'
  with pytest.raises(errors.BadInput, match='fetch it yourself'):
    zoo.download('http://x/model.npz', str(dest),
                        opener=lambda url, timeout: response(data),
                        verify=zoo.load_npz)
  assert os.listdir(tmp_path) == []
  # Restartable: the next attempt starts afresh and succeeds.
  zoo.download('http://x/model.npz', str(dest),
                      opener=lambda url, timeout: FakeResponse(data),
                      verify=zoo.load_npz)
  assert dest.read_bytes() == data


def test_offline_error_names_the_file_and_where_to_put_it(tmp_path):
  def offline(url, timeout):
    raise urllib.error.URLError('Name or service not known')
  with pytest.raises(errors.BadInput) as e:
    zoo.weights_path('BiT-S-R50x1', str(tmp_path), opener=offline)
  msg = str(e.value)
  assert 'https://storage.googleapis.com/bit_models/BiT-S-R50x1.npz' in msg
  assert str(tmp_path / 'BiT-S-R50x1.npz') in msg
  assert os.listdir(tmp_path) == []


def test_weights_path_downloads_from_a_local_server(tmp_path, monkeypatch):
  served = tmp_path / 'served' / 'bit_models'
  served.mkdir(parents=True)
  (served / 'BiT-M-R50x1.npz').write_bytes(npz_bytes())
  handler = functools.partial(http.server.SimpleHTTPRequestHandler,
                              directory=str(tmp_path / 'served'))
  handler.log_message = lambda *a: None
  server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  try:
    base = f'http://127.0.0.1:{server.server_port}/bit_models/'
    info = zoo.MODELS['BiT-M-R50x1']
    monkeypatch.setitem(zoo.MODELS, 'BiT-M-R50x1', zoo.ModelInfo(
        info.name, info.arch, info.head_size, base + 'BiT-M-R50x1.npz'))
    path = zoo.weights_path('BiT-M-R50x1', str(tmp_path / 'cache'))
    assert path == str(tmp_path / 'cache' / 'BiT-M-R50x1.npz')
    assert zoo.load_npz(path).keys() == synthetic_weights().keys()
    # Present now: no second download (the server is gone).
    server.shutdown()
    assert zoo.weights_path('BiT-M-R50x1', str(tmp_path / 'cache')) == path
  finally:
    server.server_close()


def test_a_command_line_shows_once_where_a_library_set_up_logging(capsys):
  # TF, absl or grain may give the root logger a handler; a command's lines
  # must not show twice (bit_jax.validate's did).
  root = logging.getLogger()
  caught = logging.StreamHandler(io.StringIO())
  root.addHandler(caught)
  try:
    runfiles.console_logger('test_once').info('evaluating')
  finally:
    root.removeHandler(caught)
  assert caught.stream.getvalue() == ''
  assert capsys.readouterr().err == 'evaluating\n'


def test_a_silent_server_is_given_up_and_leaves_nothing(tmp_path, monkeypatch):
  # It takes the connection and the request, and never answers.
  server = socket.create_server(('127.0.0.1', 0))
  monkeypatch.setattr(zoo, 'DOWNLOAD_TIMEOUT_S', 0.5)
  try:
    with pytest.raises(errors.BadInput, match='timed out.*fetch it yourself'):
      zoo.download(f'http://127.0.0.1:{server.getsockname()[1]}/m.npz',
                   str(tmp_path / 'new' / 'm.npz'))
  finally:
    server.close()
  assert os.listdir(tmp_path) == []


def test_predict_fetches_the_imagenet_names_beside_the_weights(
    tmp_path, monkeypatch, caplog):
  names = [f'class {i}' for i in range(1000)]
  pages = {'ilsvrc2012_wordnet_lemmas.txt': '\n'.join(names) + '\n',
           'imagenet21k_wordnet_lemmas.txt': 'too\nfew\n'}
  asked = []

  def serve(url, timeout):
    asked.append(url)
    name = url.rpartition('/')[2]
    if name not in pages:
      raise urllib.error.URLError('Name or service not known')
    return FakeResponse(pages[name].encode())
  monkeypatch.setattr(urllib.request, 'urlopen', serve)
  cache = tmp_path / 'weights'
  args = argparse.Namespace(labels=None, model='mine.npz',
                            bit_pretrained_dir=str(cache))
  logger = logging.getLogger('bit.test_labels')
  assert predict.label_names(args, 1000, logger) == names
  assert asked == [zoo.BASE_URL + 'ilsvrc2012_wordnet_lemmas.txt']
  assert predict.label_names(args, 1000, logger) == names  # kept: no 2nd ask
  assert len(asked) == 1
  # A file of the wrong length, or no network: the classes go by number,
  # said in one line, and nothing is kept.
  caplog.set_level(logging.WARNING)
  assert predict.label_names(args, 21843, logger) is None
  monkeypatch.delitem(pages, 'ilsvrc2012_wordnet_lemmas.txt')
  (cache / 'ilsvrc2012_wordnet_lemmas.txt').unlink()
  assert predict.label_names(args, 1000, logger) is None
  assert [r.message.split(':')[0] for r in caplog.records] == [
      'classes are shown by number'] * 2
  assert 'has 2 names but the model has 21843' in caplog.records[0].message
  assert 'Name or service not known' in caplog.records[1].message
  assert os.listdir(cache) == []


# ---------------------------------------------------------------- checkpoints

def test_load_npz_refuses_truncated_and_foreign_files(tmp_path, make_npz):
  good = make_npz()
  truncated = tmp_path / 'truncated.npz'
  truncated.write_bytes(open(good, 'rb').read()[:2000])
  with pytest.raises(errors.BadInput, match='not a readable .npz'):
    zoo.load_npz(str(truncated))
  foreign = tmp_path / 'foreign.npz'
  np.savez(foreign, w=np.zeros(3))
  with pytest.raises(errors.BadInput, match='not a BiT checkpoint'):
    zoo.load_npz(str(foreign))


def test_numbered_conv_names_are_accepted(tmp_path):
  w = synthetic_weights()
  renamed = {k.replace('standardized_conv2d', f'standardized_conv2d_{i}'): v
             for i, (k, v) in enumerate(w.items())}
  np.savez(tmp_path / 'n.npz', **renamed)
  assert zoo.load_npz(str(tmp_path / 'n.npz')).keys() == w.keys()


def test_infer_arch_and_check_weights():
  w = synthetic_weights('R26x1', head_size=7)
  arch, head = zoo.infer_arch(w)
  assert (arch.units, arch.width, head, arch.name) == ((2, 2, 2, 2), 1, 7, 'R26x1')
  zoo.check_weights(w, arch, 7)
  with pytest.raises(errors.BadInput, match=
                     r'kernel has shape \(7, 7, 3, 64\) but R26x0.5 needs \(7, 7, 3, 32\)'):
    zoo.check_weights(w, zoo.parse_arch('R26x0.5'))
  del w['resnet/group_norm/beta']
  with pytest.raises(errors.BadInput, match='has no resnet/group_norm/beta'):
    zoo.check_weights(w, arch)


def test_expected_shapes_follow_the_published_table():
  shapes = zoo.expected_shapes(zoo.parse_arch('R50x1'), 21843)
  assert shapes['resnet/root_block/standardized_conv2d/kernel'] == (7, 7, 3, 64)
  assert shapes['resnet/block1/unit01/a/proj/standardized_conv2d/kernel'] == (1, 1, 64, 256)
  assert shapes['resnet/block2/unit01/b/standardized_conv2d/kernel'] == (3, 3, 128, 128)
  assert shapes['resnet/block3/unit06/c/standardized_conv2d/kernel'] == (1, 1, 256, 1024)
  assert shapes['resnet/block4/unit03/a/group_norm/gamma'] == (2048,)
  assert shapes['resnet/head/conv2d/kernel'] == (1, 1, 2048, 21843)
  assert 'resnet/block1/unit02/a/proj/standardized_conv2d/kernel' not in shapes
  assert sum(k.endswith('kernel') for k in shapes) == 1 + 16 * 3 + 4 + 1


@pytest.mark.parametrize('arch', ['R14x0.5', 'R26x1', 'R50x1', 'R101x3',
                                  'R152x2'])
def test_expected_shapes_equal_the_published_layout(arch):
  """The registry's table against the one the tests write from the
  published layout alone (conftest.published_shapes)."""
  assert zoo.expected_shapes(zoo.parse_arch(arch), 9) == published_shapes(
      arch, 9)


def test_a_registered_model_is_read_from_a_local_npz_or_else_h5(tmp_path,
                                                                make_npz):
  info = zoo.MODELS['BiT-S-R50x1']
  h5 = tmp_path / info.filename('h5')
  h5.write_bytes(b'')
  assert zoo.weights_path('BiT-S-R50x1', str(tmp_path)) == str(h5)
  npz = make_npz(name=info.filename('npz'))
  assert zoo.weights_path('BiT-S-R50x1', str(tmp_path)) == npz


# ---------------------------------------------------------------- CLI

def test_a_missing_weights_file_named_like_a_registered_model_says_how(
    tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  for model in ('BiT-M-R50x1.npz', 'BiT-S-R101x3.h5'):
    name = model.rpartition('.')[0]
    with pytest.raises(errors.BadInput, match=f'For the registered {name}, '
                       f'give --model {name}'):
      zoo.check_model(model)
  for model in ('mine.npz', str(tmp_path / 'BiT-M-R50x1.npz')):
    with pytest.raises(errors.BadInput) as e:  # a file of the user's own
      zoo.load_weights(model)
    assert str(e.value) == f'weights file {model} does not exist.'


def test_the_original_trainers_scripts_add_their_flags_again():
  # Each original bit_*/train.py added flags to bit_common.argparser itself
  # (PyTorch: --datadir, --workers, --no-save; TF2 and JAX: --tfds_manual_dir,
  # --batch_eval). A script built on one still parses, its flags winning.
  from bit_pytorch import models
  parser = bit_common.argparser(models.KNOWN_MODELS.keys())
  parser.add_argument('--datadir', required=True)
  parser.add_argument('--workers', type=int, default=8)
  parser.add_argument('--no-save', dest='save', action='store_false')
  args = parser.parse_args(['--name', 'n', '--logdir', 'l', '--datadir', 'd'])
  assert (args.datadir, args.workers, args.save) == ('d', 8, True)
  assert parser.parse_args(['--name', 'n', '--logdir', 'l', '--datadir', 'd',
                            '--no-save']).save is False
  with pytest.raises(SystemExit):  # required, as that script said
    parser.parse_args(['--name', 'n', '--logdir', 'l'])
  parser = bit_common.argparser()
  parser.add_argument('--tfds_manual_dir', default=None)
  parser.add_argument('--batch_eval', default=32, type=int)
  args = parser.parse_args(['--name', 'n', '--logdir', 'l'])
  assert (args.batch_eval, args.tfds_manual_dir, args.batch) == (32, None, 512)
  bit_common.check_args(args)


def test_original_flags_keep_their_names_and_defaults():
  args = bit_common.argparser().parse_args(['--name', 'n', '--logdir', 'l'])
  assert (args.model, args.bit_pretrained_dir, args.dataset) == ('BiT-M-R50x1', '.', 'cifar10')
  assert (args.batch, args.batch_split, args.base_lr) == (512, 1, 0.003)
  # --batch_split auto: the run chooses (tests/test_memory.py).
  assert bit_common.argparser().parse_args(
      ['--name', 'n', '--logdir', 'l', '--batch_split', 'auto']
  ).batch_split is None
  assert (args.examples_per_class, args.examples_per_class_seed) == (None, 0)
  assert args.save is True
  assert (args.seed, args.total_steps) == (0, None)
  # The precision is the machine's unless given: the original's fp32 on
  # the CPU (tests/test_hardware.py).
  assert args.precision is None
  args = bit_common.argparser().parse_args(
      ['--name', 'n', '--logdir', 'l', '--no-save', '--tfds_manual_dir', 'm'])
  assert args.save is False and args.tfds_manual_dir == 'm'


@pytest.mark.parametrize('flags, message', [
    (['--batch', '10', '--batch_split', '4'], 'not divisible'),
    (['--batch', '0'], 'positive'),
    (['--dataset', 'imagefolder'], 'needs --datadir'),
    (['--dataset', 'imagefolder', '--datadir', '/does/not/exist'], 'not a folder'),
    (['--resize_size', '32', '--crop_size', '64'], 'larger than'),
    (['--model', 'BiT-X-R50x1'], 'unknown model'),
    # Split flags that some backends would ignore (PyTorch reads cifar10
    # through torchvision, JAX and TF2 through TFDS).
    (['--train_split', 'train[:10]'],
     'not to cifar10; --dataset tfds:cifar10 takes it'),
    (['--dataset', 'imagefolder', '--datadir', '.', '--eval_split', 'test'],
     'applies to tfds:NAME and vtab:TASK datasets, not to imagefolder.'),
    (['--dataset', 'digits', '--eval_split', 'test'], 'not to digits.'),
])
def test_check_args_refuses(flags, message):
  args = bit_common.argparser().parse_args(['--name', 'n', '--logdir', 'l'] + flags)
  with pytest.raises(errors.BadInput, match=message):
    bit_common.check_args(args)


def test_run_names_stay_under_the_logdir_and_seeds_suit_every_backend(
    capsys):
  parser = bit_common.argparser()

  def parsed(*extra):
    return parser.parse_args(['--name', 'n', '--logdir', 'l', *extra])
  for name in ('run0', 'cifar10/run0', 'a/./b', 'café ü'):
    assert parsed('--name', name).name == name
  for name in ('', '.', '..', '../elsewhere', 'a/../../b', 'a/..',
               os.path.abspath('anywhere')):
    with pytest.raises(SystemExit) as e:
      parsed('--name', name)
    assert e.value.code == 2
    assert 'is not a run name' in capsys.readouterr().err
  # TF2's generators take seeds below 2**32, PyTorch's and JAX's more.
  top = str(flags.SEED_MAX)
  assert parsed('--seed', top, '--examples_per_class_seed', top).seed == (
      flags.SEED_MAX)
  for flag in ('--seed', '--examples_per_class_seed'):
    for value in ('-1', str(flags.SEED_MAX + 1), 'x'):
      with pytest.raises(SystemExit) as e:
        parsed(flag, value)
      assert e.value.code == 2
      assert flag in capsys.readouterr().err


def test_checking_a_folder_makes_nothing_and_races_with_nothing(tmp_path):
  """Several processes of one run check its folder at once (torchrun,
  jax.distributed): no check may remove what another is checking in."""
  target = tmp_path / 'logdir' / 'run'
  refusals = []

  def check():
    for _ in range(300):
      try:
        runfiles.check_writable(str(target), 'hint')
      except errors.BadInput as e:
        refusals.append(e)
  threads = [threading.Thread(target=check) for _ in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not refusals and os.listdir(tmp_path) == []
  (tmp_path / 'a_file').write_text('')
  with pytest.raises(errors.BadInput, match='Not a directory.*hint'):
    runfiles.check_writable(str(tmp_path / 'a_file' / 'run'), 'hint')
  runfiles.check_writable(str(target), 'hint', keep=True)
  assert target.is_dir()


def test_batch_must_divide_over_devices():
  args = bit_common.argparser().parse_args(
      ['--name', 'n', '--logdir', 'l', '--batch', '12', '--batch_split', '2'])
  bit_common.check_args(args, devices=3)
  with pytest.raises(errors.BadInput, match='4 device'):
    bit_common.check_args(args, devices=4)
  args.batch_split = None  # auto, chosen later: the batch need only divide
  bit_common.check_args(args, devices=4)
  with pytest.raises(errors.BadInput, match=r'by 5 device\(s\)'):
    bit_common.check_args(args, devices=5)


def test_evaluation_batch_is_shared_evenly_by_the_devices():
  # The default is the training micro-batch; every device gets as many rows
  # (the padding rows are masked out), never fewer than asked for.
  for batch_eval, micro, devices in [(None, 12, 3), (None, 10, 4), (7, 64, 2),
                                     (5, 64, 8), (None, 1, 1)]:
    got = flags.eval_batch(batch_eval, micro, devices)
    want = batch_eval or micro
    assert got % devices == 0 and want <= got < want + devices, (
        batch_eval, micro, devices, got)


def test_resolution_overrides():
  p = bit_common.argparser()

  def resolution(flags, hw):
    rule = harness.HyperRule.of(
        p.parse_args(['--name', 'n', '--logdir', 'l'] + flags), 100, hw)
    return rule.resize, rule.crop
  assert resolution([], (32, 32)) == (160, 128)
  assert resolution(['--crop_size', '64'], (32, 32)) == (80, 64)  # 160:128
  assert resolution(['--resize_size', '40', '--crop_size', '32'],
                    (500, 500)) == (40, 32)
  assert resolution(['--resize_size', '600'], (500, 500)) == (600, 480)
  assert resolution(['--resize_size', '128'], (32, 32)) == (128, 128)
  # A resize alone below the HyperRule's crop would crop past the image.
  with pytest.raises(errors.BadInput, match='--resize_size 100 is smaller '
                     "than the HyperRule's crop for this dataset, 128"):
    resolution(['--resize_size', '100'], (32, 32))


# ---------------------------------------------------------------- few-shot

def test_fewshot_is_reproducible_balanced_and_seeded():
  labels = np.random.default_rng(1).integers(0, 5, 1000)
  a = datasets.fewshot_indices(labels, 5, seed=3)
  b = datasets.fewshot_indices(labels, 5, seed=3)
  c = datasets.fewshot_indices(labels, 5, seed=4)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert len(set(a)) == 25 and list(a) == sorted(a)
  assert np.bincount(labels[a]).tolist() == [5] * 5
  with pytest.raises(errors.BadInput, match='class 0 has only'):
    datasets.fewshot_indices(np.array([0, 1, 1]), 2, seed=0)


# ---------------------------------------------------------------- folders

def test_scan_imagefolder_sorted_and_checked(tmp_path):
  root = write_imagefolder(tmp_path / 'f', classes=('b', 'a', 'c'), train=3, val=2)
  classes, train, val, name = datasets.scan_imagefolder(root)
  assert classes == ['a', 'b', 'c'] and name == 'val'
  assert train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
  assert train.paths[0].endswith(os.path.join('train', 'a', '000.png'))
  assert len(val.paths) == 6
  assert datasets.image_sizes(train.paths) == [(40, 48)] * 9
  os.makedirs(tmp_path / 'f' / 'train' / 'empty')
  with pytest.raises(errors.BadInput, match='empty has no images'):
    datasets.scan_imagefolder(root)


def test_files_that_are_not_images_are_named_when_left_out(tmp_path, caplog):
  root = write_imagefolder(tmp_path / 'f', train=2, val=1)
  cat = tmp_path / 'f' / 'train' / 'cat'
  shutil.copy(cat / '000.png', cat / 'moving.gif')
  (cat / 'notes.txt').write_text('not an image')
  (cat / '.DS_Store').write_bytes(b'hidden, not named')
  (cat / 'UPPER.PNG').write_bytes((cat / '000.png').read_bytes())
  _, train, val, _ = datasets.scan_imagefolder(root)
  assert str(cat / 'UPPER.PNG') in train.paths
  assert sorted(train.left_out) == [str(cat / 'moving.gif'),
                                    str(cat / 'notes.txt')]
  assert val.left_out == [] and datasets.left_out_warning(val) is None
  args = argparse.Namespace(dataset='imagefolder', datadir=root,
                            examples_per_class=None)
  caplog.set_level(logging.WARNING)
  datasets.load(args, logging.getLogger('bit.test_left_out'))
  assert [r.message for r in caplog.records] == [
      datasets.left_out_warning(train)]
  assert '2 file(s)' in caplog.text and '.gif 1, .txt 1' in caplog.text


def test_class_folders_are_read_whole_but_hidden_folders_are_not(tmp_path):
  # Images in a class's subfolders belong to the class (as torchvision's and
  # Keras' image folders read them); Jupyter's .ipynb_checkpoints/ copies are
  # neither a class nor images of one.
  root = write_imagefolder(tmp_path / 'f', train=2, val=1)
  train_dir = tmp_path / 'f' / 'train'
  cat = train_dir / 'cat'
  image = (cat / '000.png').read_bytes()
  for name in ('batch2/a.png', 'batch2/deeper/b.png', '.ipynb_checkpoints/c.png',
               'batch2/.hidden/d.png', 'batch2/readme.txt'):
    (cat / name).parent.mkdir(parents=True, exist_ok=True)
    (cat / name).write_bytes(image)
  (train_dir / '.ipynb_checkpoints').mkdir()
  (cat / 'batch2' / 'up').symlink_to(cat, target_is_directory=True)  # a loop
  (tmp_path / 'f' / 'val' / '.cache').mkdir()
  classes, train, _, _ = datasets.scan_imagefolder(root)
  assert classes == ['cat', 'dog', 'owl']
  assert [os.path.relpath(p, cat) for p in train.paths[:4]] == [
      '000.png', '001.png', 'batch2/a.png', 'batch2/deeper/b.png']
  assert train.labels.tolist() == [0, 0, 0, 0, 1, 1, 2, 2]
  assert train.left_out == [str(cat / 'batch2' / 'readme.txt')]
  assert predict.list_images([str(cat)]) == train.paths[:4]


def test_heif_photos_are_read_where_pillow_heif_is_installed(tmp_path,
                                                            monkeypatch):
  """An iPhone's .HEIC photo is an image of its class where pillow-heif is
  installed (the heif extra, in the tests' install); without it, it is left
  out, and the warning names the install that reads it."""
  pytest.importorskip('pillow_heif')
  from PIL import Image
  root = write_imagefolder(tmp_path / 'f', train=2, val=1)
  photo = tmp_path / 'f' / 'train' / 'cat' / 'phone.HEIC'
  colour = np.array([200, 30, 90])
  assert datasets.heif_readable()
  Image.new('RGB', (40, 32), tuple(colour)).save(photo, format='HEIF')
  _, train, _, _ = datasets.scan_imagefolder(root)
  assert str(photo) in train.paths and train.left_out == []
  got = np.asarray(datasets.decode(photo))
  assert got.shape == (32, 40, 3)
  assert np.abs(got.mean((0, 1)) - colour).max() < 4  # lossy
  assert datasets.image_sizes([str(photo)]) == [(32, 40)]
  monkeypatch.setattr(datasets, 'heif_readable', lambda: False)
  _, train, _, _ = datasets.scan_imagefolder(root)
  assert train.left_out == [str(photo)]
  assert ".heic 1; e.g." in datasets.left_out_warning(train)
  assert datasets.left_out_warning(train).endswith(
      "pip install 'big-transfer[heif]').")


def test_scan_imagefolder_uses_test_when_no_val(tmp_path):
  root = write_imagefolder(tmp_path / 'f', split_names=('train', 'test'))
  _, _, test, name = datasets.scan_imagefolder(root)
  assert name == 'test'
  assert all(os.sep + 'test' + os.sep in p for p in test.paths)
  shutil.rmtree(os.path.join(root, 'train'))
  with pytest.raises(errors.BadInput, match='has test/ but no train/'):
    datasets.scan_imagefolder(root)


def test_a_folder_without_val_holds_out_a_tenth_of_each_class(tmp_path,
                                                               caplog):
  """train/ alone, or the class folders alone: the evaluation split is
  round(10%) of each class (at least one), the images whose paths hash
  lowest, so the same files in every run; adding images moves at most the
  margin. A class of one image cannot be split."""
  import hashlib
  root = write_imagefolder(tmp_path / 'f', train=12, val=0,
                           split_names=('train', 'val'))
  shutil.rmtree(os.path.join(root, 'val'))
  classes, train, held, name = datasets.scan_imagefolder(root)
  assert name == 'held-out' and classes == ['cat', 'dog', 'owl']
  assert sorted(held.paths + train.paths) == sorted(
      os.path.join(d, n) for d, _, names in os.walk(os.path.join(root, 'train'))
      for n in names)
  assert len(held.paths) == 3 and held.labels.tolist() == [0, 1, 2]
  assert len(train.paths) == 33 and not set(train.paths) & set(held.paths)
  for label, c in enumerate(classes):  # the lowest hash of each class
    names = sorted(os.listdir(os.path.join(root, 'train', c)))
    lowest = min(names, key=lambda n: hashlib.sha256(
        f'{c}/{n}'.encode()).digest())
    assert held.paths[label] == os.path.join(root, 'train', c, lowest)
  # The class folders without train/: the same files, relative to the root.
  flat = tmp_path / 'flat'
  shutil.copytree(os.path.join(root, 'train'), flat)
  _, flat_train, flat_held, _ = datasets.scan_imagefolder(str(flat))
  assert [os.path.relpath(p, flat) for p in flat_held.paths] == [
      os.path.relpath(p, os.path.join(root, 'train')) for p in held.paths]
  slash = datasets.scan_imagefolder(str(flat) + os.sep)[2]  # --datadir flat/
  assert [os.path.relpath(p, flat) for p in slash.paths] == [
      os.path.relpath(p, flat) for p in flat_held.paths]
  # 20 images in a class: 2 held out, the earlier one still among them.
  cat = flat / 'cat'
  for i in range(12, 20):
    shutil.copy(cat / '000.png', cat / f'{i:03d}.png')
  more = datasets.scan_imagefolder(str(flat))[2]
  assert more.labels.tolist() == [0, 0, 1, 2]
  assert flat_held.paths[0] in more.paths
  args = argparse.Namespace(dataset='imagefolder', datadir=str(flat),
                            examples_per_class=None)
  caplog.set_level(logging.INFO)
  data = datasets.load(args, logging.getLogger('bit.test_held_out'))
  assert (len(data.train), len(data.val), data.eval_split) == (40, 4,
                                                               'held-out')
  assert 'evaluating on 4 of its images held out of training' in caplog.text
  for extra in cat.iterdir():
    if extra.name != '000.png':
      extra.unlink()
  with pytest.raises(errors.BadInput, match=r'cat has one image'):
    datasets.scan_imagefolder(str(flat))


def test_digits_ships_offline():
  d = datasets.load_array_dataset('digits')
  assert d.train_images.shape == (1000, 8, 8, 3) and d.train_images.dtype == np.uint8
  assert d.val_images.shape == (797, 8, 8, 3)
  assert d.train_images.max() == 255 and len(d.classes) == 10
  assert set(d.train_labels) == set(range(10))


# ---------------------------------------------------------------- signals

@pytest.fixture
def ctrl_c_as_python_sets_it():
  """SIGINT handled as Python does by default, in this process and (reset
  at exec) in those it starts. A shell that starts a command in the
  background (`cmd &`) starts it with SIGINT ignored, and Python leaves it
  so; running a notebook (the notebook tests) puts Python's handler back.
  So started, a suite failed both tests below on a worker that had not run
  a notebook before them (a second Ctrl-C ignored, the command not
  stopped)."""
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  yield
  signal.signal(signal.SIGINT, previous)


def test_stop_signals_first_asks_second_interrupts(ctrl_c_as_python_sets_it):
  with harness.StopSignals() as signals:
    assert signals.signum is None
    os.kill(os.getpid(), signal.SIGINT)
    assert signals.signum == signal.SIGINT   # recorded, run goes on
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)     # a second Ctrl-C stops at once
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_in_a_command_is_one_line_and_ends_by_the_signal(
    ctrl_c_as_python_sets_it):
  code = ('import os, signal, time\n'
          'from big_transfer import errors\n'
          'def main():\n'
          '  os.kill(os.getpid(), signal.SIGINT)\n'
          '  time.sleep(60)\n'
          'errors.run_cli(main)\n')
  proc = subprocess.run([sys.executable, '-c', code], cwd=REPO,
                        capture_output=True, text=True, timeout=60)
  assert proc.stderr == 'interrupted\n'
  assert proc.returncode == -signal.SIGINT  # as Python's own ending


def test_readable_images_names_or_leaves_out_bad_files(tmp_path):
  root = write_imagefolder(tmp_path / 'f', classes=('a', 'b'), train=3, val=0)
  paths = predict.list_images([os.path.join(root, 'train')])
  assert datasets.readable_images(paths).tolist() == list(range(6))
  with open(paths[1], 'wb') as f:
    f.write(b'not an image')
  truncate_image(paths[4])
  with pytest.raises(datasets.BadImage, match=r'cannot read image .*001\.png'):
    datasets.readable_images(paths)
  # With skip, whole files are decoded: the truncated one is left out too.
  assert datasets.readable_images(paths, skip=True).tolist() == [0, 2, 3, 5]


def test_skipping_every_image_of_a_class_is_refused(tmp_path):
  root = write_imagefolder(tmp_path / 'f', classes=('a', 'b'), train=2, val=1)
  for name in os.listdir(os.path.join(root, 'train', 'b')):
    with open(os.path.join(root, 'train', 'b', name), 'wb') as f:
      f.write(b'not an image')
  args = argparse.Namespace(dataset='imagefolder', datadir=root,
                            examples_per_class=None, skip_bad_images=True)
  with pytest.raises(errors.BadInput, match=r'train/b has no readable images'):
    datasets.load(args)
  args.skip_bad_images = False
  with pytest.raises(datasets.BadImage, match='--skip_bad_images'):
    datasets.load(args)


def test_predict_decodes_ahead_in_threads_in_order(tmp_path):
  root = write_imagefolder(tmp_path / 'f', train=7, val=1)
  paths = predict.list_images([os.path.join(root, 'train')])
  one_by_one = [predict.load_image(p, 24) for p in paths]
  got = list(predict.decoded_batches(paths, 24, 4, workers=3, ahead=2))
  assert [len(b) for b in got] == [4, 4, 4, 4, 4, 1]
  np.testing.assert_array_equal(np.concatenate(got), np.stack(one_by_one))
  truncate_image(paths[13])
  batches = predict.decoded_batches(paths, 24, 4, workers=3)
  with pytest.raises(errors.BadInput, match=f'cannot read image {paths[13]}'):
    list(batches)


def test_a_run_folder_names_its_classes_for_predict(tmp_path):
  run = tmp_path / 'run'
  run.mkdir()
  (run / runfiles.CONFIG).write_text(json.dumps({'classes': ['blue', 'red']}))
  args = argparse.Namespace(labels=None, model=str(run),
                            bit_pretrained_dir=str(tmp_path))
  assert predict.label_names(args, 2, None) == ['blue', 'red']
  assert predict.label_names(args, 3, None) is None  # not this model's classes
  (run / runfiles.CONFIG).write_text(json.dumps({'classes': 10}))
  assert predict.label_names(args, 10, None) is None


def test_a_run_folder_and_its_model_give_the_crop_it_trained_at(tmp_path):
  run = tmp_path / 'run'
  run.mkdir()
  (run / runfiles.CONFIG).write_text(json.dumps({'resolution': [36, 32]}))
  for model in (run, run / runfiles.MODEL):
    assert runfiles.trained_crop(str(model)) == 32
  # A file of another name beside a config.json (a Hub download's, say)
  # says nothing; neither does a damaged or resolution-less config.json.
  assert runfiles.trained_crop(str(run / 'other.npz')) is None
  assert runfiles.trained_crop('BiT-M-R50x1') is None
  for text in ('{"resolution": [36', '{"classes": [1, 2]}', '[36, 32]'):
    (run / runfiles.CONFIG).write_text(text)
    assert runfiles.trained_crop(str(run)) is None
