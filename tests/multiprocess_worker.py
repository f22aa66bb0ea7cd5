"""One process of a multi-process training run in tests/test_multiprocess.py:
the trainer's command line, with a fault injected where the environment
asks for one.

  python tests/multiprocess_worker.py {pytorch,tf2,jax} TRAINER_FLAGS...

  BIT_TEST_SIGNAL_STEP=k  BIT_TEST_SIGNAL=TERM|KILL  [BIT_TEST_SIGNAL_ONCE=path]
      this process sends itself the signal just before training step k + 1
      (after step k and its checkpoints); with BIT_TEST_SIGNAL_ONCE, only
      while that file does not exist (it is made first), so a restarted
      worker trains on.

Under torchrun the variables hold for the process of rank BIT_TEST_RANK
(default 1) only.
"""
import os
import signal
import sys


def arm():
  step = os.environ.get('BIT_TEST_SIGNAL_STEP')
  rank = os.environ.get('RANK')  # set by torchrun
  if step is None or rank not in (None, os.environ.get('BIT_TEST_RANK',
                                                       '1')):
    return
  from big_transfer import errors, harness  # noqa: F401  (first: it imports the rest)
  signum = getattr(signal, 'SIG' + os.environ.get('BIT_TEST_SIGNAL', 'TERM'))
  once = os.environ.get('BIT_TEST_SIGNAL_ONCE')
  fit = harness.Run.fit

  def fit_with_fault(self, start, total, lr_at, train, *args, **kwargs):
    def train_or_fault(s, lr):
      if s == int(step) and not (once and os.path.exists(once)):
        if once:
          open(once, 'w').close()
        os.kill(os.getpid(), signum)
      return train(s, lr)
    return fit(self, start, total, lr_at, train_or_fault, *args, **kwargs)

  harness.Run.fit = fit_with_fault


def main():
  backend, argv = sys.argv[1], sys.argv[2:]
  if backend == 'pytorch':
    import torch  # noqa: F401  (before TensorFlow, which the others import)
    import torchvision  # noqa: F401
  arm()
  from big_transfer import errors
  import importlib
  train = importlib.import_module(f'bit_{backend}.train')
  if backend == 'pytorch':
    train.cli(argv)
  else:
    errors.run_cli(lambda: train.main(train.argparser().parse_args(argv)))


if __name__ == '__main__':
  main()
