"""The README's quick start stays true: CI runs its test command, and the
example job it starts runs and learns."""

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def quick_start_commands():
  text = (ROOT / 'README.md').read_text()
  block = re.search(r'## Quick start.*?```bash\n(.*?)```', text, re.S).group(1)
  return [l for l in block.splitlines() if l and not l.startswith('#')]


def test_quick_start_is_two_commands_and_ci_runs_the_test_one():
  commands = quick_start_commands()
  assert len(commands) == 2
  install = 'python3 -m venv .venv && .venv/bin/pip install -r requirements.txt'
  assert all(c.startswith(install) for c in commands)
  test_command = commands[1].split(' && ')[-1]
  ci = (ROOT / '.ci' / 'run').read_text()
  assert test_command in ci.splitlines()
  assert 'pip install -q -r requirements.txt' in ci


def test_main_job_is_the_translation_demo():
  job = quick_start_commands()[0].split(' && ')[-1].split()
  assert job[1:3] == ['-m', 'experiments.wmt']
  preset = job[3].split('=', 1)[1]
  from experiments.configs import wmt  # pylint: disable=g-import-not-at-top
  config = wmt.get_config(preset)
  assert config.data.source == 'synthetic'  # runs offline
  # tests/experiments/train_smoke_test.py runs the same code path end to end.


def test_example_script_runs_and_learns():
  out = subprocess.run(
      [sys.executable, 'examples/train_tiny.py', '--steps=60'], cwd=ROOT,
      capture_output=True, text=True, timeout=300, check=True).stdout
  first, last = re.search(r'loss ([\d.]+) -> ([\d.]+)', out).groups()
  assert float(last) < 0.8 * float(first), out


def test_adding_a_norm_example_runs():
  """The README's one-record norm works as it says, then leaves the registry."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from normjax._src import definition  # pylint: disable=g-import-not-at-top
  text = (ROOT / 'README.md').read_text()
  code = re.search(r'## One definition per norm.*?```python\n(.*?)```', text,
                   re.S).group(1)
  x = jnp.arange(12.0).reshape(3, 4)
  scope = {'x': x}
  try:
    with jax.numpy_rank_promotion('allow'):  # the example broadcasts [C]
      exec(code, scope)  # pylint: disable=exec-used
      y = scope['y']
      assert jnp.allclose(y, x - x.mean(-1, keepdims=True))
      module = scope['norm']()
      out, variables = module.init_with_output(jax.random.key(0), x)
    assert jnp.allclose(out, y) and set(variables['params']) == {'scale'}
  finally:
    definition.unregister('centering')
  assert 'centering' not in definition.REGISTRY
