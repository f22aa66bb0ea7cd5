"""Progress of long work (big_transfer.progress): the images of an
evaluation, validation or feature extraction shown as they are used, a bar
on a terminal and timed lines elsewhere, on the first process only; and
what the backends' evaluations show."""
import argparse
import io
import logging
import os
import re
import sys

import numpy as np
import pytest
import torch

from big_transfer import datasets, loader, progress
from bit_pytorch import data as torch_data
from bit_pytorch import engine
from conftest import write_imagefolder


class Terminal(io.StringIO):
  def isatty(self):
    return True


@pytest.fixture
def stderr(capsys, monkeypatch):
  """stderr() -> what progress wrote on standard error since the last call
  (a file: lines, one for every batch); terminal() makes standard error a
  terminal (a bar) for the rest of the test."""
  monkeypatch.setattr(progress, 'LINE_SECONDS', 0)
  terminal = Terminal()

  def written():
    if sys.stderr is terminal:
      return terminal.getvalue()
    return capsys.readouterr().err
  written.terminal = lambda: monkeypatch.setattr(sys, 'stderr', terminal)
  return written


def lines(text):
  """(done, total, ETA) of each line of progress.images."""
  return [tuple(map(int, m)) for m in re.findall(
      r'evaluating: (\d+)/(\d+) images, [\d.]+ images/s, ETA (\d+) s', text)]


def test_lines_count_the_images_up_to_the_total(stderr):
  batches = [np.zeros(4), np.zeros(4), np.zeros(2)]
  got = list(progress.images(iter(batches), 10, len, 'evaluating'))
  assert got == batches
  shown = lines(stderr())
  assert [(done, total) for done, total, _ in shown] == [(4, 10), (8, 10),
                                                         (10, 10)]
  assert shown[-1][2] == 0


def test_no_line_for_work_done_sooner(stderr, monkeypatch):
  monkeypatch.setattr(progress, 'LINE_SECONDS', 3600)
  assert len(list(progress.images(range(5), 5, lambda _: 1,
                                  'evaluating'))) == 5
  assert stderr() == ''


def test_a_bar_on_a_terminal_is_cleared_when_done(stderr):
  stderr.terminal()
  for _ in progress.images(range(3), 6, lambda _: 2, 'evaluating'):
    pass
  drawn = stderr()
  assert re.search(r'evaluating: .*/6 .*img/s', drawn), drawn
  assert drawn.split('\r')[-2].strip() == ''  # the bar's line, cleared


def test_nothing_shown_unless_asked(stderr):
  stderr.terminal()
  assert list(progress.images(range(3), 3, lambda _: 1, 'evaluating',
                              show=False)) == [0, 1, 2]
  assert stderr() == ''


@pytest.fixture(scope='module')
def val(tmp_path_factory):
  root = write_imagefolder(tmp_path_factory.mktemp('progress') / 'f',
                           train=2, val=5, size=(20, 20))
  return datasets.load(argparse.Namespace(dataset='imagefolder',
                                          datadir=root)).val


def test_the_loaders_evaluation_shows_the_first_process_its_images(stderr,
                                                                   val):
  """15 images over 2 processes: the first has 8, in batches of 3 (6
  rows over both); the second shows nothing; without `progress`, nothing."""
  assert len(val) == 15
  batches = list(loader.eval_batches(val, 6, 16, 0, 2, workers=0,
                                     progress='evaluating'))
  assert sum(int(b['mask'].sum()) for b in batches) == 8
  shown = lines(stderr())
  assert [(done, total) for done, total, _ in shown] == [(3, 8), (6, 8),
                                                         (8, 8)]
  list(loader.eval_batches(val, 6, 16, 1, 2, workers=0,
                           progress='evaluating'))
  list(loader.eval_batches(val, 6, 16, workers=0))
  assert stderr() == ''


def test_pytorchs_evaluation_shows_its_images_on_rank_0(stderr, val,
                                                         monkeypatch):
  args = argparse.Namespace(workers=0)
  data = engine.loader(torch_data.EvalSet(val, 16), args,
                       torch.device('cpu'), batch_size=4)
  assert sum(len(y) for _, y in engine.eval_batches(data)) == 15
  assert [done for done, _, _ in lines(stderr())] == [4, 8, 12, 15]
  monkeypatch.setitem(os.environ, 'RANK', '1')
  assert sum(len(y) for _, y in engine.eval_batches(data)) == 15
  assert stderr() == ''


