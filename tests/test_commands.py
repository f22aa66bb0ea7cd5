"""Every documented command (docs/cli.md) run once as a user types it,
`python -m MODULE ...` in a fresh process, end to end on small local data,
and what it wrote or printed checked (issue 22, item 7).

Data: the tiny TFDS builders of test_tfds.py (`toy_dir`: 4 classes,
40/12/8 images of about 21x24 px; `dsprites_dir`: a stand-in of the real
dSprites builder, for vtab:TASK). Models: R14x0.5 from conftest's synthetic
weights, at 32 px, 2 steps. One fine-tuning run per backend is shared by the
commands that take a run (export, validate, predict, features, distill).

Commands already run as subprocesses elsewhere are not repeated here:
bit_pytorch.predict (test_pytorch_models.py), bit_tf2.predict
(test_tf2_models.py), bit_pytorch.train under torchrun
(test_multiprocess.py; the command starting torchrun by itself is here),
and fine-tuning on image folders (test_trainers.py). bit_pytorch.distill
is run there only to be refused, so it runs here too.

--compile costs about 70 s on 2 CPU cores the first time on a machine;
later runs reuse inductor's cache (/tmp/torchinductor_$USER): about 7 s.
"""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from big_transfer import predict, tfds_reader, zoo
from conftest import REPO, synthetic_weights, write_imagefolder
from test_distill import TINY as TINY_DISTILL
from test_distill import recipe_file
from test_hub_export import timm_bit, tflite_logits
from test_tf2_models import write_keras2_h5
# The tiny TFDS builders, prepared once for this module too.
from test_tfds import CLASSES, dsprites_dir, toy_dir  # noqa: F401  pylint: disable=unused-import

pytestmark = pytest.mark.slow  # whole commands: left out of make test-fast

BACKENDS = ('pytorch', 'tf2', 'jax')
TOY = 'tfds:bit_tfds_toy'
STEPS = 2
EVAL_N = 12  # the toy's validation split
TRAIN = ['--train_split', 'train[:16]', '--eval_split', 'validation',
         '--batch', '8', '--total_steps', str(STEPS), '--resize_size', '32',
         '--crop_size', '32', '--base_lr', '0.01', '--workers', '0',
         '--batch_eval', '12']  # one evaluation batch
ENV = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2')
ENV.pop('WORLD_SIZE', None)


def command(module, *args, cwd=REPO, timeout=300, env=None):
  """`python -m module args...` as a user runs it (`env`: more variables)."""
  return subprocess.run([sys.executable, '-m', module, *map(str, args)],
                        cwd=cwd, env=dict(ENV, **(env or {})),
                        capture_output=True, text=True, timeout=timeout)


def ok(proc):
  """The finished command, which must have succeeded."""
  assert proc.returncode == 0, (
      f'{" ".join(proc.args)}\nexit {proc.returncode}\n{proc.stderr[-4000:]}')
  return proc


def read_json(path):
  with open(path) as f:
    return json.load(f)


def torch_logits(weights, x_nhwc):
  """Logits of `weights` through bit_pytorch's model (the reference)."""
  from bit_pytorch import models  # pylint: disable=import-outside-toplevel
  net = models.create('w', weights=weights).eval()
  with torch.no_grad():
    return net(torch.from_numpy(x_nhwc).permute(0, 3, 1, 2)).numpy()


def images(n, size=32, seed=0):
  return np.random.default_rng(seed).uniform(
      -1, 1, (n, size, size, 3)).astype(np.float32)


def assert_close(got, want, rel=1e-4):
  np.testing.assert_allclose(got, want, rtol=0,
                             atol=rel * max(1.0, np.abs(want).max()))


@pytest.fixture(scope='module')
def root(tmp_path_factory):
  root = tmp_path_factory.mktemp('commands')
  np.savez(root / 'tiny.npz', **synthetic_weights('R14x0.5', 10))
  return root


class Runs(dict):
  """{backend: run folder} of one fine-tuning on tfds:bit_tfds_toy each,
  started as a command when first asked for."""

  def __init__(self, root, data_dir):
    super().__init__()
    self.root, self.data_dir = root, data_dir
    self.procs = {}  # a failed run fails every test of it, run once

  def __missing__(self, backend):
    if backend not in self.procs:
      self.procs[backend] = command(
          f'bit_{backend}.train', '--name', 'toy', '--logdir',
          self.root / backend, '--model', self.root / 'tiny.npz',
          '--dataset', TOY, '--datadir', self.data_dir, *TRAIN)
    ok(self.procs[backend])
    self[backend] = self.root / backend / 'toy'
    return self[backend]


