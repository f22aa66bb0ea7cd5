"""bit_jax.train end to end on a generated image folder: it learns, and
4 devices, --batch_split 4 and a resume after SIGTERM all give the run's
numbers."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

import bit_common
from conftest import REPO, synthetic_weights, write_imagefolder

pytest.importorskip('jax')
pytest.importorskip('tensorflow')
from bit_jax import train  # noqa: E402

STEPS = 12


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp('jax_train')
  # Runs of the same model share compiled steps through JAX's cache.
  import jax
  saved = {k: getattr(jax.config, k) for k in (
      'jax_compilation_cache_dir', 'jax_persistent_cache_min_compile_time_secs')}
  jax.config.update('jax_compilation_cache_dir', str(root / 'xla_cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  npz = root / 'R14.npz'
  np.savez(npz, **synthetic_weights('R14x0.5', head_size=10))
  folder = write_imagefolder(root / 'images', train=8, val=6, size=(32, 32))
  yield root, str(npz), folder
  for k, v in saved.items():
    jax.config.update(k, v)


def _argv(setup, name, *extra):
  root, npz, folder = setup
  return ['--name', name, '--logdir', str(root / 'runs'), '--model', npz,
          '--dataset', 'imagefolder', '--datadir', folder, '--batch', '8',
          '--total_steps', str(STEPS), '--resize_size', '36', '--crop_size',
          '32', '--base_lr', '0.03', '--workers', '1', *extra]


def _run(setup, name, *extra):
  return train.main(train.argparser().parse_args(_argv(setup, name, *extra)))


def _weights(setup, name):
  return bit_common.load_npz(str(setup[0] / 'runs' / name / 'model.npz'))


def _assert_same(a, b, exact=False):
  assert set(a) == set(b)
  for k in a:
    if exact:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    else:
      np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=2e-5,
                                 err_msg=k)


@pytest.fixture(scope='module')
def reference(setup):
  result = _run(setup, 'ref', '--eval_every', '6')
  return result, _weights(setup, 'ref')


def test_learns_and_writes_outputs(setup, reference):
  result, _ = reference
  run = setup[0] / 'runs' / 'ref'
  assert result['n'] == 18 and result['step'] == STEPS
  assert result['top1'] > 0.6                   # 3 classes: chance is 1/3
  records = [json.loads(l) for l in open(run / 'metrics.jsonl')]
  train_loss = [r['loss'] for r in records if r['split'] == 'train']
  assert len(train_loss) == STEPS and train_loss[-1] < train_loss[0]
  assert [r['step'] for r in records if r['split'] == 'val'] == [6, 12]
  config = json.load(open(run / 'config.json'))
  assert config['resolution'] == [36, 32] and config['dataset_size'] == 24
  assert config['classes'] == ['cat', 'dog', 'owl'] and config['devices'] == 1
  assert json.load(open(run / 'results.json'))['top1'] == result['top1']
  # The exported model loads in PyTorch and gives the same predictions.
  pytest.importorskip('torch')
  from bit_pytorch import models as torch_models
  net = torch_models.create('x', weights=_weights(setup, 'ref')).eval()
  assert net.head.conv.weight.shape[0] == 3


def test_batch_split_gives_the_same_update(setup, reference):
  _run(setup, 'split4', '--batch_split', '4', '--eval_every', '6')
  _assert_same(_weights(setup, 'split4'), reference[1])


def test_resume_after_sigterm_equals_uninterrupted_run(setup, reference,
                                                       sigterm_after_step):
  sigterm_after_step(4)
  with pytest.raises(SystemExit) as stop:
    _run(setup, 'resumed', '--eval_every', '6')
  assert stop.value.code == 128 + signal.SIGTERM
  run = setup[0] / 'runs' / 'resumed'
  assert not (run / 'results.json').exists()
  assert os.listdir(run / 'checkpoints') == ['4']
  sigterm_after_step(None)
  result = _run(setup, 'resumed', '--eval_every', '6')
  assert result == reference[0]
  _assert_same(_weights(setup, 'resumed'), reference[1], exact=True)
  steps = [json.loads(l)['step'] for l in open(run / 'metrics.jsonl')]
  assert steps == sorted(steps) and len(steps) == STEPS + 2


def test_four_devices_equal_one(setup, reference):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
             PYTHONPATH=REPO, JAX_PLATFORMS='cpu',
             JAX_COMPILATION_CACHE_DIR=str(setup[0] / 'xla_cache'))
  proc = subprocess.run(
      [sys.executable, '-m', 'bit_jax.train', *_argv(setup, 'dev4',
                                                     '--eval_every', '6')],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  run = setup[0] / 'runs' / 'dev4'
  assert json.load(open(run / 'config.json'))['devices'] == 4
  _assert_same(_weights(setup, 'dev4'), reference[1])
  result = json.load(open(run / 'results.json'))
  assert result['n'] == 18
  assert result['top1'] == pytest.approx(reference[0]['top1'])


def test_bad_input_exits_2_before_work(setup, tmp_path):
  for extra, message in ((('--batch', '6', '--batch_split', '4'),
                          'not divisible'),
                         (('--precision', 'fp16'), 'bf16')):
    args = train.argparser().parse_args(_argv(setup, 'bad', *extra))
    with pytest.raises(bit_common.BadInput, match=message):
      train.main(args)
  assert not (setup[0] / 'runs' / 'bad' / 'config.json').exists()
