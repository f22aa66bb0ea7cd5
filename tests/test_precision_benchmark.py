"""benchmarks.precision: the accuracy comparison behind the default
precision on GPUs (docs/gpu.md). One tiny run of the command line (one
seed, one example per class), as a user runs it: each precision's top-1 is
that run's own final evaluation, and the difference is theirs; the runs'
folders are gone afterwards."""
import json
import os
import subprocess
import sys

import pytest

from benchmarks.measure import REPO

pytestmark = pytest.mark.slow  # two demo fine-tunings


def test_fp32_and_bf16_fine_tune_and_are_compared(tmp_path):
  out = tmp_path / 'precision.json'
  scratch = tmp_path / 'tmp'  # the command's temporary folder
  scratch.mkdir()
  proc = subprocess.run(
      [sys.executable, '-m', 'benchmarks.precision', '--precisions',
       'fp32,bf16', '--shots', '1', '--seeds', '1', '--processes', '2',
       '--out', str(out)],
      cwd=REPO, timeout=600, capture_output=True, text=True,
      env=dict(os.environ, TMPDIR=str(scratch)))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert not list(scratch.iterdir())
  with open(out) as f:
    rows = json.load(f)['rows']
  assert [r['shots'] for r in rows] == ['1']
  (row,) = rows
  for p in ('fp32', 'bf16'):
    assert len(row[p]) == 1 and 0.1 < row[p][0] <= 1  # above chance (10%)
  assert row['bf16-fp32'] == [pytest.approx(row['bf16'][0] - row['fp32'][0])]
  assert '1 per class: fp32 median' in proc.stdout