@pytest.fixture(scope='module')
def runs(root, toy_dir):  # noqa: F811
  return Runs(root, toy_dir)


# --------------------------------------------------------------------------
# Fine-tuning on tfds:NAME and vtab:TASK


@pytest.mark.parametrize('backend', BACKENDS)
def test_train_on_a_tfds_dataset(runs, toy_dir, backend):  # noqa: F811
  run = runs[backend]
  results = read_json(run / 'results.json')
  assert results['step'] == STEPS and results['n'] == EVAL_N
  assert results['split'] == 'val' and results['name'] == 'toy'
  assert 0 <= results['top1'] <= results['top5'] <= 1
  assert np.isfinite(results['loss'])
  config = read_json(run / 'config.json')
  assert config['classes'] == CLASSES and config['dataset'] == TOY
  assert config['precision'] == 'fp32'  # the default on the CPU
  assert config['datadir'] == toy_dir
  assert (config['train_split'], config['eval_split']) == ('train[:16]',
                                                           'validation')
  with open(run / 'metrics.jsonl') as f:
    rows = [json.loads(line) for line in f]
  assert [r['step'] for r in rows if r['split'] == 'train'] == [1, 2]
  assert [(r['step'], r['n']) for r in rows if r['split'] == 'val'] == [
      (STEPS, EVAL_N)]
  weights = zoo.load_npz(str(run / 'model.npz'))
  assert weights['resnet/head/conv2d/kernel'].shape == (1, 1, 1024, 4)
  assert (run / ('bit.pth.tar' if backend == 'pytorch' else
                 'checkpoints')).exists()


def test_train_on_a_vtab_task(root, dsprites_dir):  # noqa: F811
  """vtab:dsprites-xpos (16 classes of x position) in PyTorch, VTAB's
  train800 / test splits."""
  ok(command('bit_pytorch.train', '--name', 'xpos', '--logdir', root / 'vtab',
             '--model', root / 'tiny.npz', '--dataset', 'vtab:dsprites-xpos',
             '--datadir', dsprites_dir, '--train_split', 'train800',
             '--eval_split', 'test', '--batch', '8', '--total_steps', '2',
             '--resize_size', '32', '--crop_size', '32', '--workers', '0'))
  run = root / 'vtab' / 'xpos'
  results = read_json(run / 'results.json')
  assert results['step'] == 2 and results['n'] == 125
  config = read_json(run / 'config.json')
  assert len(config['classes']) == 16 and config['dataset_size'] == 800
  assert zoo.load_npz(str(run / 'model.npz'))[
      'resnet/head/conv2d/bias'].shape == (16,)


def test_tfds_reader_command(tmp_path, toy_dir, dsprites_dir):  # noqa: F811
  """python -m big_transfer.tfds_reader on two datasets already prepared in
  one data_dir (preparing needs the network, or a builder registered in the
  process): one JSON line per dataset, what the backends will read."""
  for data_dir, name in ((toy_dir, 'bit_tfds_toy'), (dsprites_dir, 'dsprites')):
    os.symlink(os.path.join(data_dir, name), tmp_path / name)
  proc = ok(command('big_transfer.tfds_reader', TOY,
                    'vtab:dsprites-orientation', '--datadir', tmp_path))
  toy, xpos = [json.loads(l) for l in proc.stdout.strip().splitlines()]
  assert toy['dataset'] == TOY and toy['tfds_name'] == 'bit_tfds_toy'
  assert (toy['train_split'], toy['eval_split']) == ('train', 'validation')
  assert (toy['train_size'], toy['eval_size'], toy['num_classes']) == (
      40, 12, 4)
  assert toy['original_hw'] == [21, 24]
  assert xpos['dataset'] == 'vtab:dsprites-orientation'
  assert (xpos['train_split'], xpos['eval_split']) == ('train800val200',
                                                       'test')
  assert (xpos['train_size'], xpos['eval_size'], xpos['num_classes']) == (
      1000, 125, 16)
  assert xpos['data_dir'] == str(tmp_path / 'dsprites' / '2.0.0')


# --------------------------------------------------------------------------
# --compile and --precision in PyTorch and TF2


