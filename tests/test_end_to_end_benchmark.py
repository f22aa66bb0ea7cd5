"""benchmarks.end_to_end: the end-to-end benchmark runs each backend's
real trainer on a generated JPEG folder larger than the crop, with mixup
and periodic checkpoints, and reports its rate next to the pure step's.

One tiny run of the command line (R14x0.5, 32 px, 12 steps, a checkpoint
every 4), shared by the tests, in PyTorch: the other backends' end-to-end
runs are those of the GPU check's CPU mode (tests/test_gpu_check.py). No
speed is asserted: the benchmark reports speeds, the tests check what was
run and recorded.
"""
import json
import os
from unittest import mock

import pytest
from PIL import Image

from benchmarks import end_to_end

pytestmark = pytest.mark.slow  # whole runs: left out of make test-fast

BACKENDS = ('pytorch',)
STEPS, SAVE_EVERY, SKIP, CROP = 12, 4, 4, 32


@pytest.fixture(scope='module')
def bench(tmp_path_factory):
  """(JSON the command wrote, its work folder)."""
  work = tmp_path_factory.mktemp('e2e')
  out = work / 'out.json'
  with mock.patch.dict(os.environ, JAX_PLATFORMS='cpu'):
    end_to_end.main([
        '--arch', 'R14x0.5', '--resolution', str(CROP), '--batch', '8',
        '--frameworks', ','.join(BACKENDS), '--precisions', 'fp32',
        '--steps', str(STEPS), '--skip', str(SKIP),
        '--save_every', str(SAVE_EVERY), '--workers', '1',
        '--classes', '3', '--per_class', '8', '--step_steps', '2',
        '--step_warmup', '1', '--workdir', str(work / 'work'),
        '--json', str(out)])
  with open(out) as f:
    return json.load(f), work / 'work'


def result(bench, backend):
  (res,) = bench[0]['rounds'][f'{backend}/fp32']
  return res


@pytest.mark.parametrize('backend', BACKENDS)
def test_reports_positive_end_to_end_and_step_rates(bench, backend):
  res = result(bench, backend)
  assert 'e2e_error' not in res and 'step_error' not in res, res
  assert res['e2e_img_s'] > 0 and res['step_img_s'] > 0
  assert res['ratio'] == pytest.approx(res['e2e_img_s'] / res['step_img_s'])
  # The timed stretch starts after the untimed first steps and ends last.
  assert res['timed_steps'][0] > SKIP and res['timed_steps'][1] == STEPS
  # 96 reads of 24 images: the run held them, and the time it took is read
  # from its log (whole before the first step: outside the timed windows).
  assert res['hold_images'] is True and 0 <= res['held_s'] <= res['other_s']
  (row,) = [r for r in bench[0]['summary'] if r['framework'] == backend]
  assert row['e2e_img_s'] == res['e2e_img_s']
  assert bench[0]['cpu']['model']


@pytest.mark.parametrize('backend', BACKENDS)
def test_the_run_checkpointed_with_mixup_at_the_crop(bench, backend):
  res = result(bench, backend)
  # Checkpoints were written during the run: the newest two are kept, and
  # the older one is from before the end.
  assert res['checkpoint_steps_kept'] == [STEPS - SAVE_EVERY, STEPS]
  assert res['checkpoints_timed'] >= 1
  with open(os.path.join(res['run_dir'], 'config.json')) as f:
    config = json.load(f)
  assert config['mixup_alpha'] == 0.1 and config['mixup'] == 0.1
  assert config['total_steps'] == STEPS and config['save_every'] == SAVE_EVERY
  # The HyperRule resized the larger images, then the crop was taken.
  resize, crop = config['resolution']
  assert crop == CROP and resize > CROP
  assert min(res['image_size']) > CROP
  with open(os.path.join(res['run_dir'], 'results.json')) as f:
    assert json.load(f)['step'] == STEPS


