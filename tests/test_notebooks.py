"""The colabs run top to bottom, offline, in reduced-step mode, from a
folder outside the checkout."""
import os

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import REPO

pytestmark = pytest.mark.slow  # whole runs: left out of make test-fast

COLABS = os.path.join(REPO, 'colabs')


@pytest.mark.parametrize('backend', ['pytorch', 'tf2', 'jax'])
def test_notebook_runs_offline(backend, tmp_path, monkeypatch):
  monkeypatch.setenv('BIT_COLAB_QUICK', '1')
  monkeypatch.setenv('BIT_COLAB_LOGDIR', str(tmp_path))
  path = os.path.join(COLABS, f'big_transfer_{backend}.ipynb')
  nb = nbformat.read(path, as_version=4)
  NotebookClient(nb, timeout=600, kernel_name='python3',
                 resources={'metadata': {'path': str(tmp_path)}}).execute()
  outputs = [o for cell in nb.cells if cell.cell_type == 'code'
             for o in cell.get('outputs', [])]
  assert not [o for o in outputs if o.output_type == 'error']
  text = ''.join(o.get('text', '') for o in outputs)
  assert 'reloaded model: top-1' in text
  assert 'validation top-1 after 4 steps' in text
  images = [o for o in outputs if 'image/png' in o.get('data', {})]
  assert len(images) >= 4  # predictions, 5-shot grid, curves, reloaded
  assert os.path.exists(tmp_path / f'{backend}-5shot' / 'model.npz')
