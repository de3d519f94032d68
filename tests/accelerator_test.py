"""The accelerator benchmark runs on the CPU at smoke sizes (so it is ready
for a lent GPU), flags a wrong result, and guards the fused CPU kernel."""

import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from benchmarks import accelerator
from normjax._src import cpu_kernel

NORMS = ('LayerNorm', 'RMSNorm', 'GroupScaling (4)', 'BatchNorm',
         'paper BN (paper_batch_norm)', 'PN-V', 'PowerNorm',
         'UN (unified_norm)', 'flax LayerNorm', 'flax RMSNorm',
         'flax BatchNorm')


@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
  """One smoke run without train steps, fwd+bwd timed (not fwd alone):
  ~10 s on 2 cores. The whole --force run: the slow test at the end."""
  out = tmp_path_factory.mktemp('acc') / 'accelerator.md'
  result = accelerator.run('smoke', out=str(out), train_norms=(),
                           time_forward=False)
  return result, out


def test_smoke_report_has_every_section_and_norm(smoke):
  result, out = smoke
  sections = result['sections']
  for key, _, _ in accelerator.SECTIONS:
    assert 'error' not in sections[key], sections[key]
  text = out.read_text()
  for _, title, _ in accelerator.SECTIONS:
    assert f'### {title}' in text
  assert 'ERROR' not in text
  for dtype in accelerator.DTYPES:
    timed = {r['norm'] for r in sections['norms']['rows']
             if r['dtype'] == dtype and r['fwd_bwd_ms']}
    assert set(NORMS) <= timed, set(NORMS) - timed
  assert {r['family'] for r in [
      c.__dict__ for c in accelerator.norm_cases('float32')]} == set(
          accelerator.TRAFFIC)
  assert sections['train steps']['rows'] == []
  raw = json.loads(out.with_suffix('.json').read_text())
  assert raw['sections']['device']['copy_gbps']['float32'] > 0


def test_smoke_correctness_passes_for_every_norm(smoke):
  result, out = smoke
  check = result['sections']['correctness']
  assert check['passed']
  checked = {(r['norm'], r['dtype']) for r in check['rows'] if r['passed']}
  for norm in NORMS[:8]:
    for dtype in accelerator.DTYPES:
      assert (norm, dtype) in checked
  assert 'correctness: PASS' in out.read_text()


def test_a_wrong_result_fails(monkeypatch):
  real = accelerator.accelerator_outputs

  def wrong(case, *args):
    y, state, grads = real(case, *args)
    if case.name == 'RMSNorm':
      y = y + 1e-2 * np.max(np.abs(y))
    return y, state, grads
  monkeypatch.setattr(accelerator, 'accelerator_outputs', wrong)
  cases = {d: [c for c in accelerator.norm_cases(d)
               if c.name in ('LayerNorm', 'RMSNorm')]
           for d in accelerator.DTYPES}
  check = accelerator.correctness_section(cases, 'smoke')
  result = {(r['norm'], r['dtype']): r['passed'] for r in check['rows']}
  assert result == {('LayerNorm', 'float32'): True,
                    ('RMSNorm', 'float32'): False,
                    ('LayerNorm', 'bfloat16'): True,
                    ('RMSNorm', 'bfloat16'): True}  # 1% is within bf16's 5%
  assert not check['passed']
  text = accelerator.markdown(dict(size='smoke', budget_s=1, sections={
      'correctness': dict(check, seconds=0.0)}))
  assert '| RMSNorm | float32 |' in text and 'FAIL' in text
  assert 'correctness: FAIL' in text


def test_kernel_guard_only_off_the_cpu(monkeypatch):
  assert accelerator.kernel_guard()['ok']  # on the CPU the kernel may load
  cpu_kernel.available()  # loads it here (or caches that it cannot)
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  guard = accelerator.kernel_guard()
  assert guard['applies'] and guard['kernel_loaded'] and not guard['ok']
  fresh = functools.cache(lambda: True)
  monkeypatch.setattr(cpu_kernel, '_load', fresh)
  assert accelerator.kernel_guard()['ok']
  assert not cpu_kernel.available() and fresh.cache_info().currsize == 0


