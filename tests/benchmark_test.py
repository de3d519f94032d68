"""The benchmark's quick mode runs, so the benchmark cannot rot."""

import math

import pytest

from benchmarks import norms
from normjax._src import cpu_kernel


# ~12 s of compiles (36 jitted functions); CI's `python -m benchmarks --quick`
# step runs the same code on every push.
@pytest.mark.slow
def test_quick_benchmark_reports_every_norm():
  results = norms.run(quick=True)
  names = {r['norm'] for r in results}
  for needed in ('copy (bound)', 'flax LayerNorm', 'normjax LayerNorm',
                 'normjax PowerNorm train (mask)',
                 'normjax UnifiedNorm train (mask)'):
    assert needed in names
  for r in results:
    assert r['fwd_ms'] > 0 and math.isfinite(r['fwd_ms'])
  lines = norms.ratios(results)
  torch_line = any(r['norm'] == norms.TORCH_PN for r in results)
  # With the kernel: each norm on XLA's pool against normjax's own, and
  # PowerNorm vs LayerNorm both on the own pool; streaming against normal
  # stores, PowerNorm vs LayerNorm (and BatchNorm vs torch) with normal.
  kernel = cpu_kernel.available()
  own_pool = len(norms.OWN_POOL) + 1 if kernel else 0
  stores = len(norms.NORMAL_STORES) + 1 + torch_line if kernel else 0
  assert len(lines) == (len(norms.TARGETS) + len(norms.TRAFFIC)
                        + len(norms.BEFORE_AFTER) + own_pool + stores
                        + torch_line)
  assert all(('ok' in l or 'MISSED' in l or 'not measured' in l
              or 'faster' in l or 'own pool' in l or 'normal stores' in l)
             for l in lines)
  assert sum('own pool' in l for l in lines) == own_pool
  assert sum('normal stores' in l for l in lines) == stores
  assert set(norms.TRAFFIC) <= names  # every trained norm is timed
  assert norms.markdown(results).startswith('| norm |')


def test_report_goes_between_the_readme_markers(tmp_path):
  from benchmarks import __main__ as suite  # pylint: disable=g-import-not-at-top
  with open(suite.README) as fh:
    readme = fh.read()
  assert readme.count(suite.BEGIN) == 1 and readme.count(suite.END) == 1
  path = tmp_path / 'README.md'
  path.write_text(f'intro\n{suite.BEGIN}\nold\n{suite.END}\nrest\n')
  suite.write_readme('new table', str(path))
  suite.write_readme('newer table', str(path))  # idempotent
  assert path.read_text() == (f'intro\n{suite.BEGIN}\nnewer table\n'
                              f'{suite.END}\nrest\n')


def test_torch_powernorm_peer_computes_what_normjax_does():
  """The torch peer timed by benchmarks.norms is the same algorithm."""
  torch = pytest.importorskip('torch')
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from benchmarks import torch_powernorm  # pylint: disable=g-import-not-at-top
  from normjax import functional as nf  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  c, options = 16, dict(num_groups=4, warmup_steps=2)
  peer = torch_powernorm.MaskPowerNorm(c, **options)
  state = nf.init_power_norm_state(c)
  params = {'scale': jnp.ones(c), 'bias': jnp.zeros(c)}

  def loss(x, p, u, mask, dy, state):
    y, new = nf.power_norm(x, p, state._replace(ema_gz=u), mask=mask,
                           **options)
    return jnp.sum(y * dy), (y, new)
  step = jax.jit(jax.grad(loss, (0, 1, 2), has_aux=True))
  for _ in range(4):  # across the warmup boundary
    x = rng.standard_normal((3, 5, c)).astype(np.float32) + 0.3
    dy = rng.standard_normal((3, 5, c)).astype(np.float32)
    mask = rng.uniform(size=(3, 5)) > 0.3
    xt = torch.from_numpy(x).requires_grad_(True)
    peer.zero_grad(set_to_none=True)
    yt = peer(xt, torch.from_numpy(mask))
    yt.backward(torch.from_numpy(dy))
    (dx, dp, du), (y, new) = step(jnp.asarray(x), params, state.ema_gz,
                                  jnp.asarray(mask), jnp.asarray(dy), state)
    state = new._replace(ema_gz=state.ema_gz + du)
    for got, want in ((y, yt), (dx, xt.grad), (dp['scale'], peer.weight.grad),
                      (dp['bias'], peer.bias.grad),
                      (state.running_phi, peer.running_phi),
                      (state.ema_gz, peer.ema_gz)):
      np.testing.assert_allclose(np.asarray(got), want.detach().numpy(),
                                 rtol=2e-5, atol=2e-5)


