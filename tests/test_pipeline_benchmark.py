"""benchmarks.pipeline: the input-pipeline benchmark runs each backend's own
training batches (PyTorch's DataLoader, the grain loader of JAX and TF2),
and predict's decoding threads, on a generated JPEG folder and records their rate per worker and per core
of CPU time.

One tiny run of the command line (a few 40x48 images, a 32 px crop, batch
8, 1 worker, 3 timed batches), as a user runs it, and one with --held
(PyTorch only), which also times the holding. No speed is asserted: the
test checks that every timed batch was a real batch of the pipeline.
"""
import json
import math
import os
import subprocess
import sys

import pytest

from benchmarks.measure import REPO

pytestmark = pytest.mark.slow  # starts both pipelines in a new Python

BATCH, CROP, BATCHES = 8, 32, 3
# Each pipeline's image layout: PyTorch NCHW, the loader of JAX and TF2 and
# predict's NHWC.
SHAPES = {'pytorch': [BATCH, 3, CROP, CROP], 'jax': [BATCH, CROP, CROP, 3],
          'predict': [BATCH, CROP, CROP, 3]}


def run_bench(out, backends, *extra):
  subprocess.run(
      [sys.executable, '-m', 'benchmarks.pipeline', '--backends',
       ','.join(backends), '--workers', '1', '--batch', str(BATCH),
       '--batches', str(BATCHES), '--warmup', '1', '--resolution', str(CROP),
       '--image_size', '40x48', '--classes', '2', '--per_class', '6',
       '--out', str(out), *extra],
      cwd=REPO, check=True, timeout=300, capture_output=True,
      env=dict(os.environ, JAX_PLATFORMS='cpu'))
  with open(out) as f:
    return json.load(f)


@pytest.fixture(scope='module')
def bench(tmp_path_factory):
  return run_bench(tmp_path_factory.mktemp('pipeline') / 'out.json', SHAPES)


@pytest.mark.parametrize('backend', sorted(SHAPES))
def test_times_real_batches_at_a_positive_rate(bench, backend):
  (res,) = [r for r in bench['results'] if r['backend'] == backend]
  assert res['workers'] == 1 and res['img_s'] > 0
  assert res['img_s_per_worker'] == pytest.approx(res['img_s'])
  assert res['batch_shapes'] == [SHAPES[backend]] * BATCHES
  assert res['resolution'][1] == CROP
  assert (res['mixup'] > 0) == (backend != 'predict')
  assert res['holding'] is None  # decoded at every read
  # The CPU time of the process and its workers (too short a stretch here
  # to bound it by the cores: workers' time comes in ticks of 10 ms).
  assert res['cpu_cores'] > 0
  assert res['img_s_per_core'] == pytest.approx(res['img_s'] /
                                                res['cpu_cores'])
  cores = bench['cores_needed'][backend]
  assert cores['img_s_per_core'] == res['img_s_per_core']
  assert cores['cores'] == math.ceil(bench['target_img_s'] /
                                     res['img_s_per_core'])
  assert bench['cpu']['model']


def test_held_images_and_the_rate_of_holding_them(tmp_path):
  bench = run_bench(tmp_path / 'out.json', ['pytorch'], '--held')
  (res,) = bench['results']
  assert res['batch_shapes'] == [SHAPES['pytorch']] * BATCHES
  holding = res['holding']
  assert holding['images'] == 12 and holding['threads'] == 1
  assert holding['img_s'] == pytest.approx(12 / holding['seconds'])
  assert holding['img_s_per_core'] == pytest.approx(holding['img_s'] /
                                                    holding['cpu_cores'])