def test_pytorch_compile(runs, root, toy_dir):  # noqa: F811
  """--compile: the same 2 steps as the shared PyTorch run, the same result
  up to the compiled kernels' rounding. Evaluated in batches of 8 and 4, the
  smaller padded (engine.eval_batches): no compilation for a second shape."""
  done = ok(command('bit_pytorch.train', '--name', 'compiled', '--logdir',
                    root / 'pytorch', '--model', root / 'tiny.npz',
                    '--dataset', TOY, '--datadir', toy_dir, *TRAIN,
                    '--batch_eval', '8', '--compile', timeout=600,
                    env={'TORCH_LOGS': 'recompiles'}))
  assert re.search(r'the first step took [\d.]+ s', done.stderr)
  # The log names each compilation after the first (evaluation's mode).
  assert 'Recompiling' in done.stderr
  assert 'size mismatch' not in done.stderr, done.stderr[-3000:]
  got = read_json(root / 'pytorch' / 'compiled' / 'results.json')
  want = read_json(runs['pytorch'] / 'results.json')
  assert got['step'] == STEPS and got['n'] == EVAL_N
  assert got['loss'] == pytest.approx(want['loss'], rel=1e-3)
  assert read_json(root / 'pytorch' / 'compiled' / 'config.json')['compiled']
  # Without the flag, a CPU run is not compiled.
  assert not read_json(runs['pytorch'] / 'config.json')['compiled']


def test_pytorch_fp16(runs, root, toy_dir):  # noqa: F811
  ok(command('bit_pytorch.train', '--name', 'fp16', '--logdir',
             root / 'pytorch', '--model', root / 'tiny.npz', '--dataset', TOY,
             '--datadir', toy_dir, *TRAIN, '--precision', 'fp16'))
  got = read_json(root / 'pytorch' / 'fp16' / 'results.json')
  want = read_json(runs['pytorch'] / 'results.json')
  assert got['step'] == STEPS and got['n'] == EVAL_N
  assert read_json(root / 'pytorch' / 'fp16' / 'config.json')[
      'precision'] == 'fp16'
  assert got['loss'] == pytest.approx(want['loss'], rel=0.05)


def test_tf2_compiled_bf16_as_on_a_gpu(runs, root, toy_dir):  # noqa: F811
  """What TF2 runs on a GPU, on the CPU: XLA-compiled training and
  evaluation steps with the mixed_bfloat16 policy. The same 2 steps as the
  shared run, up to bf16's rounding."""
  ok(command('bit_tf2.train', '--name', 'xla_bf16', '--logdir',
             root / 'tf2', '--model', root / 'tiny.npz', '--dataset', TOY,
             '--datadir', toy_dir, *TRAIN, '--compile', '--precision',
             'bf16'))
  got = read_json(root / 'tf2' / 'xla_bf16' / 'results.json')
  want = read_json(runs['tf2'] / 'results.json')
  assert got['step'] == STEPS and got['n'] == EVAL_N
  assert got['loss'] == pytest.approx(want['loss'], rel=0.05)
  config = read_json(root / 'tf2' / 'xla_bf16' / 'config.json')
  assert config['xla'] is True
  assert config['precision'] == 'bf16'
  assert read_json(runs['tf2'] / 'config.json')['xla'] is False


# --------------------------------------------------------------------------
# bit_pytorch.train starting torchrun itself


