"""The fused CPU kernel of LayerNorm/RMSNorm/GroupScaling equals the XLA math.

The NumPy references in exactness_test.py and layer_norm_test.py already run
through the kernel (it is the default on CPU); these tests pin what is
particular to it: that it is really used, the threaded path, vmap, sharding,
precision with a large mean, and the fallback without a compiler.
"""

import os
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from normjax import functional as nf
from normjax._src import cpu_kernel

NORMS = {
    'layer_norm': lambda x, p: nf.layer_norm(x, p)[0],
    'rms_norm': lambda x, p: nf.rms_norm(x, p)[0],
    'group_scaling': lambda x, p: nf.group_scaling(x, p, num_groups=4)[0],
}


def data(shape, seed=0, mean=0.5):
  rng = np.random.default_rng(seed)
  c = shape[-1]
  x = jnp.asarray(rng.standard_normal(shape).astype(np.float32) * 2 + mean)
  dy = jnp.asarray(rng.standard_normal(shape).astype(np.float32))
  params = {'scale': jnp.asarray(rng.uniform(0.5, 1.5, c).astype(np.float32)),
            'bias': jnp.asarray(rng.standard_normal(c).astype(np.float32))}
  return x, dy, params


def value_and_grads(fn, x, dy, params, kernel=True):
  def loss(x, p):
    return jnp.sum(fn(x, p) * dy)
  with cpu_kernel.use_cpu_kernel(kernel):
    f = jax.jit(lambda x, p: (fn(x, p), jax.grad(loss, (0, 1))(x, p)))
    return f(x, params)


def test_kernel_builds_here():
  if not os.environ.get('CXX') and subprocess.run(
      ['which', 'g++'], capture_output=True).returncode:
    pytest.skip('no C++ compiler on this machine')
  assert cpu_kernel.available()


@pytest.mark.parametrize('name', ['layer_norm', 'rms_norm'])
def test_kernel_is_what_runs(name):
  x, _, params = data((4, 8, 16))
  hlo = jax.jit(NORMS[name]).lower(x, params).compile().as_text()
  assert 'normjax_per_token_norm_fwd' in hlo
  with cpu_kernel.use_cpu_kernel(False):  # a new function: a new trace
    hlo = jax.jit(lambda *a: NORMS[name](*a)).lower(x, params).compile(
    ).as_text()
  assert 'normjax_per_token_norm' not in hlo


@pytest.mark.parametrize('name', sorted(NORMS))
@pytest.mark.parametrize('shape', [(1, 4), (3, 1, 8), (2, 5, 36), (64, 2048)],
                         ids=['one_row', 'one_token', 'odd', 'threaded'])
def test_kernel_matches_xla(name, shape):
  if name == 'group_scaling' and shape[-1] % 4:
    pytest.skip('4 groups need features divisible by 4')
  x, dy, params = data(shape)
  got = value_and_grads(NORMS[name], x, dy, params)
  want = value_and_grads(NORMS[name], x, dy, params, kernel=False)
  chex.assert_trees_all_close(got, want, atol=2e-5 * np.sqrt(shape[0]),
                              rtol=2e-5)


def layer_norm_vs_float64(x64):
  """(the kernel's LayerNorm of x64 in float32, the float64 LayerNorm of the
  same float32 values)."""
  x = jnp.asarray(x64.astype(np.float32))
  x64 = np.asarray(x, np.float64)
  want = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(
      x64.var(-1, keepdims=True) + 1e-6)
  return np.asarray(jax.jit(lambda v: nf.layer_norm(v)[0])(x)), want


def test_large_mean_keeps_precision():
  """1e4 + 0.01 N(0, 1): the pivot shift keeps the variance exact."""
  rng = np.random.default_rng(0)
  y, want = layer_norm_vs_float64(1e4 + 0.01 * rng.standard_normal((16, 256)))
  np.testing.assert_allclose(y, want, atol=2e-4)


