"""benchmarks.jax_profile: the compiled training step's operations, traced
and grouped by kind, are those of the compiled program, each run once per
step."""
import collections
import json

import pytest

pytest.importorskip('jax')
from benchmarks import jax_profile  # noqa: E402


def test_every_traced_operation_is_the_programs_once_per_step(tmp_path,
                                                              capsys):
  hlo, out = tmp_path / 'step.hlo', tmp_path / 'profile.json'
  res = jax_profile.main(['--arch', 'R14x0.5', '--resolution', '32',
                          '--batch', '2', '--steps', '2', '--hlo', str(hlo),
                          '--json', str(out)])
  program = hlo.read_text()
  in_program = collections.Counter(
      jax_profile.kind(n) for n in jax_profile.instructions(program))
  assert res['step_s'] > 0
  # The 3x3 convolutions stay convolutions; every kind traced is one of the
  # program's, and ran as many times per step as the program has of it.
  assert 'convolution' in res['kinds']
  for kind, (ms, count) in res['kinds'].items():
    assert ms >= 0
    assert count == in_program[kind], kind
  assert json.loads(out.read_text())['kinds'] == res['kinds']
  top = next(iter(res['kinds']))
  assert top in capsys.readouterr().out
