"""Packaging: the wheel's contents and metadata, the core dependencies equal
to what the library imports, and the experiments' missing-extra message."""

import ast
import configparser
import os
import pathlib
import subprocess
import sys
import zipfile

import pytest

from experiments import _requirements

ROOT = pathlib.Path(__file__).resolve().parent.parent
STDLIB = set(sys.stdlib_module_names)
# Import name -> distribution name, where they differ.
DISTRIBUTIONS = {}


def _setup_cfg():
  cfg = configparser.ConfigParser()
  cfg.read(ROOT / 'setup.cfg')
  return cfg


def _imported_top_level(package: pathlib.Path) -> set[str]:
  names = set()
  for path in package.rglob('*.py'):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        names.update(a.name.split('.')[0] for a in node.names)
      elif isinstance(node, ast.ImportFrom) and node.level == 0:
        names.add(node.module.split('.')[0])
  return names - STDLIB - {'__future__', package.name}


def test_core_dependencies_are_what_the_library_imports():
  requires = _setup_cfg()['options']['install_requires'].split()
  declared = {r.split('>')[0].split('=')[0] for r in requires if r[0].isalpha()}
  imported = {DISTRIBUTIONS.get(n, n) for n in
              _imported_top_level(ROOT / 'normjax')}
  assert declared == imported


def test_missing_extra_names_the_pip_line(capsys):
  with pytest.raises(SystemExit) as e:
    _requirements.check({'no_such_module_x': 'no-such-dist',
                         'os': 'os', 'nope.sub': 'nope'})
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert 'need no-such-dist, nope, which are not installed' in err
  assert "pip install -e '.[experiments]'" in err
  assert _requirements.missing() == []  # this environment has them all


def test_wheel_holds_normjax_only(tmp_path):
  subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps',
                  '--no-build-isolation', '-q', '-w', str(tmp_path), str(ROOT)],
                 check=True, capture_output=True)
  wheel, = tmp_path.glob('normjax-*.whl')
  names = zipfile.ZipFile(wheel).namelist()
  tops = {n.split('/')[0] for n in names}
  assert {t for t in tops if not t.endswith('.dist-info')} == {'normjax'}
  for needed in ('normjax/py.typed', 'normjax/_src/cpu_kernel.cc',
                 'normjax/_src/power_kernel.cc', 'normjax/_src/kernel_rows.h'):
    assert needed in names
  assert any(n.endswith('.dist-info/licenses/LICENSE') for n in names), names
  assert os.path.exists(ROOT / 'CHANGELOG.md')
