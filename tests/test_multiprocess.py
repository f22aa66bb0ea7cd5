"""Several processes on this machine train one model and end where one
process ends (the tiny runs of tests/test_trainers.py, mixup on, the
training images held by the lead for every process):

- JAX: two processes joined by --distributed --coordinator_address
  127.0.0.1:PORT --num_processes 2 --process_id I (CPU collectives through
  gloo) train as one process does; stopped by SIGTERM (sent to the second
  one only: the processes agree to stop) and started again, they resume
  from the checkpoint and end where one process ends.
- TF2: two workers named by TF_CONFIG (MultiWorkerMirroredStrategy), the
  same.
- JAX: a truncated training image stops both processes before training
  (exit status 2), the one that decoded it naming it.
- PyTorch: torchrun --max-restarts 1 with two processes, one of which kills
  itself (SIGKILL) after step 5: torchrun starts the group again, which
  resumes from the checkpoint of step 4 (--save_every 2).

Faults come from tests/multiprocess_worker.py, which runs each process.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from big_transfer import errors
from conftest import REPO, truncate_image, write_imagefolder
# The tiny runs of the contract test: flags, image folder, model, outputs.
from test_trainers import (STEPS, References, argv, assert_same, metrics,
                           out, setup, weights)  # noqa: F401  (setup: fixture)

pytestmark = pytest.mark.slow  # whole runs: left out of make test-fast

WORKER = os.path.join(REPO, 'tests', 'multiprocess_worker.py')
TIMEOUT = 600


def free_ports(n):
  socks = [socket.socket() for _ in range(n)]
  for s in socks:
    s.bind(('127.0.0.1', 0))
  ports = [s.getsockname()[1] for s in socks]
  for s in socks:
    s.close()
  return ports


def environment(**extra):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  for k in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK', 'TF_CONFIG',
            'BIT_TEST_SIGNAL_STEP'):
    env.pop(k, None)
  env.update(extra)
  return env


def launch(commands, tmp_path):
  """Runs [(argv, env)] at once; returns their exit statuses and the end of
  their output (each process's own file, so no pipe fills up)."""
  procs, logs = [], []
  for i, (command, env) in enumerate(commands):
    log = open(tmp_path / f'process{i}-{len(os.listdir(tmp_path))}.log',
               'w+')
    logs.append(log)
    procs.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=log,
                                  stderr=subprocess.STDOUT))
  deadline, shortened = time.time() + TIMEOUT, False
  try:
    while any(p.poll() is None for p in procs) and time.time() < deadline:
      if not shortened and any(p.poll() not in (None, 0) for p in procs):
        # One process failed or stopped: the others get a minute to follow
        # (their collectives notice), not the whole TIMEOUT.
        deadline, shortened = min(deadline, time.time() + 60), True
      time.sleep(0.5)
    codes = [p.poll() for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait(timeout=60)
  tails = []
  for log in logs:
    log.seek(0)
    tails.append(log.read()[-3000:])
    log.close()
  return codes, '\n----\n'.join(tails)


def jax_processes(setup, name, fault=None, folder=None, extra=()):
  port = free_ports(1)[0]
  return [([sys.executable, WORKER, 'jax',
            *argv(setup, 'jax', name, *extra, folder=folder),
            '--distributed', '--coordinator_address', f'127.0.0.1:{port}',
            '--num_processes', '2', '--process_id', str(i)],
           environment(**(fault if fault and i == 1 else {})))
          for i in range(2)]


def tf2_workers(setup, name, fault=None, extra=()):
  ports = free_ports(2)
  cluster = {'worker': [f'localhost:{p}' for p in ports]}
  return [([sys.executable, WORKER, 'tf2', *argv(setup, 'tf2', name,
                                                 *extra)],
           environment(TF_CONFIG=json.dumps(
               {'cluster': cluster, 'task': {'type': 'worker', 'index': i}}),
                       **(fault if fault and i == 1 else {})))
          for i in range(2)]


LAUNCH = {'jax': jax_processes, 'tf2': tf2_workers}
SIGTERM_AFTER_4 = {'BIT_TEST_SIGNAL_STEP': '4', 'BIT_TEST_SIGNAL': 'TERM'}


@pytest.fixture(scope='module')
def reference(setup):
  return References(setup)


def assert_ends_where_the_reference_ends(setup, reference, backend, name,
                                         resumed_from):
  run_dir = out(setup, backend, name)
  result = json.loads((run_dir / 'results.json').read_text())
  assert result['n'] == 15 and result['step'] == STEPS
  assert result['top1'] == reference[backend]['top1']
  assert result['loss'] == pytest.approx(reference[backend]['loss'],
                                         rel=1e-5)
  assert_same(weights(setup, backend, name),
              weights(setup, backend, 'reference'))
  records = metrics(setup, backend, name)
  expected = metrics(setup, backend, 'reference')
  assert [(r['step'], r['split']) for r in records] == [
      (r['step'], r['split']) for r in expected]
  for r, e in zip(records, expected):
    assert r['loss'] == pytest.approx(e['loss'], rel=1e-5, abs=1e-6), r
  config = json.loads((run_dir / 'config.json').read_text())
  assert config['resumed_from_step'] == resumed_from
  # The processes held the training images together, and removed them.
  assert config['hold_images'] is True
  assert not (run_dir / 'held').exists()
  return config


@pytest.mark.parametrize('backend', ['jax', 'tf2'])
def test_two_processes_end_where_one_ends_also_stopped_and_resumed(
    setup, reference, backend, tmp_path):
  assert reference[backend]['top1'] >= 0.8
  # Two processes train from step 0; the second gets SIGTERM after step 4,
  # and they agree to stop at their next vote (every harness.LOG_EVERY
  # steps), with a checkpoint there. (One launch, not two: a launch costs
  # half a minute of start-up here.)
  codes, output = launch(LAUNCH[backend](setup, 'two', SIGTERM_AFTER_4),
                         tmp_path)
  assert codes == [128 + signal.SIGTERM] * 2, output
  run_dir = out(setup, backend, 'two')
  assert not (run_dir / 'results.json').exists()
  records = metrics(setup, backend, 'two')
  stopped = records[-1]['step']
  assert 4 < stopped < STEPS
  # Up to there, every loss and the evaluation at step 6 are one process's.
  expected = [r for r in metrics(setup, backend, 'reference')
              if r['step'] <= stopped]
  assert [(r['step'], r['split']) for r in records] == [
      (r['step'], r['split']) for r in expected]
  for r, e in zip(records, expected):
    assert r['loss'] == pytest.approx(e['loss'], rel=1e-5, abs=1e-6), r
  # Started again, they resume from the checkpoint and end where one ends.
  # (TF2's second worker writes its dropped copies into checkpoints/
  # .worker-1, emptied at its start and removed at its end: plant what a
  # SIGKILLed worker would have left there.)
  own = run_dir / 'checkpoints' / '.worker-1'
  if backend == 'tf2':
    assert not own.exists()  # removed at the stop
    own.mkdir()
    (own / 'ckpt-3.index').write_text('left by a killed worker')
  # The resumed launch chooses its split: the processes vote on it through
  # the framework's collective (every host holds the whole step: 1).
  codes, output = launch(LAUNCH[backend](setup, 'two',
                                         extra=('--batch_split', 'auto')),
                         tmp_path)
  assert codes == [0, 0], output
  assert not own.exists()
  config = assert_ends_where_the_reference_ends(setup, reference, backend,
                                                'two', stopped)
  assert config['devices'] == 2 and config['batch_split'] == 1
  if backend == 'jax':
    assert config['processes'] == 2
  else:  # (TF's class behind tf.distribute.MultiWorkerMirroredStrategy)
    assert config['strategy'] in ('MultiWorkerMirroredStrategy',
                                  'CollectiveAllReduceStrategy')


def test_a_bad_training_image_stops_both_processes_before_training(
    setup, tmp_path):
  # Holding decodes every training image before the first step; the
  # process that reads the truncated one names it, the other follows.
  folder = write_imagefolder(tmp_path / 'images', train=8, val=5,
                             size=(32, 32))
  path = os.path.join(folder, 'train', 'dog', '003.png')
  truncate_image(path)
  codes, output = launch(jax_processes(setup, 'bad', folder=folder),
                         tmp_path)
  assert codes == [2, 2], output
  assert 'train/dog/003.png' in output, output
  assert 'another process refused its input' in output, output
  run_dir = out(setup, 'jax', 'bad')
  assert not (run_dir / 'held').exists()
  assert not (run_dir / 'metrics.jsonl').exists()


def test_torchrun_restarts_a_killed_worker_from_the_checkpoint(
    setup, reference, tmp_path):
  assert reference['pytorch']['top1'] >= 0.8
  once = tmp_path / 'killed'
  command = [sys.executable, '-m', 'torch.distributed.run', '--standalone',
             '--nproc_per_node', '2', '--max-restarts', '1', WORKER,
             'pytorch', *argv(setup, 'pytorch', 'elastic'),
             '--save_every', '2']
  codes, output = launch([(command, environment(
      BIT_TEST_SIGNAL_STEP='5', BIT_TEST_SIGNAL='KILL',
      BIT_TEST_SIGNAL_ONCE=str(once)))], tmp_path)
  assert once.exists()  # rank 1 was killed once ...
  assert codes == [0], output  # ... and torchrun's restart finished the run
  assert 'exitcode: -9' in output
  config = assert_ends_where_the_reference_ends(setup, reference, 'pytorch',
                                                'elastic', 4)
  assert config['devices'] == 2


def test_jax_distributed_flags_are_checked():
  from bit_jax import train
  args = ['--name', 'x', '--logdir', '/nonexistent']
  for extra, message in (
      (['--coordinator_address', 'h:1'], '--coordinator_address needs '
       '--distributed'),
      (['--distributed', '--num_processes', '2', '--process_id', '0'],
       'also needs --coordinator_address'),
      (['--distributed', '--coordinator_address', 'h:1', '--num_processes',
        '2', '--process_id', '2'], r'--process_id 2 is not in 0\.\.1'),
      (['--distributed', '--coordinator_address', 'h', '--num_processes',
        '2', '--process_id', '0'], 'is not HOST:PORT')):
    with pytest.raises(errors.BadInput, match=message):
      train.initialize_distributed(train.argparser().parse_args(
          args + extra))
