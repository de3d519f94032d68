"""The fused PowerNorm/UN training kernels equal the XLA math they replace.

The NumPy-reference exactness tests (exactness_test.py, power_norm_test.py,
unified_norm_test.py) already run through the kernels in float32, since they
are the default on CPU. These tests pin what is particular to the kernels:
that they run, every option against the jnp path over several steps (warmup
boundary, padding, the threaded path), vmap, batch groups and sharding.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import normjax
from normjax import functional as nf
from normjax._src import cpu_kernel, power_kernel

pytestmark = pytest.mark.skipif(not cpu_kernel.available(),
                                reason='the fused CPU kernel is unavailable')

C = 16


@pytest.fixture(autouse=True)
def kernels_at_every_size(monkeypatch):
  for norm in power_kernel.MIN_ELEMENTS:
    monkeypatch.setitem(power_kernel.MIN_ELEMENTS, norm, 0)
NORMS = {
    'power_norm': (nf.power_norm,
                   lambda c, n=1: nf.init_power_norm_state(
                       c, num_batch_groups=n),
                   dict(warmup_steps=2, num_groups=4)),
    'unified_norm': (nf.unified_norm,
                     lambda c, n=1: nf.init_unified_norm_state(
                         c, 2, num_batch_groups=n),
                     dict(warmup_steps=2, window_size=2,
                          compensation_delay=2)),
    'batch_norm': (nf.batch_norm,
                   lambda c, n=1: nf.init_batch_norm_state(
                       c, num_batch_groups=n), {}),
    'paper_batch_norm': (nf.paper_batch_norm,
                         lambda c, n=1: nf.init_paper_batch_norm_state(
                             c, num_batch_groups=n), {}),
    'pn_v': (nf.pn_v,
             lambda c, n=1: nf.init_pn_v_state(c, num_batch_groups=n),
             dict(num_groups=4)),
}
EXACT = ('batch_norm', 'paper_batch_norm', 'pn_v')  # autodiff's gradient
OPTIONS = {
    'power_norm': {
        'official': {},
        'paper': dict(backward_denominator='running', grad_mean_over='valid'),
        'no_group_scaling': dict(use_group_scaling=False),
        'no_mask': dict(_mask=False),
        'no_params': dict(_params=False),
    },
    'unified_norm': {
        'official': {},
        'valid': dict(mean_over='valid'),
        'filtration': dict(outlier_filtration=True),
        'no_params': dict(_params=False),
    },
    'batch_norm': {'masked': {}, 'no_mask': dict(_mask=False),
                   'no_params': dict(_params=False)},
    'paper_batch_norm': {'masked': {}, 'no_mask': dict(_mask=False),
                         'no_params': dict(_params=False)},
    'pn_v': {'masked': {}, 'no_mask': dict(_mask=False),
             'no_group_scaling': dict(use_group_scaling=False)},
}


def data(shape, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(shape).astype(np.float32) * 2 + 0.3
  dy = rng.standard_normal(shape).astype(np.float32)
  mask = rng.uniform(size=shape[:-1]) > 0.25
  c = shape[-1]
  params = {'scale': rng.uniform(0.5, 1.5, c).astype(np.float32),
            'bias': rng.standard_normal(c).astype(np.float32)}
  return jax.tree.map(jnp.asarray, (x, dy, mask, params))


def steps(name, options, shape, kernel, num_steps=4, num_batch_groups=1):
  """Outputs, gradients and states of `num_steps` training steps."""
  step, state = step_fn(name, options, shape, num_batch_groups)
  with cpu_kernel.use_cpu_kernel(kernel):
    return run_steps(jax.jit(step), state, shape, num_steps)


def run_steps(step, state, shape, num_steps):
  out = []
  for i in range(num_steps):
    x, dy, mask, params = data(shape, seed=i)
    y, grads, state = step(x, dy, mask, params, state)
    out.append((y, grads, state))
  return out


def step_fn(name, options, shape, num_batch_groups=1):
  """(step(x, dy, mask, params, state) -> (y, grads, new state), state)."""
  fn, init, defaults = NORMS[name]
  options = dict(defaults, **options)
  use_mask = options.pop('_mask', True)
  use_params = options.pop('_params', True)
  state = init(shape[-1], num_batch_groups)
  fields = getattr(type(state), 'BACKWARD_FIELDS', ())

  def step(x, dy, mask, params, state):
    def loss(x, params, stats):
      y, new = fn(x, params, state._replace(**stats),
                  mask=mask if use_mask else None,
                  num_batch_groups=num_batch_groups, **options)
      return jnp.sum(y * dy), (y, new)
    stats = {f: getattr(state, f) for f in fields}
    grads, (y, new) = jax.grad(loss, (0, 1, 2), has_aux=True)(
        x, params if use_params else None, stats)
    return y, grads, new._replace(
        **normjax.apply_backward_stats(stats, grads[2]))
  return step, state


def assert_close(got, want, rows):
  chex.assert_trees_all_close(got, want, atol=5e-6 * np.sqrt(rows),
                              rtol=2e-5)


def test_small_inputs_take_the_jnp_path_where_it_is_faster(monkeypatch):
  monkeypatch.setitem(power_kernel.MIN_ELEMENTS, 'unified_norm', 1 << 19)
  x = jnp.ones((2, 8, C))
  assert not power_kernel.usable(x, 'unified_norm')
  assert power_kernel.usable(x, 'power_norm')
  assert power_kernel.usable(jnp.ones((32, 64, 256)), 'unified_norm')


@pytest.mark.parametrize('name', sorted(NORMS))
def test_kernels_are_what_run(name):
  fn, init, options = NORMS[name]
  x, dy, mask, params = data((4, 8, C))
  state = init(C)

  if name not in EXACT:  # dx and dparams only: statistics frozen on purpose
    options = dict(options, freeze_backward_stats=True)

  def train_grad(x, p):
    return jax.value_and_grad(lambda x, p: jnp.sum(
        fn(x, p, state, mask=mask, **options)[0] * dy), (0, 1))(x, p)
  hlo = jax.jit(train_grad).lower(x, params).compile().as_text()
  if name == 'power_norm':  # statistics and normalisation in one call
    assert 'normjax_power_forward' in hlo
  else:
    assert 'normjax_power_stats' in hlo and 'normjax_power_apply' in hlo
  assert 'normjax_power_bwd' in hlo
  if name in ('unified_norm',) + EXACT:  # two backward passes
    assert 'normjax_power_columns' in hlo
  with cpu_kernel.use_cpu_kernel(False):
    hlo = jax.jit(lambda *a: train_grad(*a)).lower(x, params).compile(
    ).as_text()
  assert 'normjax_power' not in hlo


def cases():
  for name in sorted(NORMS):
    for option in sorted(OPTIONS[name]):
      yield pytest.param(name, option, id=f'{name}-{option}')


@pytest.mark.parametrize('name,option', list(cases()))
def test_steps_match_xla(name, option):
  """Four steps across the warmup boundary, with padding."""
  shape = (3, 5, C)
  got = steps(name, OPTIONS[name][option], shape, kernel=True)
  want = steps(name, OPTIONS[name][option], shape, kernel=False)
  assert_close(got, want, 15)


@pytest.mark.parametrize('name', sorted(NORMS))
def test_threaded_path_matches_xla(name):
  shape = (16, 32, 512)  # 2^18 elements: more than one thread
  got = steps(name, {}, shape, kernel=True, num_steps=2)
  want = steps(name, {}, shape, kernel=False, num_steps=2)
  assert_close(got, want, 16 * 32)


@pytest.mark.parametrize('name', ['power_norm', 'batch_norm'])
def test_rows_streamed_one_at_a_time_match_xla(name):
  """Above power_kernel.cc's kBlockedBytes (8 MiB of x) the statistics and
  backward passes take rows one at a time instead of in blocks of two, and
  write y and dx with streaming stores."""
  shape = (17, 128, 1024)  # 8.5 MiB of float32
  got = steps(name, {}, shape, kernel=True, num_steps=2)
  want = steps(name, {}, shape, kernel=False, num_steps=2)
  assert_close(got, want, 17 * 128)


@pytest.mark.parametrize('name', sorted(NORMS))
def test_streaming_stores_give_the_same_bits(name):
  """Every output written with streaming stores (kernel_rows.h's WriteRow;
  by default only from 8 MiB on, as in the two tests around this one) or
  with none, the same compiled steps give the same bits: across the warmup,
  with pads, on rows and groups of 100 and 25 floats, which start at every
  alignment and end in part vectors."""
  shape = (3, 7, 100)
  step, state = step_fn(name, {}, shape)
  before = cpu_kernel.stream_stores()
  with cpu_kernel.use_cpu_kernel(True):
    step = jax.jit(step)
    try:
      cpu_kernel.stream_stores(1)
      # Ready before the switch: the kernels read it when they run.
      streamed = jax.block_until_ready(run_steps(step, state, shape, 4))
      cpu_kernel.stream_stores(cpu_kernel.STREAM_NEVER)
      stored = jax.block_until_ready(run_steps(step, state, shape, 4))
    finally:
      cpu_kernel.stream_stores(before)
  for a, b in zip(jax.tree.leaves(streamed), jax.tree.leaves(stored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize('name', sorted(NORMS))
def test_streamed_tiles_with_ragged_columns_match_xla(name):
  """Streamed, the statistics pass works on tiles of 64 columns, then 8,
  then 1: 1900 features (groups of 475 = 7 * 64 + 3 * 8 + 3) take all
  three."""
  shape = (9, 128, 1900)  # 8.4 MiB of float32
  got = steps(name, {}, shape, kernel=True, num_steps=2)
  want = steps(name, {}, shape, kernel=False, num_steps=2)
  assert_close(got, want, 9 * 128)


@pytest.mark.parametrize('name', ['power_norm', 'pn_v'])
@pytest.mark.parametrize('shape', [(4, 16, 64), (2, 7, 1900)])
def test_evaluation_is_one_kernel_pass_equal_to_jnp(name, shape):
  """With GroupScaling, evaluation (y = GroupScaling(x) * scale + bias from
  the definition's EvalAffine) runs as one kernel call; its output and its
  gradient wrt x, the params and the running statistic match the jnp
  path's autodiff."""
  fn, init, options = NORMS[name]
  x, dy, _, params = data(shape, seed=5)
  phi = jnp.asarray(np.random.default_rng(6).uniform(0.5, 2, shape[-1]),
                    jnp.float32)

  def evaluate(x, params, phi, kernel):
    with cpu_kernel.use_cpu_kernel(kernel):
      state = init(shape[-1])._replace(running_phi=phi)
      y, new = fn(x, params, state, use_running_average=True, **options)
      return jnp.sum(y * dy), (y, new)

  def run(kernel):
    f = jax.jit(jax.grad(functools.partial(evaluate, kernel=kernel),
                         (0, 1, 2), has_aux=True))
    return f(x, params, phi), f.lower(x, params, phi).as_text()

  (got, (y, new)), hlo = run(True)
  want, _ = run(False)
  assert hlo.count('@normjax_power_forward') == 1
  assert hlo.count('@normjax_power_bwd') == 1
  np.testing.assert_array_equal(new.running_phi, phi)  # evaluation
  chex.assert_trees_all_close((got, y), (want[0], want[1][0]),
                              atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('groups', [0, 4])
@pytest.mark.parametrize('center', [False, True])
def test_streamed_statistics_keep_a_nan_pad_out(groups, center):
  """The sums skip rows with w = 0, so NaN there changes no bit of them."""
  x, _, mask, _ = data((9, 128, 1900), seed=4)
  w = mask.astype(jnp.float32)
  stats = power_kernel.centered_stats if center else power_kernel.stats
  run = jax.jit(lambda x: stats(x, w, groups, 1e-5))
  clean = run(x)
  with_nan = run(jnp.where(mask[..., None], x, jnp.nan))
  for got, want in zip(with_nan[1:3], clean[1:3]):  # sq, s1
    assert np.all(np.isfinite(got))
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize('name', sorted(NORMS))
def test_batch_groups_match_xla(name):
  """num_batch_groups vmaps the step: one kernel call per group."""
  got = steps(name, {}, (4, 5, C), kernel=True, num_steps=3,
              num_batch_groups=2)
  want = steps(name, {}, (4, 5, C), kernel=False, num_steps=3,
               num_batch_groups=2)
  assert_close(got, want, 10)


def test_all_padding_batch_leaves_state_unchanged():
  fn, init, options = NORMS['power_norm']
  x, dy, _, params = data((2, 3, C))
  mask = jnp.zeros((2, 3), bool)
  state = init(C)._replace(ema_gz=jnp.full((C,), 0.5))
  with cpu_kernel.use_cpu_kernel(True):
    def loss(x, u):
      y, new = fn(x, params, state._replace(ema_gz=u), mask=mask, **options)
      return jnp.sum(y * dy), new
    (dx, du), new = jax.jit(jax.grad(loss, (0, 1), has_aux=True))(
        x, state.ema_gz)
  chex.assert_trees_all_equal(new, state)
  np.testing.assert_array_equal(du, 0)
  assert np.all(np.isfinite(dx))


def sharded_cases():
  for name in sorted(NORMS):
    yield pytest.param(name, False, id=name)
  # PowerNorm after its warmup: one forward pass, psi2 psum'd on the shards
  yield pytest.param('power_norm', True, id='power_norm-after_warmup')


@pytest.mark.parametrize('name,after_warmup', list(sharded_cases()))
def test_row_sharded_step_matches_and_has_no_gather(name, after_warmup):
  fn, init, options = NORMS[name]
  mesh = jax.make_mesh((8,), ('data',),
                       axis_types=(jax.sharding.AxisType.Auto,))
  x, dy, mask, params = data((8, 4, C))
  state = init(C)
  if after_warmup:
    state = state._replace(step=jnp.asarray(5, state.step.dtype),
                           running_phi=jnp.full((C,), 1.7))
  fields = getattr(type(state), 'BACKWARD_FIELDS', ())

  def step(x, dy, mask, p):
    def loss(x, p, stats):
      y, new = fn(x, p, state._replace(**stats), mask=mask, **options)
      return jnp.sum(y * dy), new
    stats = {f: getattr(state, f) for f in fields}
    return jax.grad(loss, (0, 1, 2), has_aux=True)(x, p, stats)

  want = jax.jit(step)(x, dy, mask, params)
  put = lambda a: jax.device_put(a, NamedSharding(mesh, P('data')))
  sharded = jax.jit(step).lower(put(x), put(dy), put(mask), params).compile()
  hlo = sharded.as_text()
  assert 'all-gather' not in hlo
  assert 'all-reduce' in hlo  # column statistics summed over the shards
  got = sharded(put(x), put(dy), put(mask), params)
  chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('name', sorted(NORMS))
def test_threaded_kernels_are_deterministic(name):
  """Every array threaded: 3 rows over all cores (not divisible by 2; on 4+
  cores some threads without rows). Repeated steps give the same bits, on
  XLA's pool and on normjax's own, and agree with the jnp path."""
  shape = (1, 3, C)
  before = cpu_kernel.row_threading()
  cpu_kernel.row_threading('xla', 1)
  try:
    # Ready before the switch: the kernels read it when they run.
    first = jax.block_until_ready(steps(name, {}, shape, True, num_steps=2))
    cpu_kernel.row_threading('own')
    again = steps(name, {}, shape, True, num_steps=2)
  finally:
    cpu_kernel.row_threading(*before)
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert_close(first, steps(name, {}, shape, False, num_steps=2),
               shape[0] * shape[1])