def test_checking_an_image_folder_shows_its_images(stderr, tmp_path):
  """Reading every header (or, with --skip_bad_images, decoding every
  image) of a large folder is long: shown where the logger shows INFO
  lines, as on the first process; not where it does not."""
  import glob  # pylint: disable=import-outside-toplevel
  folder = write_imagefolder(tmp_path / 'images', train=4, val=2)
  paths = sorted(glob.glob(os.path.join(folder, 'train', '*', '*')))
  shown = logging.getLogger('bit.test.shown')
  shown.setLevel(logging.INFO)
  quiet = logging.getLogger('bit.test.quiet')
  quiet.setLevel(logging.WARNING)
  datasets.readable_images(paths, logger=shown)
  n = len(paths)
  assert f'checking images: {n}/{n} images' in stderr()
  datasets.readable_images(paths, skip=True, logger=shown)
  assert f'decoding images (--skip_bad_images): {n}/{n} images' in stderr()
  datasets.readable_images(paths, skip=True, logger=quiet)
  datasets.readable_images(paths)
  assert stderr() == ''


def test_prediction_shows_its_images(stderr, tmp_path, make_npz):
  from big_transfer import predict  # pylint: disable=import-outside-toplevel
  folder = write_imagefolder(tmp_path / 'images', train=3, val=1)
  args = predict.predict_argparser('test').parse_args(
      [folder, '--model', make_npz(), '--batch', '4', '--resolution', '8'])
  calls = []

  def logits(x):
    calls.append(len(x))
    return np.zeros((len(x), 10), np.float32)
  predict.predict(args, lambda weights: (10, logits))
  n = sum(calls)
  assert n == 12 and calls == [4, 4, 4]
  assert f'predicting: {n}/{n} images' in stderr()


def test_a_failed_save_of_the_logits_leaves_the_old_file(tmp_path, make_npz,
                                                         monkeypatch):
  """--save_logits is written whole or not at all (runfiles.replaced): a
  write that fails half-way leaves the file that was there."""
  from big_transfer import predict  # pylint: disable=import-outside-toplevel
  folder = write_imagefolder(tmp_path / 'images', train=1, val=1)
  out = tmp_path / 'logits.npy'
  out.write_bytes(b'the old logits')

  def half_then_fail(f, array):
    f.write(b'half of the new')
    raise OSError(28, 'No space left on device')
  monkeypatch.setattr(predict.np, 'save', half_then_fail)
  args = predict.predict_argparser('test').parse_args(
      [folder, '--model', make_npz(), '--resolution', '8', '--save_logits',
       str(out)])
  with pytest.raises(OSError):
    predict.predict(args, lambda weights: (10, lambda x: np.zeros(
        (len(x), 10), np.float32)))
  assert out.read_bytes() == b'the old logits'
  assert not [f for f in os.listdir(tmp_path) if f.endswith('.part')]


def test_training_shows_a_line_every_tenth_or_after_line_seconds(
    monkeypatch, caplog):
  """Without a terminal: a line at every 10% of the steps, and at a read-back
  where LINE_SECONDS have passed since the last line, as for a CPU's slow
  steps. The ETA follows the steps since the first read-back, whose time
  (the compilation's) it leaves out."""
  clock = [0.0]
  monkeypatch.setattr(progress, 'time', argparse.Namespace(
      time=lambda: clock[0]))
  logger = logging.getLogger('bit.test.training')
  logger.setLevel(logging.INFO)
  bar = progress.Progress(200, 0, logger)  # 10%: 20 steps
  clock[0] = 100.0  # the first step, compiled: no line of its own
  bar.show(1, 1.0, loss=2.0)
  for step in range(10, 201, 10):  # read back every 10 steps
    clock[0] += 10 if step <= 100 else 50  # 1 s a step, then 5 s
    bar.show(step, 8.0, loss=1.0)
  shown = [(int(m[0]), int(m[1])) for m in re.findall(
      r'step (\d+)/200 loss=1 images/s=8\.0 ETA (\d+)s', caplog.text)]
  # The first read-back after a first step longer than LINE_SECONDS (step
  # 10); then every 10% while the steps are fast (20 s between lines), and
  # at every read-back once 50 s pass between them.
  assert [s for s, _ in shown] == [10, 20, 40, 60, 80, 100,
                                   *range(110, 201, 10)]
  assert 'step 1/' not in caplog.text
  # From step 1 on: 9 steps in 10 s at step 10, 19 in 20 s at step 20,
  # 109 in 150 s at step 110.
  assert [eta for _, eta in shown[:2]] == [round(190 * 10 / 9),
                                           round(180 * 20 / 19)]
  assert shown[6][1] == round(90 * 150 / 109)
  assert shown[-1][1] == 0
