"""The README and docs/ stay true to the code: every relative link and
anchor resolves, the README is a short front door, and the command-line
reference names every flag of every command, and no other."""
import contextlib
import glob
import io
import os
import re
import runpy
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = [os.path.join(REPO, 'README.md')] + sorted(
    glob.glob(os.path.join(REPO, 'docs', '*.md')))
CLI_PAGE = os.path.join(REPO, 'docs', 'cli.md')
COMMANDS = [f'bit_{b}.{c}' for b in ('pytorch', 'tf2', 'jax')
            for c in ('train', 'validate', 'predict', 'features', 'fewshot',
                      'distill')] + [
    'bit_pytorch.export', 'bit_pytorch.pretrain', 'bit_tf2.export',
    'big_transfer.tfds_reader', 'big_transfer.plot', 'big_transfer.events',
    'demo.run']
LINK = re.compile(r'\[[^\]]*\]\(([^)\s]+)\)')
FLAG = re.compile(r'(?<![\w-])--[a-z][a-z0-9_-]*')


def slug(heading):
  """GitHub's anchor of a heading: lower case, punctuation dropped except
  hyphens and underscores, spaces to hyphens."""
  text = re.sub(r'[^\w\- ]', '', heading.strip().lower())
  return text.replace(' ', '-')


def anchors(path):
  """The anchors of a Markdown page (duplicates numbered as GitHub does)."""
  seen, out = {}, set()
  in_code = False
  with open(path) as f:
    for line in f:
      if line.startswith('```'):
        in_code = not in_code
      m = None if in_code else re.match(r'#+ (.*)', line)
      if m:
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f'{base}-{n}')
  return out


def links(path):
  """The relative links of a page outside code blocks."""
  with open(path) as f:
    text = re.sub(r'```.*?```', '', f.read(), flags=re.S)
  return [t for t in LINK.findall(text)
          if not t.startswith(('http://', 'https://', 'mailto:'))]


@pytest.mark.parametrize('page', PAGES, ids=os.path.basename)
def test_every_relative_link_and_anchor_resolves(page):
  for target in links(page):
    file, _, anchor = target.partition('#')
    path = os.path.normpath(os.path.join(os.path.dirname(page), file)
                            if file else page)
    assert os.path.exists(path), f'{page}: {target} (no {path})'
    if anchor:
      assert anchor in anchors(path), f'{page}: {target} (no such heading)'


def test_the_readme_is_a_front_door():
  with open(PAGES[0]) as f:
    lines = f.read().splitlines()
  assert len(lines) <= 250
  linked = {os.path.normpath(os.path.join(REPO, file.partition('#')[0]))
            for file in links(PAGES[0])}
  assert set(PAGES[1:]) <= linked  # every docs page is reachable from it


def help_text(module):
  """What `python -m module --help` prints (run in this process)."""
  out = io.StringIO()
  argv = sys.argv
  sys.argv = [module, '--help']
  try:
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
      runpy.run_module(module, run_name='__main__', alter_sys=True)
  finally:
    sys.argv = argv
  return out.getvalue()


# runpy warns that a command's module was imported before (by another).
@pytest.mark.filterwarnings('ignore:.*found in sys.modules:RuntimeWarning')
def test_the_cli_reference_names_every_flag_and_no_other():
  import torch  # noqa: F401  (torch and torchvision before TensorFlow)
  import torchvision  # noqa: F401
  flags = set()
  for module in COMMANDS:
    text = help_text(module)
    assert text.startswith(f'usage: python -m {module} '), text[:80]
    for entry in re.split(r'\n  (?=\S)', text):  # a flag's help, each
      # argparse's "(default: None)", or a default the help already names
      assert entry.lower().count('default') <= 1 and 'default: None' not in entry, (
          module, entry)
    flags |= set(FLAG.findall(text))
  flags -= {'--help'}
  with open(CLI_PAGE) as f:
    documented = set(FLAG.findall(f.read())) - {'--help'}
  assert not flags - documented, f'not in docs/cli.md: {flags - documented}'
  assert not documented - flags, f'no command has: {documented - flags}'
