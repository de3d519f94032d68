"""Sphinx configuration: the API reference of normjax and the experiments'
configs, built with `sphinx-build -W -b html docs docs/_build/html`.

Docstrings here are plain text with ASCII formulas (`y = x / sqrt(mean(x^2)
+ eps) * scale`), written to be read in the source and in `help()`; they are
rendered verbatim (`_verbatim`) rather than parsed as reStructuredText, so
no markup has to leak into the code. The pages of the norms and of the
configs are generated from the registry and the presets (`generate.py`).
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import generate  # noqa: E402  (needs the path above)

project = 'normjax'
author = 'the normjax authors'
copyright = '2026, the normjax authors'  # noqa: A001  (Sphinx's name)
extensions = ['sphinx.ext.autodoc']
autodoc_member_order = 'bysource'
autodoc_typehints = 'signature'
autodoc_default_options = {'members': True, 'undoc-members': False}
exclude_patterns = ['_build']
html_theme = 'alabaster'
suppress_warnings = ['ref.python']  # type hints naming jax/flax internals


def _verbatim(app, what, name, obj, options, lines):
  """A docstring as a literal block: shown exactly as written."""
  del app, what, name, obj, options
  if lines and any(line.strip() for line in lines):
    body = ['   ' + line if line.strip() else '' for line in lines]
    lines[:] = ['::', ''] + body + ['']


def setup(app):
  generate.write_all(os.path.join(os.path.dirname(__file__), '_generated'))
  app.connect('autodoc-process-docstring', _verbatim)
