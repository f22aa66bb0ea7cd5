"""bit_tf2.train end to end on a generated image folder with a tiny model
(R14x0.5, 32 px), offline: one reference run, and 2 logical CPU devices
under MirroredStrategy, --batch_split 4 and a resume after SIGTERM all give
its weights."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

import bit_common
from bit_tf2 import train
from conftest import REPO, synthetic_weights, write_imagefolder

STEPS = 12
TINY = ['--resize_size', '40', '--crop_size', '32', '--workers', '2',
        '--base_lr', '0.05', '--batch', '8', '--total_steps', str(STEPS)]


def _flags(setup, name, *extra):
  root, folder, npz = setup
  return ['--name', name, '--logdir', str(root / 'runs'), '--model', npz,
          '--dataset', 'imagefolder', '--datadir', folder, *TINY, *extra]


def _run(setup, name, *extra):
  return train.main(train.argparser().parse_args(_flags(setup, name, *extra)))


def _weights(setup, name):
  return bit_common.load_npz(str(setup[0] / 'runs' / name / 'model.npz'))


def _assert_same(a, b, atol=2e-5):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=0, atol=atol, err_msg=k)


def _metrics(setup, name):
  with open(setup[0] / 'runs' / name / 'metrics.jsonl') as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp('tf2')
  folder = write_imagefolder(root / 'images', train=8, val=5)
  npz = root / 'tiny.npz'
  np.savez(npz, **synthetic_weights('R14x0.5', 10))
  return root, folder, str(npz)


@pytest.fixture(scope='module')
def reference(setup):
  result = _run(setup, 'reference', '--eval_every', '6')
  return result, _weights(setup, 'reference')


def test_tiny_run_learns_and_writes_every_output(setup, reference):
  result, weights = reference
  run = setup[0] / 'runs' / 'reference'
  assert sorted(os.listdir(run)) == ['checkpoints', 'config.json',
                                     'metrics.jsonl', 'model.npz',
                                     'results.json', 'train.log']
  assert result['top1'] >= 0.8, result  # 3 classes: chance is 1/3
  results = json.loads((run / 'results.json').read_text())
  assert results['top1'] == result['top1'] and results['step'] == STEPS
  assert results['n'] == 15  # every validation image, 3 classes x 5
  records = _metrics(setup, 'reference')
  train_loss = [r['loss'] for r in records if r['split'] == 'train']
  assert len(train_loss) == STEPS
  assert train_loss[0] == pytest.approx(np.log(3), abs=1e-4)  # zero head
  assert [r['step'] for r in records if r['split'] == 'val'] == [6, 12]
  assert records[-1]['loss'] < 0.5 * np.log(3)
  config = json.loads((run / 'config.json').read_text())
  assert config['resolution'] == [40, 32] and config['devices'] == 1
  assert config['classes'] == ['cat', 'dog', 'owl']
  assert config['schedule'][-1] == STEPS and config['dataset_size'] == 24
  # The export is a published-layout checkpoint with a 3-class head.
  bit_common.check_weights(weights, bit_common.parse_arch('R14x0.5'), 3)


def test_batch_split_gives_the_same_update(setup, reference):
  result = _run(setup, 'split4', '--batch_split', '4', '--eval_every', '6')
  _assert_same(_weights(setup, 'split4'), reference[1])
  assert result['top1'] == reference[0]['top1']


def test_resume_after_sigterm_equals_uninterrupted_run(setup, reference,
                                                       sigterm_after_step):
  sigterm_after_step(4)
  with pytest.raises(SystemExit) as stop:
    _run(setup, 'resumed', '--eval_every', '6')
  assert stop.value.code == 128 + signal.SIGTERM
  run = setup[0] / 'runs' / 'resumed'
  assert not (run / 'results.json').exists()
  assert 'ckpt-4.index' in os.listdir(run / 'checkpoints')
  sigterm_after_step(None)
  result = _run(setup, 'resumed', '--eval_every', '6')
  _assert_same(_weights(setup, 'resumed'), reference[1], atol=1e-6)
  assert result['top1'] == reference[0]['top1']
  assert result['loss'] == pytest.approx(reference[0]['loss'], abs=1e-5)
  steps = [r['step'] for r in _metrics(setup, 'resumed')]
  assert steps == sorted(steps) and len(steps) == STEPS + 2


def test_two_logical_cpu_devices_equal_one(setup, reference):
  # Logical devices must be configured before TensorFlow starts: a new Python.
  code = (
      'import sys, tensorflow as tf\n'
      'cpu = tf.config.list_physical_devices("CPU")[0]\n'
      'tf.config.set_logical_device_configuration(\n'
      '    cpu, [tf.config.LogicalDeviceConfiguration()] * 2)\n'
      'from bit_tf2 import train\n'
      'train.main(train.argparser().parse_args(sys.argv[1:]))\n')
  env = dict(os.environ, PYTHONPATH=REPO)
  proc = subprocess.run(
      [sys.executable, '-c', code, *_flags(setup, 'two', '--eval_every', '6')],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
      check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  config = json.loads((setup[0] / 'runs' / 'two' / 'config.json').read_text())
  assert config['devices'] == 2 and config['strategy'] == 'MirroredStrategy'
  _assert_same(_weights(setup, 'two'), reference[1])
  val = [r for r in _metrics(setup, 'two') if r['split'] == 'val']
  assert val[-1]['n'] == 15 and val[-1]['top1'] == reference[0]['top1']


@pytest.mark.parametrize('extra,message', [
    (['--batch_split', '3'], 'not divisible by --batch_split 3'),
    (['--model', 'BiT-M-R51x1'], 'unknown model'),
])
def test_bad_flags_exit_2_before_work(setup, extra, message):
  proc = subprocess.run(
      [sys.executable, '-m', 'bit_tf2.train', *_flags(setup, 'bad', *extra)],
      cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True,
      text=True, timeout=300, check=False)
  assert proc.returncode == 2, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and message in last, last
  assert not (setup[0] / 'runs' / 'bad').exists()


def test_resuming_with_other_settings_is_refused(setup, reference):
  del reference  # the run it would resume
  with pytest.raises(bit_common.BadInput, match='base_lr: 0.05 there, 0.1'):
    _run(setup, 'reference', '--base_lr', '0.1')


def test_truncated_image_stops_with_one_line_unless_skipped(setup, tmp_path):
  root, _, npz = setup
  folder = write_imagefolder(tmp_path / 'images', train=4, val=2)
  path = os.path.join(folder, 'val', 'cat', '000.png')
  with open(path, 'rb') as f:
    head = f.read(100)  # the header reads; the pixels do not
  with open(path, 'wb') as f:
    f.write(head)
  flags = ['--logdir', str(tmp_path / 'runs'), '--model', npz, '--dataset',
           'imagefolder', '--datadir', folder, *TINY[:6], '--batch', '4',
           '--total_steps', '1']
  with pytest.raises(bit_common.BadInput, match='--skip_bad_images') as e:
    train.main(train.argparser().parse_args(['--name', 'trunc', *flags]))
  assert '\n' not in str(e.value)
  result = train.main(train.argparser().parse_args(
      ['--name', 'skip', *flags, '--skip_bad_images']))
  assert result['n'] == 5 and result['step'] == 1


def test_fp16_with_loss_scaling_learns_and_exports_a_saved_model(setup):
  import tensorflow as tf
  result = _run(setup, 'fp16', '--precision', 'fp16', '--export_saved_model')
  assert result['top1'] >= 0.8, result
  run = setup[0] / 'runs' / 'fp16'
  weights = _weights(setup, 'fp16')
  assert all(v.dtype == np.float32 and np.isfinite(v).all()
             for v in weights.values())
  served = tf.saved_model.load(str(run / 'saved_model'))
  images = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3))
  logits = served.serve(images.astype(np.float32)).numpy()
  assert logits.shape == (2, 3) and logits.dtype == np.float32
  assert np.isfinite(logits).all()