@pytest.mark.slow  # 3 fresh compiles: ~23 s of CPU (60 s wall at load 7)
def test_quick_efficiency_benchmark_runs():
  """benchmarks.efficiency --quick: a train step's FLOPs and MFU, and the
  decoding speed with beam 4 and 1."""
  from benchmarks import efficiency  # pylint: disable=g-import-not-at-top
  result = efficiency.run(quick=True)
  assert result['peak']['flops'] > 0
  (row,) = result['train']
  assert row['step_ms'] > 0 and row['xla_gflop'] > 0 and row['cost_gflop'] > 0
  assert 0 < row['mfu'] and math.isfinite(row['mfu'])
  assert sorted(r['beam'] for r in result['decode']) == [1, 4]
  assert all(r['tokens_per_s'] > 0 for r in result['decode'])
  assert efficiency.markdown(result).startswith('Measured float32 matmul')


def test_quick_size_sweep(tmp_path):
  """`python -m benchmarks.sizes --quick`: table, targets and figure."""
  from benchmarks import sizes  # pylint: disable=g-import-not-at-top
  rows = sizes.run(quick=True)
  assert [(r['norm'], r['log2n']) for r in rows] == [
      (n, s) for s in sizes.QUICK_SIZES for n in sizes.NORMS]
  for r in rows:
    for mode in sizes.MODES:
      for lib in ('normjax', 'flax'):
        assert r[f'{lib} {mode} us'] > 0
      assert r[f'vs flax {mode}'] > 0 and r[f'GB/s {mode}'] > 0
  table = sizes.markdown(rows)
  assert table.startswith('fwd+bwd:')
  assert '| LayerNorm | 4x1024 | 2^12 | 3 |' in table
  lines = sizes.targets(rows)
  assert len(lines) == len(sizes.NORMS) * len(sizes.MODES) * 2
  assert all(('ok' in l or 'MISSED' in l or 'not measured' in l)
             for l in lines)
  path = sizes.figure(rows, str(tmp_path / 'sizes.png'))
  with open(path, 'rb') as fh:
    assert fh.read(8) == b'\x89PNG\r\n\x1a\n'


def test_settle_waits_for_a_spinning_thread_and_not_otherwise():
  """benchmarks.timing.settle_threads: a thread that spins (as torch's
  OpenMP workers do after a call) holds the next timed call back until it
  stops; with every other thread parked it returns at once."""
  import threading  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  from benchmarks import timing  # pylint: disable=g-import-not-at-top
  if timing.settle_threads() > 0.01:
    pytest.skip('another thread of this process keeps running')
  spin_s, started = 0.03, threading.Event()

  def spin():
    started.set()
    end = time.perf_counter() + spin_s
    while time.perf_counter() < end:
      pass
  worker = threading.Thread(target=spin)
  worker.start()
  started.wait()
  waited = timing.settle_threads(timeout_s=1.0)
  worker.join()
  assert waited > 0.5 * spin_s
  assert timing.settle_threads() < 0.02


def test_timed_rounds_call_everything_once_per_round():
  from benchmarks import timing  # pylint: disable=g-import-not-at-top
  calls = {'a': 0, 'b': 0}

  def counted(key):
    def f():
      calls[key] += 1
    return f
  evicted = []
  times = timing.timed_rounds({k: (counted(k), ()) for k in calls}, 1, 3,
                              evict=lambda: evicted.append(1))
  assert {k: len(v) for k, v in times.items()} == {'a': 3, 'b': 3}
  assert calls == {'a': 4, 'b': 4} and len(evicted) == 6  # 1 warm-up each
  assert timing.paired_ratio([2.0, 4.0, 6.0], [1.0, 2.0, 2.0]) == 2.0


@pytest.mark.slow
def test_stores_benchmark_times_every_case():
  if not cpu_kernel.available():
    pytest.skip('the fused CPU kernel is unavailable')
  from benchmarks import stores  # pylint: disable=g-import-not-at-top
  results = stores.run(quick=True)
  assert [r['case'] for r in results] == list(stores.cases(8, 8))
  for r in results:
    assert r['normal_ms'] > 0 and r['streaming_ms'] > 0 and r['ratio'] > 0
  assert stores.markdown(results, 256, 128).count('\n| ') == len(results) + 2
