"""Runs a module as `python -m` would (or code, as `python -c`), in a process
where some top-level packages cannot be imported, as on a machine where
they are not installed:

  python tests/without.py tensorflow,torch -m bit_jax.train --help
  python tests/without.py tensorflow,torch -c "import bit_jax.fewshot"

Importing a hidden package (or any of its submodules) raises
ModuleNotFoundError, and importlib.util.find_spec finds none. The tests use
this to show that each backend works without the other frameworks.
"""
import importlib.abc
import runpy
import sys


class Hiding(importlib.abc.MetaPathFinder):
  """A finder of sys.meta_path that finds nothing of the hidden packages
  (so that both `import` and importlib.util.find_spec see them missing)."""

  def __init__(self, finder, names):
    self.finder, self.names = finder, names

  def find_spec(self, fullname, path=None, target=None):
    if fullname.partition('.')[0] in self.names:
      return None
    return self.finder.find_spec(fullname, path, target)

  def invalidate_caches(self):
    if hasattr(self.finder, 'invalidate_caches'):
      self.finder.invalidate_caches()


def main():
  names, flag, target, *argv = sys.argv[1:]
  if flag not in ('-m', '-c'):
    raise SystemExit('usage: without.py PKG[,PKG...] {-m MODULE,-c CODE} '
                     '[ARGS...]')
  hidden = set(names.split(','))
  sys.meta_path[:] = [Hiding(f, hidden) if hasattr(f, 'find_spec') else f
                      for f in sys.meta_path]
  if flag == '-c':
    sys.argv = ['-c', *argv]
    exec(compile(target, '<string>', 'exec'), {'__name__': '__main__'})  # pylint: disable=exec-used
  else:
    sys.argv = [target, *argv]
    runpy.run_module(target, run_name='__main__', alter_sys=True)


if __name__ == '__main__':
  main()