@pytest.mark.parametrize('first', [0.0, 10.0, 1e3])
def test_an_outlying_first_feature_keeps_precision(first):
  """The pivot x[0] far from the row's mean (a feature with massive
  activations): the variance is then taken in a second loop, not as a
  difference of two large sums."""
  x64 = np.random.default_rng(1).standard_normal((16, 256))
  x64[:, 0] = first
  y, want = layer_norm_vs_float64(x64)
  np.testing.assert_allclose(y, want, atol=1e-5)


@pytest.mark.parametrize('name', ['layer_norm', 'rms_norm'])
@pytest.mark.parametrize('shared', [True, False], ids=['shared', 'per_member'])
def test_vmap(name, shared):
  x, dy, params = data((3, 4, 8, 16))
  if not shared:
    params = jax.tree.map(lambda p: p * jnp.arange(1., 4.)[:, None],
                          jax.tree.map(lambda p: jnp.stack([p] * 3), params))
  fn = NORMS[name]
  in_axes = (0, None if shared else 0, 0)

  def per_member(x, p, dy):
    return jax.value_and_grad(lambda x, p: jnp.sum(fn(x, p) * dy), (0, 1))(
        x, p)

  got = jax.jit(jax.vmap(per_member, in_axes))(x, params, dy)
  with cpu_kernel.use_cpu_kernel(False):
    want = jax.jit(jax.vmap(per_member, in_axes))(x, params, dy)
  chex.assert_trees_all_close(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize('spec', [P('data'), P(None, 'data'),
                                  P('data', None, 'model')],
                         ids=['batch', 'length', 'batch+features'])
def test_sharded_jit_matches_unsharded(spec):
  mesh = jax.make_mesh((4, 2), ('data', 'model'),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  x, dy, params = data((8, 8, 32))
  want = value_and_grads(NORMS['layer_norm'], x, dy, params)
  put = lambda a: jax.device_put(a, NamedSharding(mesh, spec))
  got = value_and_grads(NORMS['layer_norm'], put(x), put(dy), params)
  chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)
  assert got[0].sharding.is_equivalent_to(NamedSharding(mesh, spec), 3)


def test_row_sharded_step_has_no_gather():
  mesh = jax.make_mesh((8,), ('data',),
                       axis_types=(jax.sharding.AxisType.Auto,))
  x, dy, params = data((8, 4, 16))
  put = lambda a: jax.device_put(a, NamedSharding(mesh, P('data')))

  def step(x, dy, p):
    return jax.grad(lambda x, p: jnp.sum(NORMS['layer_norm'](x, p) * dy),
                    (0, 1))(x, p)
  hlo = jax.jit(step).lower(put(x), put(dy), params).compile().as_text()
  assert 'all-gather' not in hlo
  assert 'all-reduce' in hlo  # dscale and dbias summed over the shards


def test_explicit_mesh_takes_xla_path():
  mesh = jax.make_mesh((8,), ('data',),
                       axis_types=(jax.sharding.AxisType.Explicit,))
  x, dy, params = data((8, 4, 16))
  want = value_and_grads(NORMS['layer_norm'], x, dy, params)
  with jax.set_mesh(mesh):
    xs = jax.device_put(x, P('data'))
    got = value_and_grads(NORMS['layer_norm'], xs, dy, params)
  chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)


