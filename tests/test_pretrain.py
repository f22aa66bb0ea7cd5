"""bit_pytorch.pretrain: recipes, schedule, data order, a tiny upstream run,
its .npz export, resume; the Fashion-MNIST reader."""
import dataclasses
import gzip
import json
import os
import signal

import numpy as np
import pytest
import torch
import yaml

from big_transfer import datasets, errors, hardware, memory, zoo
from bit_pytorch import models, pretrain

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(model='R14x0.5', dataset='digits', batch=8, steps=3,
            resize_size=20, crop_size=16, augment='crop_flip', base_lr=0.1,
            warmup_steps=1, decay_at=[2], eval_every=2, batch_eval=400)


def write_recipe(folder, **values):
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, 'recipe.yaml')
  with open(path, 'w') as f:
    yaml.safe_dump({**TINY, **values}, f)
  return path


def run(tmp_path, name='up', extra=(), **values):
  args = pretrain.argparser().parse_args(
      ['--recipe', write_recipe(str(tmp_path), **values), '--name', name,
       '--logdir', str(tmp_path / 'runs'), '--workers', '0', *extra])
  return pretrain.main(args), tmp_path / 'runs' / name


# ---------------------------------------------------------------- recipes

@pytest.mark.parametrize('recipe', ['bit_s_r50x1.yaml', 'bit_m_r50x1.yaml',
                                    'bit_small_fashion_mnist.yaml'])
def test_shipped_recipes_parse(recipe):
  r = pretrain.load_recipe(os.path.join(REPO, 'big_transfer', 'recipes', recipe),
                           datadir='/data')
  assert zoo.parse_arch(r.model)
  assert (r.epochs or r.steps) and r.decay_at == sorted(r.decay_at)


def test_paper_schedule_in_steps():
  r = pretrain.load_recipe(os.path.join(REPO, 'big_transfer', 'recipes', 'bit_s_r50x1.yaml'),
                           datadir='/data')
  s = pretrain.schedule(r, 1_281_167)
  assert s.peak_lr == pytest.approx(0.03 * 4096 / 256)
  assert s.total_steps == round(90 * 1_281_167 / 4096)
  assert s.decay_steps == [round(e * 1_281_167 / 4096) for e in (30, 60, 80)]
  assert s.lr(0) == 0 and s.lr(2500) == pytest.approx(s.peak_lr / 2)
  assert s.lr(s.decay_steps[0] - 1) == pytest.approx(s.peak_lr)
  assert s.lr(s.decay_steps[0]) == pytest.approx(s.peak_lr / 10)
  assert s.lr(s.decay_steps[2]) == pytest.approx(s.peak_lr / 1000)


@pytest.mark.parametrize('values, message', [
    (dict(epochs=2), 'exactly one of epochs and steps'),
    (dict(steps=None), 'exactly one of epochs and steps'),
    (dict(loss='hinge'), 'loss must be one of'),
    (dict(batch='big'), 'batch must be an integer'),
    (dict(base_lr=0), 'base_lr must be positive'),
    (dict(weight_decay=-1e-4), 'weight_decay must be 0 or positive'),
    (dict(momentum=1.0), 'momentum must be from 0 to below 1'),
    (dict(label_smoothing=-0.1), 'label_smoothing must be from 0 to below 1'),
    (dict(rotations=0), 'rotations must be positive'),
    (dict(crop_scale=[0, 1]), 'crop_scale must be [min, max] with 0 < min'),
    (dict(downsample=[8, 4]), 'downsample must be [min, max]'),
    (dict(crop_size=40), 'larger than resize_size'),
    (dict(dataset='mnist'), "unknown dataset 'mnist'; give one of"),
    (dict(dataset='imagefolder'), 'needs --datadir'),
    (dict(model='R18x1'), 'unknown architecture'),
    (dict(colour=True), "unknown key(s) ['colour']"),
])
def test_bad_recipe_is_one_line_and_status_2(tmp_path, capsys, values,
                                             message):
  args = pretrain.argparser().parse_args(
      ['--recipe', write_recipe(str(tmp_path), **values), '--name', 'x',
       '--logdir', str(tmp_path / 'runs')])
  with pytest.raises(SystemExit) as e:
    errors.run_cli(pretrain.main, args)
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert message in err and '\n' not in err
  assert not (tmp_path / 'runs').exists()  # refused before any output


