"""The distribution as a user installs it: the wheel holds every module and
shipped file, and each backend's modules import from the installed files,
outside the checkout, with every package that its extra does not bring
hidden (as when only that backend's extra is installed)."""
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib import metadata

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

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
    what = code_or_module.split()
  else:
    what = ['-c', code_or_module]
  cmd = [sys.executable, os.path.join(REPO, 'tests', 'without.py'),
         ','.join(hidden) or 'no_such_package', *what]
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


def installed_with(names):
  """The installed distributions that installing `names` brings (with
  their requirements for this Python, recursively, extras left out), in
  canonical form."""
  seen, todo = set(), [canonicalize_name(n) for n in names]
  while todo:
    name = todo.pop()
    if name in seen:
      continue
    try:
      required = metadata.requires(name) or ()
    except metadata.PackageNotFoundError:
      continue
    seen.add(name)
    for req in map(Requirement, required):
      if not req.marker or req.marker.evaluate({'extra': ''}):
        todo.append(canonicalize_name(req.name))
  return seen


def not_in_extra(backend):
  """The top-level import names of the packages that pyproject.toml's
  other extras bring and neither `backend`'s extra nor the package's own
  requirements do (what that backend's install lacks)."""
  with open(os.path.join(REPO, 'pyproject.toml'), 'rb') as f:
    project = tomllib.load(f)['project']
  extras = project['optional-dependencies']
  named = lambda lines: {Requirement(r).name for r in lines} - {
      'big-transfer'}
  others = set().union(*(named(extras[e]) for e in extras if e not in (
      'all', 'test', backend)))
  missing = installed_with(others) - installed_with(
      named(extras[backend]) | named(project['dependencies']))
  return sorted(module for module, dists in
                metadata.packages_distributions().items()
                if not module.startswith('_') and
                {canonicalize_name(d) for d in dists} <= missing)


@pytest.mark.parametrize('backend', sorted(FRAMEWORKS))
def test_each_backend_runs_without_the_other_frameworks(installed, backend):
  """Every module of the backend imports, and its trainer's command line
  builds, where the packages outside its extra are missing."""
  target, _ = installed
  hidden = not_in_extra(backend)
  assert FRAMEWORKS[backend] not in hidden and 'numpy' not in hidden
  assert len(hidden) >= 8, hidden
  shown = run_installed(target, (
      f'import importlib, pkgutil, bit_{backend}\n'
      f'for m in pkgutil.iter_modules(bit_{backend}.__path__, '
      f'"bit_{backend}."):\n'
      '  importlib.import_module(m.name)\n'
      '  print(m.name)\n'
      f'from bit_{backend} import train\n'
      'print(train.argparser().format_help())\n'), hidden)
  assert shown.returncode == 0, shown.stderr[-2000:]
  for command in ('train', 'validate', 'predict', 'features', 'fewshot',
                  'distill'):
    assert f'bit_{backend}.{command}\n' in shown.stdout
  assert '--examples_per_class' in shown.stdout
  assert 'Fine-tune a BiT model' in shown.stdout