def test_without_compiler_warns_and_uses_xla(tmp_path):
  code = textwrap.dedent("""
      import warnings
      import jax, jax.numpy as jnp
      from normjax import functional as nf
      from normjax._src import cpu_kernel
      x = jnp.arange(12.0).reshape(3, 4)
      with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        y = jax.jit(lambda v: nf.layer_norm(v)[0])(x)
      assert not cpu_kernel.available()
      assert any('kernel is unavailable' in str(m.message) for m in w), w
      print(float(jnp.abs(y).max()))
  """)
  env = dict(os.environ, CXX=str(tmp_path / 'no-such-compiler'),
             NORMJAX_KERNEL_CACHE=str(tmp_path / 'cache'),
             XLA_FLAGS='', JAX_PLATFORMS='cpu')
  done = subprocess.run([sys.executable, '-c', code], env=env,
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  assert abs(float(done.stdout.split()[-1]) - 1.3416) < 1e-3


def test_no_build_where_the_default_backend_is_not_the_cpu(monkeypatch):
  """On a GPU/TPU machine the kernel is neither built nor called."""
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')

  def must_not_build():
    raise AssertionError('built on a non-CPU backend')

  monkeypatch.setattr(cpu_kernel, '_build', must_not_build)
  cpu_kernel._load.cache_clear()
  try:
    assert not cpu_kernel.available()
    x = jnp.arange(12.0).reshape(3, 4)
    y, _ = nf.layer_norm(x)
    chex.assert_trees_all_close(
        y, (x - x.mean(-1, keepdims=True))
        / jnp.sqrt(x.var(-1, keepdims=True) + 1e-5), atol=1e-5)
  finally:
    cpu_kernel._load.cache_clear()


@pytest.mark.slow  # a fresh compile, ~7 s
def test_a_build_is_announced_once_with_its_path_and_time(tmp_path):
  code = ('import jax.numpy as jnp\nfrom normjax import functional as nf\n'
          'nf.layer_norm(jnp.ones((2, 8)))\nnf.rms_norm(jnp.ones((2, 8)))\n')
  env = dict(os.environ, NORMJAX_KERNEL_CACHE=str(tmp_path / 'cache'),
             XLA_FLAGS='', JAX_PLATFORMS='cpu')
  first = subprocess.run([sys.executable, '-c', code], env=env,
                         capture_output=True, text=True, timeout=180)
  assert first.returncode == 0, first.stderr
  assert first.stderr.count('normjax: compiling') == 1, first.stderr
  assert str(tmp_path / 'cache') in first.stderr and ' s' in first.stderr
  again = subprocess.run([sys.executable, '-c', code], env=env,
                         capture_output=True, text=True, timeout=180)
  assert 'compiling' not in again.stderr  # cached


# The row-threading pool (kernel_rows.h): 2 threads from 2 * 2^18 elements
# by default; `row_threading(min_elements=1)` threads every array, with
# hardware_concurrency threads (more than the rows of the small shapes).
THRESHOLD = 1 << 18


@pytest.fixture
def row_threading():
  """Sets the kernels' row threading for one test, then restores it."""
  if not cpu_kernel.available():
    pytest.skip('the fused CPU kernel is unavailable')
  before = cpu_kernel.row_threading()
  yield cpu_kernel.row_threading
  cpu_kernel.row_threading(*before)


def assert_bitwise_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize('name,shape,min_elements', [
    ('layer_norm', (2 * THRESHOLD // 256 - 1, 256), 0),  # below: 1 thread
    ('layer_norm', (2 * THRESHOLD // 256 + 1, 256), 0),  # 2 threads, odd rows
    ('rms_norm', (1, 2 * THRESHOLD), 0),                 # 2 threads, 1 row
    ('layer_norm', (3, 40), 1),        # every thread; rows < threads on 4+
    ('rms_norm', (1, 40), 1),          # rows < threads
    ('layer_norm', (7, 8), 1),         # rows not divisible by threads
    ('rms_norm', (7, 8), 1),
], ids=['below', 'above_odd_rows', 'one_row', 'three_rows', 'rows_lt_threads',
        'ragged_ln', 'ragged_rms'])
def test_threaded_rows_are_deterministic_and_match_xla(
    row_threading, name, shape, min_elements):
  """Repeated calls give the same bits, and agree with the XLA path, on both
  sides of the threshold and with rows that do not split evenly."""
  row_threading('xla', min_elements)
  x, dy, params = data(shape, seed=1)
  fn = NORMS[name]

  def loss(x, p):
    return jnp.sum(fn(x, p) * dy)
  f = jax.jit(lambda x, p: (fn(x, p), jax.grad(loss, (0, 1))(x, p)))
  first = f(x, params)
  assert_bitwise_equal(f(x, params), first)
  assert_bitwise_equal(f(x, params), first)
  want = value_and_grads(fn, x, dy, params, kernel=False)
  chex.assert_trees_all_close(first, want, atol=2e-5 * np.sqrt(shape[0]),
                              rtol=2e-5)


@pytest.mark.parametrize('pool', ['own', 'spawn'])
def test_every_threading_gives_the_same_bits(row_threading, pool):
  """The split depends only on (rows, threads): run on XLA's pool, on
  normjax's own pool, by spawned threads or (pool busy) serially, the bits
  are the same."""
  x, dy, params = data((37, 24), seed=2)
  fn = NORMS['layer_norm']
  row_threading('xla', 1)
  # Ready before the switch: the kernels read it when they run.
  want = jax.block_until_ready(value_and_grads(fn, x, dy, params))
  row_threading(pool, 1)
  assert_bitwise_equal(value_and_grads(fn, x, dy, params), want)


@pytest.mark.parametrize('name', sorted(NORMS))
def test_streaming_stores_give_the_same_bits(row_threading, name):
  """y and dx written with streaming stores (kernel_rows.h's WriteRow, by
  default from 8 MiB on) or without, on two threads: the same bits, on rows
  of 100 floats that start at every alignment and end in a part vector."""
  row_threading('xla', 1)
  x, dy, params = data((37, 100), seed=4)
  fn = NORMS[name]
  f = jax.jit(lambda x, p: (fn(x, p), jax.grad(
      lambda x, p: jnp.sum(fn(x, p) * dy), (0, 1))(x, p)))
  before = cpu_kernel.stream_stores()
  try:
    cpu_kernel.stream_stores(1)
    # Ready before the switch: the kernels read it when they run.
    streamed = jax.block_until_ready(f(x, params))
    cpu_kernel.stream_stores(cpu_kernel.STREAM_NEVER)
    assert_bitwise_equal(jax.block_until_ready(f(x, params)), streamed)
  finally:
    cpu_kernel.stream_stores(before)


def test_stream_stores_switch():
  if not cpu_kernel.available():
    pytest.skip('the fused CPU kernel is unavailable')
  before = cpu_kernel.stream_stores()
  try:
    assert cpu_kernel.stream_stores(123) == 123
    assert cpu_kernel.stream_stores() == 123
    assert cpu_kernel.stream_stores(0) == 8 << 20  # the default
  finally:
    cpu_kernel.stream_stores(before)
  with pytest.raises(ValueError, match='min_bytes=-1'):
    cpu_kernel.stream_stores(-1)


@pytest.mark.parametrize('pool', ['xla', 'own'])
def test_concurrent_callers_share_the_pool(row_threading, pool):
  """Calls from several threads at once (on XLA's pool each schedules its
  own tasks; on the own pool one gets it, the others run serially) and
  per-device shards all give the single-call bits."""
  import concurrent.futures  # pylint: disable=g-import-not-at-top
  row_threading(pool, 1)
  x, dy, params = data((16, 8, 32), seed=3)
  fn = NORMS['rms_norm']
  f = jax.jit(lambda x, p, dy: (fn(x, p), jax.grad(
      lambda x, p: jnp.sum(fn(x, p) * dy), (0, 1))(x, p)))
  want = jax.block_until_ready(f(x, params, dy))
  with concurrent.futures.ThreadPoolExecutor(4) as ex:
    outs = list(ex.map(lambda _: jax.block_until_ready(f(x, params, dy)),
                       range(16)))
  for got in outs:
    assert_bitwise_equal(got, want)
  mesh = jax.make_mesh((8,), ('data',),
                       axis_types=(jax.sharding.AxisType.Auto,))
  put = lambda a: jax.device_put(a, NamedSharding(mesh, P('data')))
  sharded = [f(put(x), params, put(dy)) for _ in range(3)]
  for got in sharded[1:]:
    assert_bitwise_equal(got, sharded[0])
  chex.assert_trees_all_close(sharded[0], want, atol=1e-5, rtol=1e-5)


def test_row_threading_switch_round_trips(row_threading):
  assert row_threading('xla', 0) == ('xla', THRESHOLD)
  assert row_threading('spawn', 123) == ('spawn', 123)
  assert row_threading() == ('spawn', 123)
  assert row_threading('own') == ('own', 123)
  with pytest.raises(ValueError, match="pool=True: use one of"):
    row_threading(True)