@pytest.mark.parametrize('flags, message', [
    (['--export', '/proc/no/model.npz'], 'give another --export'),
    (['--logdir', '/proc/no'], 'give another --logdir'),
])
def test_unwritable_places_are_refused_before_the_run(tmp_path, capsys, flags,
                                                      message):
  args = pretrain.argparser().parse_args(
      ['--recipe', write_recipe(str(tmp_path)), '--name', 'x', '--logdir',
       str(tmp_path / 'runs'), *flags])
  with pytest.raises(SystemExit) as e:
    errors.run_cli(pretrain.main, args)
  assert e.value.code == 2
  assert message in capsys.readouterr().err
  assert not (tmp_path / 'runs').exists()


def test_set_overrides_recipe_values(tmp_path):
  r = pretrain.load_recipe(write_recipe(str(tmp_path)),
                           ['steps=7', 'decay_at=[3, 5]', 'loss=sigmoid'])
  assert (r.steps, r.decay_at, r.loss) == (7, [3, 5], 'sigmoid')


# ---------------------------------------------------------------- losses

def test_sigmoid_loss_sums_classes_and_smooths_targets():
  r = pretrain.Recipe(model='R14x0.5', dataset='digits', batch=2, steps=1,
                      loss='sigmoid', label_smoothing=0.2)
  logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 1.0, -3.0]])
  labels = torch.tensor([0, 2])
  targets = np.full((2, 3), 0.2 / 3)
  targets[0, 0] = targets[1, 2] = 0.8 + 0.2 / 3
  x = logits.numpy()
  expected = np.mean(np.sum(np.logaddexp(0, x) - targets * x, axis=1))
  got = pretrain.loss_fn(r, 3)(logits, labels)
  assert float(got) == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------- a run

def test_tiny_run_writes_outputs_and_exports_exact_npz(tmp_path):
  result, out = run(tmp_path)
  for f in ('train.log', 'config.json', 'metrics.jsonl', 'results.json',
            'model.npz', pretrain.CHECKPOINT):
    assert (out / f).exists(), f
  lines = [json.loads(l) for l in open(out / 'metrics.jsonl')]
  train = [l for l in lines if l['split'] == 'train']
  val = [l for l in lines if l['split'] == 'val']
  assert [l['step'] for l in train] == [1, 2, 3]
  assert [l['lr'] for l in train] == pytest.approx([0, 0.1 * 8 / 256,
                                                    0.1 * 8 / 2560])
  assert [l['step'] for l in val] == [2, 3] and val[-1]['n'] == 797
  results = json.load(open(out / 'results.json'))
  assert results['top1'] == result['top1'] == val[-1]['top1']
  config = json.load(open(out / 'config.json'))
  assert config['recipe']['model'] == 'R14x0.5'
  assert config['schedule']['total_steps'] == 3 and config['classes'] == 10
  assert config['compiled'] is False  # not on the CPU, unless asked

  # The export is the checkpoint's weights, in published layout, exactly.
  weights = zoo.load_npz(str(out / 'model.npz'))
  zoo.check_weights(weights, zoo.parse_arch('R14x0.5'), 10)
  trained = models.create('R14x0.5', head_size=10)
  trained.load_state_dict(torch.load(out / pretrain.CHECKPOINT,
                                     weights_only=True)['model'])
  reloaded = models.create('file', weights=weights)
  for key, value in trained.export().items():
    np.testing.assert_array_equal(weights[key], value)
  x = torch.randn(4, 3, 16, 16)
  with torch.no_grad():
    assert torch.equal(trained.eval()(x), reloaded.eval()(x))
  assert weights['resnet/head/conv2d/kernel'].any()  # the head was trained