def test_the_folder_holds_jpeg_files_larger_than_the_crop(bench):
  folder = bench[1] / 'images'
  for split in ('train', 'val'):
    classes = sorted(os.listdir(folder / split))
    assert classes == ['class_00', 'class_01', 'class_02']
    for c in classes:
      files = sorted(os.listdir(folder / split / c))
      assert files and all(f.endswith('.jpg') for f in files)
      with Image.open(folder / split / c / files[0]) as im:
        assert im.format == 'JPEG' and min(im.size) > CROP


def test_windows_cover_every_step_once():
  rows = [{'step': s, 'images_per_sec': v} for s, v in
          zip(range(1, 9), (5.0,) * 4 + (7.0,) * 2 + (7.5,) * 2)]
  assert end_to_end.windows(rows) == [
      {'steps': [1, 4], 'img_s': 5.0}, {'steps': [5, 6], 'img_s': 7.0},
      {'steps': [7, 8], 'img_s': 7.5}]


def test_rates_with_and_between_checkpoints_from_a_run_folder(tmp_path):
  """read_run on a hand-written run folder: 30 steps of batch 10 in windows
  of 10; a checkpoint after step 20 slows the window 21-30."""
  (tmp_path / 'config.json').write_text(json.dumps(
      {'schedule': [10, 20, 30], 'resolution': [40, 32], 'mixup': 0.1,
       'device': 'cpu'}))
  (tmp_path / 'results.json').write_text(json.dumps({'top1': 0.5}))
  rates = [50.0] * 10 + [100.0] * 10 + [20.0] * 10   # img/s per window
  (tmp_path / 'metrics.jsonl').write_text(''.join(
      json.dumps({'split': 'train', 'step': s, 'loss': 1.0,
                  'images_per_sec': r}) + '\n'
      for s, r in zip(range(1, 31), rates)))
  out = end_to_end.read_run(str(tmp_path), 'jax', batch=10, skip=10,
                            save_every=20)
  # Timed: steps 11-30, 1 s (11-20) and 5 s (21-30, the checkpoint's).
  assert out['timed_steps'] == [11, 30] and out['checkpoints_timed'] == 1
  assert out['e2e_img_s'] == pytest.approx(200 / 6)
  assert out['between_checkpoints_img_s'] == pytest.approx(100.0)
  assert out['checkpoint_s'] == pytest.approx(4.0)
  end_to_end.add_ratios(out, step_img_s=125.0)
  assert out['ratio'] == pytest.approx(200 / 6 / 125)
  assert out['ratio_between_checkpoints'] == pytest.approx(0.8)


def test_each_run_compiles_afresh(tmp_path):
  """Each run's JAX and torch.compile caches are new folders of its own in
  the work folder, not the user's (where a run before it left compiled
  steps), so its first step's time holds the whole compilation; a cache
  the caller names is kept."""
  envs = []

  def fake_run(command, env, **unused):
    envs.append(env)
    os.makedirs(os.path.join(tmp_path, 'runs', command[command.index(
        '--name') + 1]))
    return mock.Mock(returncode=1, stderr='error: stop here', stdout='')
  with mock.patch.object(end_to_end.subprocess, 'run', fake_run):
    for env in (None, None, {'JAX_COMPILATION_CACHE_DIR': 'mine'}):
      assert 'error' in end_to_end.measure_end_to_end(
          'jax', 'R14x0.5', 32, 8, 'fp32', 20, 'images', str(tmp_path),
          weights='w.npz', env=env)
  caches = [(e['JAX_COMPILATION_CACHE_DIR'], e['TORCHINDUCTOR_CACHE_DIR'])
            for e in envs]
  assert len(set(caches[:2])) == 2 and caches[2][0] == 'mine'
  for folder in (*caches[0], *caches[1], caches[2][1]):
    assert folder.startswith(str(tmp_path / 'compilation_caches'))