def test_a_failing_section_is_reported_and_the_rest_run(monkeypatch,
                                                        tmp_path):
  def broken(*args, **kwargs):
    raise RuntimeError('no device here')
  monkeypatch.setattr(accelerator, 'device_section', broken)
  monkeypatch.setattr(accelerator, 'correctness_section', broken)
  monkeypatch.setattr(accelerator, 'norms_section', broken)
  monkeypatch.setattr(accelerator, 'train_section', lambda *a, **k: dict(
      rows=[], skipped=['lm layernorm'], errors=[], steps=1))
  out = tmp_path / 'r.md'
  result = accelerator.run('smoke', out=str(out))
  text = out.read_text()
  assert text.count('RuntimeError: no device here') == 3
  assert 'skipped: lm layernorm' in text
  assert result['kernel_guard']['ok']
  late = {'sections': {}}
  accelerator._section(late, 'norms', lambda: {}, accelerator.Budget(0.0),  # pylint: disable=protected-access
                       lambda: None)
  assert 'budget is spent' in late['sections']['norms']['not_run']
  assert 'not run: the 0 s budget is spent' in accelerator.markdown(
      dict(late, size='smoke', budget_s=0.0))


@pytest.mark.slow
def test_the_whole_forced_run(tmp_path, capsys):
  """`python -m benchmarks.accelerator --force` on the CPU: ~100 s."""
  out = tmp_path / 'accelerator.md'
  accelerator.main(['--force', f'--out={out}'])
  assert 'correctness: PASS' in capsys.readouterr().out
  raw = json.loads(out.with_suffix('.json').read_text())
  train = raw['sections']['train steps']
  assert not train['errors'] and not train['skipped']
  assert {(r['task'], r['norm']) for r in train['rows']} == {
      (t, n) for t in accelerator.TASKS for n in accelerator.TRAIN_NORMS}
  assert all(0 < r['mfu'] < 1 for r in train['rows'])
  norms = raw['sections']['norms']['rows']
  assert all(r['fwd_ms'] > 0 for r in norms if r['norm'] in NORMS)
  assert 'ERROR' not in out.read_text()


def test_train_steps_import_experiments_without_its_whole_extra():
  """The GPU image lacks tfds, array_record, tensorboardX (the train steps
  never import them) and ml_collections (they do: a clear error, then,
  once it is there, the import works)."""
  code = """if True:
    import sys
    for m in ('tensorflow_datasets', 'array_record', 'tensorboardX',
              'matplotlib', 'ml_collections'):
      sys.modules[m] = None  # as if not installed
    from benchmarks import accelerator
    assert 'experiments' not in sys.modules
    try:
      accelerator.import_experiments()
    except RuntimeError as e:
      print('ERROR', e)
    del sys.modules['ml_collections']
    accelerator.import_experiments()
    from experiments.configs import lm
    print('OK', lm.__name__)"""
  done = subprocess.run([sys.executable, '-c', code], capture_output=True,
                        text=True, cwd=accelerator.ROOT, check=False,
                        env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert done.returncode == 0, done.stderr[-2000:]
  lines = done.stdout.splitlines()
  assert "need ['ml-collections']" in lines[0]
  assert lines[1] == 'OK experiments.configs.lm'


def test_a_function_that_fails_is_reported_and_the_others_timed():
  def broken(x):
    raise ValueError('does not compile')
  x = jax.numpy.ones((4,))
  ms, _, errors = accelerator.time_group(
      {('ok', 'fwd'): (jax.jit(lambda x: x + 1), (x,)),
       ('bad', 'fwd'): (broken, (x,))}, rounds=2, calls=2)
  assert set(ms) == {('ok', 'fwd')} and ms['ok', 'fwd'] > 0
  assert 'does not compile' in errors['bad', 'fwd']