def test_compile_changes_the_rate_not_the_run(tmp_path, compiled_nets):
  """--compile: the network through torch.compile (without Inductor here:
  conftest.compiled_nets), for training and evaluation; the same losses
  and evaluation."""
  runs = {flag: run(tmp_path / flag, extra=[flag])
          for flag in ('--compile', '--no-compile')}
  assert len(compiled_nets) == 1
  losses = {flag: [json.loads(l)['loss'] for l in open(out / 'metrics.jsonl')]
            for flag, (_, out) in runs.items()}
  np.testing.assert_allclose(losses['--compile'], losses['--no-compile'],
                             rtol=1e-5)
  assert [json.load(open(out / 'config.json'))['compiled']
          for _, out in runs.values()] == [True, False]


def test_image_folder_with_rotation_labels(tmp_path, imagefolder):
  result, out = run(tmp_path, steps=2, dataset='imagefolder', batch=6,
                    datadir=imagefolder, augment='inception_crop',
                    downsample=[8, 12], rotations=4, decay_at=[])
  assert result['n'] == 12  # val/: 3 classes x 4 images
  weights = zoo.load_npz(str(out / 'model.npz'))
  assert weights['resnet/head/conv2d/bias'].shape == (12,)  # 3 classes x 4


def test_examples_follow_their_seed_and_turn_with_their_label(imagefolder):
  split = datasets.scan_imagefolder(imagefolder)[1]
  source = datasets.Source(split.labels, split.paths)
  recipe = pretrain.Recipe(model='R14x0.5', dataset='imagefolder', batch=2,
                           steps=1, datadir=imagefolder, crop_size=16,
                           downsample=[8, 12], rotations=4)
  train = pretrain.Examples(source, recipe, train=True)
  a, b = train[(5, 123)], train[(5, 123)]
  assert torch.equal(a[0], b[0]) and a[1] == b[1]   # the seed decides
  assert a[0].shape == (3, 16, 16) and -1 <= a[0].min() <= a[0].max() <= 1
  labels = {train[(5, s)][1] for s in range(40)}
  assert labels == {int(split.labels[5]) * 4 + r for r in range(4)}
  evaluation = pretrain.Examples(source, recipe, train=False)
  plain = dataclasses.replace(recipe, rotations=1)
  upright = pretrain.Examples(source, plain, train=False)
  for i in range(6):
    turned, label = evaluation[i]
    assert label == int(split.labels[i]) * 4 + i % 4
    assert torch.equal(turned, torch.rot90(upright[i][0], i % 4, dims=(1, 2)))


def test_resumed_run_equals_uninterrupted_run(tmp_path, sigterm_after_step):
  values = dict(decay_at=[3], eval_every=2, steps=4, downsample=[8, 12],
                augment='inception_crop')
  run(tmp_path / 'a', **values)
  sigterm_after_step(3)
  with pytest.raises(SystemExit) as stop:
    run(tmp_path / 'b', **values)
  assert stop.value.code == 128 + signal.SIGTERM
  sigterm_after_step(None)
  _, out = run(tmp_path / 'b', **values)  # same name: resumes
  a = zoo.load_npz(str(tmp_path / 'a' / 'runs' / 'up' / 'model.npz'))
  b = zoo.load_npz(str(out / 'model.npz'))
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  steps = [json.loads(l)['step'] for l in open(out / 'metrics.jsonl')
           if json.loads(l)['split'] == 'train']
  assert steps == [1, 2, 3, 4]
  assert 'resuming from' in open(out / 'train.log').read()


def test_batch_split_gives_the_same_update(tmp_path, monkeypatch):
  values = dict(augment='none', steps=1, warmup_steps=0, decay_at=[])
  run(tmp_path / 'a', **values)
  # Memory for 2 of the 8 images at once (big_transfer.memory's estimate):
  # with --batch_split auto the run chooses 4 micro-batches.
  monkeypatch.setattr(hardware, 'memory_bytes', lambda: memory.step_bytes(
      zoo.parse_arch('R14x0.5'), 16, 2.5) / memory.HOST_SHARE)
  _, out = run(tmp_path / 'b', extra=['--batch_split', 'auto'], **values)
  assert [json.loads((folder / 'config.json').read_text())['batch_split']
          for folder in (tmp_path / 'a' / 'runs' / 'up', out)] == [1, 4]
  a = zoo.load_npz(str(tmp_path / 'a' / 'runs' / 'up' / 'model.npz'))
  b = zoo.load_npz(str(out / 'model.npz'))
  for key in a:
    np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-6,
                               err_msg=key)


