"""BiT in JAX/Flax.

Importing the package sets two defaults of JAX and XLA through the
environment, each only where the environment does not set it already:

- XLA's CPU options that this project measured faster, added to XLA_FLAGS
  (XLA reads the variable when it first starts a backend, so they apply in
  every process that imports bit_jax before it runs any JAX computation).
  Today there is one: the YNNPACK library takes only dot products, where by
  default it also takes element-wise and reduction fusions, which XLA's own
  code runs faster (docs/performance.md has the figures). The options touch
  only the CPU backend.
- JAX's persistent compilation cache, in the package's cache folder
  (JAX_COMPILATION_CACHE_DIR, read when jax is imported, so where bit_jax is
  imported first): a step that took a second or more to compile is read
  back by the next run of the same program (a resumed run, the same
  command again, validation of the same model) instead of compiled again.
  It is kept under COMPILATION_CACHE_BYTES, the entries read least recently
  removed first, which JAX does with the filelock package (in the jax
  extra); without it, the cache is left off, where it would grow without
  bound or warn at every compilation. JAX_ENABLE_COMPILATION_CACHE=false
  turns it off.
"""
import importlib.util
import os

from big_transfer import runfiles

CPU_XLA_FLAGS = {'--xla_cpu_experimental_ynn_fusion_type': 'dot'}


def _add_cpu_flags():
  flags = os.environ.get('XLA_FLAGS', '')
  added = [f'{name}={value}' for name, value in CPU_XLA_FLAGS.items()
           if name not in flags]
  if added:
    os.environ['XLA_FLAGS'] = ' '.join([flags] + added).strip()


COMPILATION_CACHE_BYTES = 2 << 30


def _add_compilation_cache():
  if importlib.util.find_spec('filelock') is None:
    return
  os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                        runfiles.cache_dir('jax_compilation'))
  os.environ.setdefault('JAX_COMPILATION_CACHE_MAX_SIZE',
                        str(COMPILATION_CACHE_BYTES))


_add_cpu_flags()
_add_compilation_cache()