def test_pytorch_train_starts_torchrun_on_several_gpus(root, toy_dir):  # noqa: F811
  """With two GPUs (torch.cuda.device_count patched) and no WORLD_SIZE, the
  command replaces itself with torchrun, one process per GPU, passing the
  user's flags on; os.execv is patched to print its argv instead."""
  script = (
      'import json, os, sys, torch\n'
      'torch.cuda.device_count = lambda: 2\n'
      'def execv(path, argv):\n'
      '  print(json.dumps([path, *argv]), flush=True)\n'
      '  os._exit(0)\n'
      'os.execv = execv\n'
      'from bit_pytorch import train\n'
      'train.cli()\n'
      'sys.exit("cli() returned without starting torchrun")\n')
  flags = ['--name', 'ddp', '--logdir', str(root / 'ddp'), '--model',
           str(root / 'tiny.npz'), '--dataset', TOY, '--datadir', toy_dir,
           *TRAIN]
  proc = ok(subprocess.run([sys.executable, '-c', script, *flags], cwd=REPO,
                           env=ENV, capture_output=True, text=True,
                           timeout=120))
  argv = json.loads(proc.stdout.strip().splitlines()[-1])
  assert argv == [sys.executable, sys.executable, '-m',
                  'torch.distributed.run', '--standalone',
                  '--nproc_per_node=2', '-m', 'bit_pytorch.train', *flags]
  assert not (root / 'ddp' / 'ddp' / 'results.json').exists()
  # A batch that two GPUs cannot share is refused before torchrun starts.
  flags[flags.index('--batch') + 1] = '9'
  proc = subprocess.run([sys.executable, '-c', script, *flags], cwd=REPO,
                        env=ENV, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stdout == ''
  assert proc.stderr.strip().splitlines()[-1].startswith(
      'error: --batch 9 is not divisible by --batch_split 1 times 2 device')


# --------------------------------------------------------------------------
# Exports


def onnx_logits(path, x_nhwc):
  import onnxruntime  # pylint: disable=import-outside-toplevel
  session = onnxruntime.InferenceSession(
      str(path), providers=['CPUExecutionProvider'])
  return session.run(None, {'images': np.ascontiguousarray(
      x_nhwc.transpose(0, 3, 1, 2))})[0]


def test_pytorch_export_onnx_from_a_run_folder(runs, root):
  run = runs['pytorch']
  out = root / 'exports' / 'toy.onnx'
  proc = ok(command('bit_pytorch.export', '--model', run, '--format', 'onnx',
                    '--out', out, '--resolution', '32'))
  assert proc.stdout.startswith(f'wrote {out} ')
  x = images(3)
  assert_close(onnx_logits(out, x),
               torch_logits(zoo.load_npz(str(run / 'model.npz')), x))


def test_pytorch_export_timm_from_a_checkpoint(runs, root):
  """From bit.pth.tar: timm's folder (no config.json: timm has no name for
  R14x0.5), loaded strictly by timm's own ResNetV2, whose logits are the
  run's model.npz's."""
  from safetensors.torch import load_file  # pylint: disable=import-outside-toplevel
  run = runs['pytorch']
  out = root / 'exports' / 'toy-timm'
  proc = ok(command('bit_pytorch.export', '--model', run / 'bit.pth.tar',
                    '--format', 'timm', '--out', out, '--resolution', '32'))
  assert proc.stdout.startswith(f'wrote {out}/model.safetensors ')
  assert 'timm.models.load_checkpoint' in proc.stdout
  assert sorted(os.listdir(out)) == ['model.safetensors']
  reloaded = timm_bit((1, 1, 1, 1), 0.5, 4)
  reloaded.load_state_dict(load_file(str(out / 'model.safetensors')),
                           strict=True)
  x = images(2, seed=5)
  with torch.no_grad():
    got = reloaded(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
  # timm standardises with eps 1e-8, BiT with 1e-10 (docs/exports.md).
  assert_close(got, torch_logits(zoo.load_npz(str(run / 'model.npz')), x))


@pytest.fixture(scope='module')
def h5(root):
  """The synthetic R14x0.5 (3 classes) as a published Keras-2 .h5, and its
  weights."""
  weights = synthetic_weights('R14x0.5', 3, seed=4)
  return write_keras2_h5(root / 'tiny3.h5', weights), weights


def test_pytorch_export_onnx_from_an_h5(root, h5):
  path, weights = h5
  out = root / 'exports' / 'h5.onnx'
  ok(command('bit_pytorch.export', '--model', path, '--format', 'onnx',
             '--out', out, '--resolution', '32'))
  x = images(2, seed=1)
  assert_close(onnx_logits(out, x), torch_logits(weights, x))


def test_tf2_export_saved_model_from_a_run_folder(runs, root):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  run = runs['tf2']
  out = root / 'exports' / 'toy-saved_model'
  proc = ok(command('bit_tf2.export', '--model', run, '--format',
                    'saved_model', '--out', out, '--resolution', '32'))
  assert proc.stdout.startswith(f'wrote {out} ')
  x = images(3, seed=2)
  loaded = tf.saved_model.load(str(out))
  got = loaded.serve(x).numpy()
  assert_close(got, torch_logits(zoo.load_npz(str(run / 'model.npz')), x))


def test_tf2_export_tflite_from_an_h5(root, h5):
  path, weights = h5
  out = root / 'exports' / 'h5.tflite'
  ok(command('bit_tf2.export', '--model', path, '--format', 'tflite', '--out',
             out, '--resolution', '32'))
  x = images(2, seed=3)
  assert_close(tflite_logits(out, x), torch_logits(weights, x))


# --------------------------------------------------------------------------
# Prediction (JAX; PyTorch's and TF2's are run in their models' tests)


def test_jax_predict(runs, tmp_path):
  """A run folder's classes by name, and its logits as PyTorch computes
  them from the run's model.npz at the crop size the run trained at (32
  px, from its config.json; the images are 40x48, the HyperRule's 128)."""
  run = runs['jax']
  folder = write_imagefolder(tmp_path / 'photos', classes=('a', 'b'),
                             train=2, val=0, size=(40, 48))
  proc = ok(command('bit_jax.predict', folder, '--model', run, '--top_k', '2',
                    '--save_logits', 'logits.npy', cwd=tmp_path))
  files = predict.list_images([folder])
  lines = proc.stdout.strip().splitlines()
  assert [l.split(': ')[0] for l in lines] == files
  x = predict.to_model_input(np.stack([predict.load_image(f, 32)
                                       for f in files]))
  want = torch_logits(zoo.load_npz(str(run / 'model.npz')), x)
  logits = np.load(tmp_path / 'logits.npy')
  assert logits.shape == (4, 4)
  assert_close(logits, want)
  for line, row in zip(lines, want):
    top = np.argsort(-row, kind='stable')[:2]
    shown = [part.split(' (')[0] for part in line.split(': ')[1].split(', ')]
    assert shown == [CLASSES[c] for c in top]


# --------------------------------------------------------------------------
# Validation, features, distillation in each backend


@pytest.mark.parametrize('backend', BACKENDS)
def test_validate(runs, toy_dir, backend):  # noqa: F811
  """The run's own model, validated on the split it evaluated on, gives
  the run's final evaluation, at the crop size it trained at (32 px; the
  HyperRule's would be 128): PyTorch's from its bit.pth.tar, TF2's from
  its model.npz, JAX's from its run folder (both from config.json)."""
  run = runs[backend]
  ckpt = {'pytorch': run / 'bit.pth.tar', 'tf2': run / 'model.npz',
          'jax': run}[backend]
  out = run / 'validate.json'
  proc = ok(command(f'bit_{backend}.validate', '--ckpt_path', ckpt,
                    '--dataset', TOY, '--datadir', toy_dir, '--eval_split',
                    'validation', '--batch_eval', '8', '--workers', '0',
                    '--output', out))
  assert 'images at 32 px' in proc.stderr
  printed = json.loads(proc.stdout.strip().splitlines()[-1])
  assert printed == read_json(out)
  want = read_json(run / 'results.json')
  assert printed['n'] == EVAL_N
  assert printed['top1'] == want['top1'] and printed['top5'] == want['top5']
  assert printed['loss'] == pytest.approx(want['loss'], rel=1e-4)


@pytest.fixture(scope='module')
def features(runs, root, dsprites_dir):  # noqa: F811
  """features(backend): (features, labels) of the PyTorch run's model.npz
  on vtab:dsprites-xpos's test split from that backend's command, at the
  images' own 64 px."""
  model = runs['pytorch'] / 'model.npz'
  got = {}

  def of(backend):
    if backend not in got:
      out = root / f'features-{backend}.npz'
      ok(command(f'bit_{backend}.features', '--model', model, '--dataset',
                 'vtab:dsprites-xpos', '--datadir', dsprites_dir,
                 '--split', 'eval', '--resolution', '64', '--batch', '32',
                 '--workers', '0', '--out', out))
      with np.load(out) as f:
        got[backend] = f['features'], f['labels']
    return got[backend]
  return of


@pytest.mark.parametrize('backend', BACKENDS)
def test_features(features, dsprites_dir, backend):  # noqa: F811
  feats, labels = features(backend)
  assert feats.shape == (125, 1024) and feats.dtype == np.float32
  want = tfds_reader.resolve('vtab:dsprites-xpos', str(dsprites_dir)).read(
      'eval').labels
  np.testing.assert_array_equal(labels, want)
  if backend != 'pytorch':
    assert_close(feats, features('pytorch')[0])


@pytest.mark.parametrize('backend', BACKENDS)
def test_distill(runs, root, toy_dir, backend):  # noqa: F811
  """The PyTorch run as teacher, a new R14x0.5 student, test_distill's tiny
  recipe at 32 px for 2 steps."""
  recipe = recipe_file(str(root), f'distill-{backend}.yaml', **{
      **TINY_DISTILL, 'teacher': str(runs['pytorch']), 'dataset': TOY,
      'datadir': toy_dir, 'resize_size': 32, 'crop_size': 32, 'batch': 8,
      'eval_every': 2, 'batch_eval': 12})
  ok(command(f'bit_{backend}.distill', '--recipe', recipe, '--set',
             'steps=2', '--name', 'student', '--logdir', root / 'distill' /
             backend, '--workers', '0'))
  run = root / 'distill' / backend / 'student'
  results = read_json(run / 'results.json')
  assert results['step'] == 2 and results['n'] == EVAL_N
  assert np.isfinite(results['loss'])
  config = read_json(run / 'config.json')
  assert config['recipe']['steps'] == 2
  assert config['recipe']['teacher'] == str(runs['pytorch'])
  student = zoo.load_npz(str(run / 'model.npz'))
  assert student['resnet/head/conv2d/bias'].shape == (4,)