@pytest.mark.slow  # two processes: left out of make test-fast
def test_two_processes_under_torchrun_pretrain_as_one(tmp_path):
  """DistributedDataParallel over two processes, each feeding half of every
  batch (crops, flips and the evaluation split among them): one process's
  losses, evaluations and weights."""
  from test_multiprocess import environment, launch  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  values = dict(steps=4, decay_at=[3], eval_every=2)
  run(tmp_path / 'a', **values)
  two = tmp_path / 'b'
  command = [sys.executable, '-m', 'torch.distributed.run', '--standalone',
             '--nproc_per_node', '2', '-m', 'bit_pytorch.pretrain',
             '--recipe', write_recipe(str(two), **values), '--name', 'up',
             '--logdir', str(two / 'runs'), '--workers', '0']
  codes, output = launch([(command, environment())], tmp_path)
  assert codes == [0], output
  outs = [folder / 'runs' / 'up' for folder in (tmp_path / 'a', two)]
  assert json.loads((outs[1] / 'config.json').read_text())['devices'] == 2
  records = [[json.loads(l) for l in open(out / 'metrics.jsonl')]
             for out in outs]
  assert [(r['step'], r['split']) for r in records[0]] == [
      (r['step'], r['split']) for r in records[1]]
  for one, both in zip(*records):
    assert both['loss'] == pytest.approx(one['loss'], rel=1e-5), both
    if one['split'] == 'val':
      assert (both['top1'], both['n']) == (one['top1'], one['n'])
  a, b = (zoo.load_npz(str(out / 'model.npz')) for out in outs)
  for key in a:
    np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-6,
                               err_msg=key)


# ---------------------------------------------------------------- Fashion-MNIST

def write_idx(path, array):
  header = bytes([0, 0, 8, array.ndim]) + b''.join(
      int(n).to_bytes(4, 'big') for n in array.shape)
  with gzip.open(path, 'wb') as f:
    f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reads_idx_files(tmp_path):
  rng = np.random.default_rng(0)
  train = rng.integers(0, 256, (6, 28, 28))
  test = rng.integers(0, 256, (4, 28, 28))
  for stem, array in (('train-images-idx3-ubyte', train),
                      ('train-labels-idx1-ubyte', np.arange(6) % 10),
                      ('t10k-images-idx3-ubyte', test),
                      ('t10k-labels-idx1-ubyte', np.array([9, 0, 1, 2]))):
    write_idx(tmp_path / f'{stem}.gz', array)
  d = datasets.load_fashion_mnist(str(tmp_path))
  assert d.train_images.shape == (6, 28, 28, 3)
  np.testing.assert_array_equal(d.train_images[..., 1], train)
  np.testing.assert_array_equal(d.val_labels, [9, 0, 1, 2])
  assert d.classes[9] == 'Ankle boot'


def test_fashion_mnist_missing_or_corrupt_says_what_to_do(tmp_path):
  with pytest.raises(errors.BadInput, match='apt-get install dataset-'):
    datasets.load_fashion_mnist(str(tmp_path))
  for stem in ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte',
               't10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'):
    with gzip.open(tmp_path / f'{stem}.gz', 'wb') as f:
      f.write(b'not an idx file')
  with pytest.raises(errors.BadInput, match='not an IDX file'):
    datasets.load_fashion_mnist(str(tmp_path))


@pytest.mark.skipif(not os.path.isdir(datasets.FASHION_MNIST_DIR),
                    reason='Debian package dataset-fashion-mnist not '
                    'installed (make pretrain installs it)')
def test_installed_fashion_mnist_is_the_real_one():
  d = datasets.load_array_dataset('fashion_mnist')
  assert d.train_images.shape == (60000, 28, 28, 3)
  assert d.val_images.shape == (10000, 28, 28, 3)
  assert np.bincount(d.train_labels).tolist() == [6000] * 10
