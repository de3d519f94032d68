"""The notebooks: each .py (jupytext percent) has an .ipynb twin with the same
cells, and saves the figures the README shows. CI executes them (.ci/run)."""

import glob
import os
import re

import jupytext
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = sorted(glob.glob(os.path.join(ROOT, 'notebooks', '[0-9]*.py')))


def test_there_are_notebooks():
  assert len(SOURCES) >= 5


@pytest.mark.parametrize('source', SOURCES, ids=os.path.basename)
def test_ipynb_twin_has_the_same_cells(source):
  twin = source[:-3] + '.ipynb'
  assert os.path.exists(twin), f'run: jupytext --to ipynb {source}'
  cells = lambda nb: [(c.cell_type, c.source.strip()) for c in nb.cells]
  assert cells(jupytext.read(source)) == cells(jupytext.read(twin)), (
      f'{twin} is out of date: jupytext --sync {source}')


def test_readme_figures_are_saved_by_a_notebook():
  with open(os.path.join(ROOT, 'README.md')) as f:
    figures = set(re.findall(r'notebooks/figures/([\w.-]+\.png)', f.read()))
  assert figures, 'the README shows no notebook figure'
  saved = set()
  for source in SOURCES:
    with open(source) as f:
      saved |= set(re.findall(r"figure_path\('([\w.-]+\.png)'\)", f.read()))
  assert figures <= saved, f'not made by any notebook: {figures - saved}'
  for name in figures:
    assert os.path.exists(os.path.join(ROOT, 'notebooks', 'figures', name))
