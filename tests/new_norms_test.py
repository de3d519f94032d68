"""Derf, SeeDNorm, EvoNorm-B0, BCN and Weight Standardization.

1. Against the float64 NumPy references (tests/reference.py, written from
   the formulas): forward to 1e-12 relative in float64 (1e-5 in float32),
   and the gradients with respect to x and every parameter against central
   finite differences of the NumPy forward; the stateful ones over three
   training steps with a padding mask (state vs reference at every step)
   and an evaluation step.
2. Invariants: Derf odd and bounded; SeeDNorm with alpha = 0 (and at init)
   is RMSNorm; EvoNorm-B0 training is scale-invariant, batch-dependent in
   training and per example in evaluation; BCN training is invariant to a
   positive per-feature affine map of x and its group stage has mean 0 and
   variance 1 per (token, group); WS columns have mean 0 and std
   s / (s + eps), and a WS layer is invariant to positive per-column affine
   maps of its kernel.
3. None of the four norms folds (no affine evaluation map), and says so.

The parametrised contract tests (contract_test, linen_test, nnx_test, ...)
cover shapes, dtypes, jit/vmap, pads, modules == function.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
from flax import nnx

import conftest
import norm_cases as nc
import normjax
from normjax import folding
from normjax import functional as nf
from normjax import linen as nl
from normjax import nnx as nnorm

B, T, C = nc.SHAPE


def _rel(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-300))


def _fd_params(f, params, dy):
  """Central differences of sum(f(params) * dy) w.r.t. every parameter."""
  out = {}
  for name in params:
    def g(v, name=name):
      return f({**params, name: v})
    out[name] = reference.numeric_vjp(g, params[name], dy)
  return out


# ---------------------------------------------------------------------------
# 1a. Stateless: Derf and SeeDNorm.

STATELESS = {
    'derf': (lambda x, p, o: reference.derf(x, p['alpha'], p['shift'],
                                            p['scale'], p['bias']),
             lambda: {'alpha': np.array([0.7]), 'shift': np.array([0.2])}),
    'seednorm': (lambda x, p, o: reference.seednorm(
        x, p['alpha'], p['beta'], p['scale'], p['bias'], o['eps']),
                 lambda: {'alpha': 0.5 * nc.normal(40, (C,)),
                          'beta': 0.2 * nc.normal(41, (C,))}),
}


def _stateless_params(kind, dtype):
  p = {'scale': 1.0 + 0.3 * nc.normal(3, (C,)),
       'bias': 0.3 * nc.normal(4, (C,)), **STATELESS[kind][1]()}
  return {k: jnp.asarray(v, dtype) for k, v in p.items()}


@pytest.mark.parametrize('kind', sorted(STATELESS))
def test_stateless_forward_and_gradients_vs_numpy(kind, float_dtype):
  forward, _ = STATELESS[kind]
  options = nc.definition(kind).resolve({})
  x = nc.x(seed=30, dtype=float_dtype)
  dy, mask = nc.cotangent(31, dtype=float_dtype), nc.mask()
  p = _stateless_params(kind, float_dtype)

  @jax.jit
  def run(x, p):
    def loss(x, p):
      y, _ = nf.get_norm(kind)(x, p, mask=mask)
      return jnp.sum(y * dy), y
    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, p)

  (_, y), (dx, dp) = run(x, p)
  rows = lambda a: np.asarray(a, np.float64).reshape(-1, C)
  p64 = {k: np.asarray(v, np.float64) for k, v in p.items()}
  want = forward(rows(x), p64, options)
  dy64 = rows(dy)
  want_dx = reference.numeric_vjp(lambda v: forward(v, p64, options),
                                  rows(x), dy64)
  want_dp = _fd_params(lambda q: forward(rows(x), q, options), p64, dy64)
  fwd, grad = _rel(rows(y), want), max(
      [_rel(rows(dx), want_dx)] + [_rel(dp[k], want_dp[k]) for k in p64])
  conftest.record_deviation(f'{kind} {float_dtype} forward (rel)', fwd)
  conftest.record_deviation(f'{kind} {float_dtype} gradient vs FD (rel)',
                            grad)
  if float_dtype == 'float64':
    assert fwd <= 1e-12, fwd
    assert grad <= 1e-7, grad  # finite differences, h = 1e-6
  else:
    assert fwd <= 1e-5, fwd
    assert grad <= 1e-3, grad


def test_derf_is_odd_and_bounded():
  x = nc.x(seed=32) * 3
  p = {'alpha': jnp.array([1.3]), 'shift': jnp.array([0.0]),
       'scale': jnp.asarray(nc.normal(33, (C,))), 'bias': jnp.zeros(C)}
  run = jax.jit(lambda x, p: nf.derf(x, p)[0])
  chex.assert_trees_all_equal(run(-x, p), -run(x, p))  # odd, exactly
  p = dict(p, shift=jnp.array([0.4]), bias=jnp.asarray(nc.normal(34, (C,))))
  big = jnp.concatenate([x, 1e4 * x, -1e4 * x])
  bound = (jnp.abs(p['scale']) + jnp.abs(p['bias'])).reshape(1, 1, C)
  assert bool(jnp.all(jnp.abs(run(big, p)) <= bound + 1e-6))
  # Per token: another example and a later token change nothing.
  y = run(x, p)
  chex.assert_trees_all_equal(run(x.at[1].multiply(7.0), p)[0], y[0])
  chex.assert_trees_all_equal(run(x.at[:, 2].add(5.0), p)[:, :2], y[:, :2])


def test_derf_defaults_are_the_official_ones():
  v = nl.Derf().init(jax.random.key(0), nc.x())['params']
  chex.assert_trees_all_equal(v['alpha'], jnp.array([0.5]))
  chex.assert_trees_all_equal(v['shift'], jnp.array([0.0]))


def test_seednorm_alpha_zero_and_init_are_rmsnorm():
  with jax.enable_x64(True):
    x = nc.x(seed=35, dtype=jnp.float64)
    p = _stateless_params('seednorm', jnp.float64)
    want = reference.rms_norm(np.asarray(x).reshape(-1, C), p['scale'],
                              p['bias'], 1e-6)
    y, _ = nf.seednorm(x, dict(p, alpha=jnp.zeros(C)))
    np.testing.assert_allclose(np.asarray(y).reshape(-1, C), want,
                               rtol=1e-14, atol=1e-14)
    y_rms, _ = nf.rms_norm(x, {'scale': p['scale'], 'bias': p['bias']})
    np.testing.assert_allclose(y, y_rms, rtol=1e-14, atol=1e-14)
  x = nc.x(seed=36)
  module = nl.SeeDNorm()
  variables = module.init(jax.random.key(0), x)
  np.testing.assert_allclose(module.apply(variables, x),
                             nf.rms_norm(x)[0], rtol=1e-6, atol=1e-6)
  # Neither alpha nor beta is stuck at init.
  grads = jax.grad(lambda v: jnp.sum(module.apply(v, x) * nc.cotangent(37)))(
      variables)['params']
  assert float(jnp.max(jnp.abs(grads['beta']))) > 1e-3


# ---------------------------------------------------------------------------
# 1b. Stateful: EvoNorm-B0 and BCN over steps.


def _b0_ref(x, mask, state, train, p, o):
  y, var = reference.evonorm_b0(x, mask, state['var'], train, p,
                                o['decay'], o['eps'])
  return y, {'var': var}


def _bcn_ref(x, mask, state, train, p, o):
  rows = x.reshape(-1, C)
  y, mean, var = reference.bcn(rows, None if mask is None else
                               np.asarray(mask).reshape(-1), state['mean'],
                               state['var'], train, p, o['num_groups'],
                               o['momentum'], o['eps'], o['group_eps'])
  return y.reshape(x.shape), {'mean': mean, 'var': var}


STATEFUL = {
    'evonorm_b0': (_b0_ref, dict(decay=0.8)),
    'bcn': (_bcn_ref, dict(num_groups=2, momentum=0.8)),
}


@pytest.mark.parametrize('kind', sorted(STATEFUL))
def test_stateful_steps_forward_state_and_gradients_vs_numpy(kind,
                                                              float_dtype):
  ref, opts = STATEFUL[kind]
  options = nc.definition(kind).resolve(opts)
  fn = functools.partial(nf.get_norm(kind), **opts)
  p = nc.params(kind, dtype=float_dtype)
  mask = nc.mask()

  @functools.partial(jax.jit, static_argnames='train')
  def run(x, p, state, dy, train):
    def loss(x, p):
      y, new = fn(x, p, state, mask=mask, use_running_average=not train)
      return jnp.sum(y * dy), (y, new)
    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, p)

  p64 = {k: np.asarray(v, np.float64) for k, v in p.items()}
  state = nf.init_state(kind, C, float_dtype, **opts)
  ref_state = {k: np.asarray(v, np.float64)
               for k, v in state._asdict().items()}
  fwd = grad = 0.0
  for i in range(4):
    train = i < 3
    x = nc.x(seed=40 + i, dtype=float_dtype)
    dy = nc.cotangent(50 + i, dtype=float_dtype)
    (_, (y, new)), (dx, dp) = run(x, p, state, dy, train)
    x64, dy64 = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    want_y, want_state = ref(x64, mask, ref_state, train, p64, options)
    f = lambda v, q=p64, s=ref_state: ref(v, mask, s, train, q, options)[0]
    want_dx = reference.numeric_vjp(f, x64, dy64)
    want_dp = _fd_params(lambda q, s=ref_state: ref(
        x64, mask, s, train, q, options)[0], p64, dy64)
    fwd = max([fwd, _rel(y, want_y)] + [_rel(getattr(new, k), v)
                                        for k, v in want_state.items()])
    grad = max([grad, _rel(dx, want_dx)] +
               [_rel(dp[k], want_dp[k]) for k in p64])
    if not train:
      chex.assert_trees_all_equal(new, state)
    state, ref_state = new, want_state
  conftest.record_deviation(f'{kind} {float_dtype} forward+state (rel)', fwd)
  conftest.record_deviation(f'{kind} {float_dtype} gradient vs FD (rel)',
                            grad)
  if float_dtype == 'float64':
    assert fwd <= 1e-12, fwd
    assert grad <= 1e-7, grad
  else:
    assert fwd <= 2e-5, fwd
    assert grad <= 2e-3, grad


def test_evonorm_b0_invariants():
  x, mask = nc.x(seed=60), nc.mask()
  state = nf.init_state('evonorm_b0', C)._replace(
      var=jnp.asarray(np.random.default_rng(0).uniform(0.5, 2, C),
                      jnp.float32))
  p = nc.params('evonorm_b0')
  run = jax.jit(lambda x, train, eps: nf.evonorm_b0(
      x, p, state, mask=mask, use_running_average=not train, eps=eps)[0],
                static_argnums=(1, 2))
  # 1. Training is scale-invariant (eps = 0).
  np.testing.assert_allclose(run(7.5 * x, True, 0.0), run(x, True, 0.0),
                             rtol=2e-5, atol=2e-5)
  # Training depends on the other example (batch variance) ...
  other = x.at[1].multiply(3.0)
  assert not np.allclose(run(other, True, 1e-5)[0], run(x, True, 1e-5)[0])
  # ... evaluation does not, nor on the pads of its own example.
  chex.assert_trees_all_equal(run(other, False, 1e-5)[0],
                              run(x, False, 1e-5)[0])
  padded = x.at[0, 2].set(1e3)
  chex.assert_trees_all_equal(run(padded, False, 1e-5)[0, :2],
                              run(x, False, 1e-5)[0, :2])


def test_bcn_invariants():
  x, mask = nc.x(seed=61), nc.mask()
  p = nc.params('bcn')
  state = nf.init_state('bcn', C)
  rng = np.random.default_rng(1)
  a = jnp.asarray(rng.uniform(0.3, 3.0, (1, 1, C)), jnp.float32)
  b = jnp.asarray(rng.normal(size=(1, 1, C)), jnp.float32)
  run = jax.jit(lambda x, p, train: nf.bcn(
      x, p, state, mask=mask, use_running_average=not train, num_groups=2,
      eps=0.0, group_eps=0.0)[0], static_argnums=2)
  # 3. Training is invariant to a positive per-feature affine map of x.
  np.testing.assert_allclose(run(x * a + b, p, True), run(x, p, True),
                             rtol=2e-4, atol=2e-4)
  # 4. Before the group affine the group stage is standardised per token.
  plain = {'scale': p['scale'], 'bias': p['bias']}
  u = np.asarray(run(x, plain, True), np.float64).reshape(B, T, 2, C // 2)
  np.testing.assert_allclose(u.mean(-1), 0.0, atol=1e-6)
  np.testing.assert_allclose(u.var(-1), 1.0, atol=1e-5)
  # Evaluation is per token (batch-independent and causal).
  y = run(x, p, False)
  chex.assert_trees_all_equal(run(x.at[1].multiply(3.0), p, False)[0], y[0])
  chex.assert_trees_all_equal(run(x.at[:, 2].add(4.0), p, False)[:, :2],
                              y[:, :2])
  # Training is not: the batch statistics see the other example.
  assert not np.allclose(run(x.at[1].multiply(3.0), p, True)[0],
                         run(x, p, True)[0])


# ---------------------------------------------------------------------------
# 2. Weight Standardization.


def test_weight_standardize_vs_numpy_and_columns():
  with jax.enable_x64(True):
    w = jnp.asarray(nc.normal(70, (6, 2, 5)), jnp.float64) * 3 + 1
    for ddof in (0, 1):
      got = normjax.weight_standardize(w, 1e-5, ddof)
      want = reference.weight_standardize(np.asarray(w), 1e-5, ddof)
      assert _rel(got, want) <= 1e-13
      cols = np.asarray(got).reshape(-1, 5)
      sigma = np.asarray(w).reshape(-1, 5).std(0, ddof=ddof)
      np.testing.assert_allclose(cols.mean(0), 0, atol=1e-14)
      np.testing.assert_allclose(cols.std(0, ddof=ddof), sigma / (sigma + 1e-5),
                                 rtol=1e-13)
    dy = jnp.asarray(nc.normal(71, w.shape), jnp.float64)
    dw = jax.grad(lambda w: jnp.sum(normjax.weight_standardize(w) * dy))(w)
    want = reference.numeric_vjp(reference.weight_standardize, np.asarray(w),
                                 np.asarray(dy))
    dev = _rel(dw, want)
    conftest.record_deviation('weight_standardize f64 gradient vs FD (rel)',
                              dev)
    assert dev <= 1e-7, dev
  # bfloat16 kernels: computed in float32, returned in bfloat16.
  w16 = jnp.asarray(nc.normal(72, (8, 4)), jnp.bfloat16)
  assert normjax.weight_standardize(w16).dtype == jnp.bfloat16
  with pytest.raises(ValueError, match='rank >= 2'):
    normjax.weight_standardize(jnp.ones(3))
  with pytest.raises(ValueError, match='`ddof`'):
    normjax.weight_standardize(jnp.ones((3, 2)), ddof=3)


def test_ws_dense_invariant_to_column_affine_maps_and_nnx_agrees():
  x = nc.x(seed=73)
  layer = nl.WSDense(5, ws_eps=0.0)
  variables = layer.init(jax.random.key(0), x)
  kernel = variables['params']['kernel']
  assert kernel.shape == (C, 5) and set(variables['params']) == {'kernel',
                                                                  'bias'}
  rng = np.random.default_rng(2)
  a = jnp.asarray(rng.uniform(0.2, 4.0, (1, 5)), jnp.float32)
  b = jnp.asarray(rng.normal(size=(1, 5)), jnp.float32)
  moved = {'params': dict(variables['params'], kernel=kernel * a + b)}
  y = layer.apply(variables, x)
  np.testing.assert_allclose(layer.apply(moved, x), y, rtol=1e-5, atol=1e-5)
  want = x @ normjax.weight_standardize(kernel, 0.0) + variables['params'][
      'bias'].reshape(1, 1, 5)
  np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-6)
  linear = nnorm.WSLinear(C, 5, ws_eps=0.0, rngs=nnx.Rngs(0))
  linear.kernel[...] = kernel
  np.testing.assert_allclose(linear(x), y, rtol=1e-6, atol=1e-6)
  grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(linear)
  assert np.all(np.isfinite(grads['kernel'][...]))


# ---------------------------------------------------------------------------
# 3. Not foldable.


@pytest.mark.parametrize('kind', ['derf', 'seednorm', 'evonorm_b0', 'bcn'])
def test_does_not_fold_and_says_why(kind):
  defn = nc.definition(kind)
  assert defn.eval_affine is None
  sites = [folding.NormSite(('norm',), kind, nc.options(kind),
                            (('dense',),))]
  variables = {'params': {'norm': {k: np.asarray(v) for k, v in
                                   nc.params(kind).items()},
                          'dense': {'kernel': np.ones((C, 2)),
                                    'bias': np.zeros(2)}}}
  if defn.stateful:
    variables['batch_stats'] = {'norm': nc.state(kind)._asdict()}
  with pytest.raises(ValueError, match='no evaluation-mode affine form'):
    folding.fold_norms(variables, sites)
