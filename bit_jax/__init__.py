"""BiT in JAX/Flax.

Importing the package adds XLA's CPU options that this project measured
faster to XLA_FLAGS, unless the environment already sets them; XLA reads the
variable when it first starts a backend, so they apply in every process that
imports bit_jax before it runs any JAX computation. Today there is one: the
YNNPACK library takes only dot products, where by default it also takes
element-wise and reduction fusions, which XLA's own code runs faster
(docs/performance.md has the figures). The options touch only the CPU
backend.
"""
import os

CPU_XLA_FLAGS = {'--xla_cpu_experimental_ynn_fusion_type': 'dot'}


def _add_cpu_flags():
  flags = os.environ.get('XLA_FLAGS', '')
  added = [f'{name}={value}' for name, value in CPU_XLA_FLAGS.items()
           if name not in flags]
  if added:
    os.environ['XLA_FLAGS'] = ' '.join([flags] + added).strip()


_add_cpu_flags()
