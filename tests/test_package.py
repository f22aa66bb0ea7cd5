"""The distribution as a user installs it: the wheel holds every module and
shipped file, and each backend's command runs from the installed files,
outside the checkout, with the other two frameworks hidden (as when only
that backend's extra is installed)."""
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile

import pytest

from conftest import REPO, published_shapes

pytestmark = pytest.mark.slow
FRAMEWORKS = {'pytorch': 'torch', 'tf2': 'tensorflow', 'jax': 'jax'}


@pytest.fixture(scope='module')
def installed(tmp_path_factory):
  """(folder the wheel was installed into, the wheel's file names)."""
  work = tmp_path_factory.mktemp('package')

  def pip(*args):
    done = subprocess.run([sys.executable, '-m', 'pip', '-q', *args],
                          capture_output=True, text=True, timeout=300,
                          cwd=work)
    assert done.returncode == 0, done.stderr[-3000:]

  # Built from a copy: the build writes build/ and *.egg-info beside its
  # sources, and the checkout is in use by the other worker's runs.
  source = shutil.copytree(REPO, work / 'source',
                           ignore=shutil.ignore_patterns(
                               '.*', 'build', '*.egg-info', '__pycache__'))
  pip('wheel', '--no-deps', '--no-build-isolation', '-w', str(work / 'dist'),
      str(source))
  wheel, = (work / 'dist').glob('big_transfer-*.whl')
  target = work / 'site'
  pip('install', '--no-deps', '--target', str(target), str(wheel))
  with zipfile.ZipFile(wheel) as z:
    names = z.namelist()
  return target, names


def run_installed(target, code_or_module, hidden=(), cwd=None):
  """Runs Python with only the installed package importable from the
  project, from a folder outside the checkout."""
  env = dict(os.environ, PYTHONPATH=str(target))
  if code_or_module.startswith('-m'):
    cmd = [sys.executable, os.path.join(REPO, 'tests', 'without.py'),
           ','.join(hidden) or 'no_such_package', *code_or_module.split()]
  else:
    cmd = [sys.executable, '-c', code_or_module]
  return subprocess.run(cmd, env=env, cwd=cwd or target.parent,
                        capture_output=True, text=True, timeout=300)


def test_the_wheel_holds_the_project_and_nothing_else(installed):
  _, names = installed
  with open(os.path.join(REPO, 'pyproject.toml'), 'rb') as f:
    tool = tomllib.load(f)['tool']['setuptools']
  for package in tool['packages']:
    folder = package.replace('.', '/') + '/'
    assert [n for n in names if n.startswith(folder)], package
  for module in tool['py-modules']:
    assert f'{module}.py' in names, module
  for shipped in ('big_transfer/assets/BiT-R14x0.5-FashionMNIST.npz',
                  'big_transfer/assets/BiT-R14x0.5-FashionMNIST.labels.txt',
                  'big_transfer/assets/fashion_mnist_examples.npz',
                  'big_transfer/recipes/distill_digits_small.yaml',
                  'big_transfer/recipes/bit_s_r50x1.yaml'):
    assert shipped in names, shipped
  assert not [n for n in names if n.startswith(('tests/', 'benchmarks/',
                                                'demo/', 'colabs/'))]


def test_shipped_files_are_found_in_the_installed_package(installed):
  target, _ = installed
  shown = run_installed(target, (
      'import bit_common, big_transfer\n'
      'from big_transfer import recipes, zoo\n'
      'print(bit_common.__file__)\n'
      'print(zoo.weights_path("BiT-R14x0.5-FashionMNIST", "/nonexistent"))\n'
      'print(recipes.find("distill_digits_small"))\n'
      'print(len(zoo.load_npz(zoo.asset("BiT-R14x0.5-FashionMNIST.npz"))))'))
  assert shown.returncode == 0, shown.stderr[-2000:]
  *paths, keys = shown.stdout.split()
  for path in paths:
    assert path.startswith(str(target)), path
    assert os.path.isfile(path)
  assert int(keys) == len(published_shapes('R14x0.5', 40))


@pytest.mark.parametrize('backend', sorted(FRAMEWORKS))
def test_each_backend_runs_without_the_other_frameworks(installed, backend):
  target, _ = installed
  others = [m for b, m in FRAMEWORKS.items() if b != backend]
  if backend != 'pytorch':
    others.append('torchvision')
  shown = run_installed(target, f'-m bit_{backend}.train --help', others)
  assert shown.returncode == 0, shown.stderr[-2000:]
  assert '--examples_per_class' in shown.stdout
  assert 'Fine-tune a BiT model' in shown.stdout
