"""The norm zoo: what is particular to DyT, CRMSNorm, GroupNorm, EvoNorm-S0,
LayerNorm Scaling, and all of adaLN-Zero, TD-LN / TD-RMSNorm and QK-norm.

The slot norms' shared contract (references, gradients, bf16, jit, vmap,
remat, pads, bad inputs, module == function) is written once over the
registry in contract_test, bad_input_test and linen_test.

1. Forward against the NumPy references of tests/reference.py (written from
   the zoo spec) for the option variants and norms not in the registry
   tests, float32 and float64; the largest deviations are printed.
2. Backward: autodiff against finite differences of the NumPy forward (or
   DyT's analytic gradient), and `check_grads` on the conditional norms.
3. bfloat16, masks, jit and vmap of the conditional norms; batch
   independence and causality.
4. The conditional and QK modules == functions; DyT's alpha_init by site.
5. The invariants of the zoo spec's test lists for these norms.
6. Bad inputs of the conditional norms raise at trace time, naming the
   argument.
"""

import functools

import chex
import conftest
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from jax.test_util import check_grads

import norm_cases as nc

from normjax import functional as nf
from normjax import linen as nl

B, T, C = 2, 3, 8
SHAPE = (B, T, C)
MASK = np.array([[True, True, False], [True, True, True]])


def _rng(seed):
  return np.random.default_rng(seed)


def _x(dtype='float32', seed=0, shape=SHAPE):
  rng = _rng(seed)
  x = rng.normal(size=shape) * rng.uniform(0.5, 2.0, shape[-1]) + 0.3
  return jnp.asarray(x, dtype)


def _vec(seed, n=C, center=0.0, spread=0.3, dtype='float32'):
  return jnp.asarray(center + spread * _rng(seed).normal(size=n), dtype)


def _affine(dtype='float32', seed=3, n=C):
  return {'scale': _vec(seed, n, 1.0, 0.3, dtype),
          'bias': _vec(seed + 1, n, 0.0, 0.3, dtype)}


def _td(dtype='float32', seed=5, n=C):
  """Random (not initial) TD-LN params."""
  def one(s, center):
    return {'param0': _vec(s, n, center, 0.5, dtype),
            'param1': _vec(s + 1, n, center, 0.5, dtype),
            'nodecay_weight': _vec(s + 2, n, 0.0, 0.5, dtype),
            'nodecay_bias': _vec(s + 3, n, 0.0, 0.5, dtype)}
  return {'scale': one(seed, 1.0), 'bias': one(seed + 10, 0.0)}


def _rows(a):
  a = np.asarray(a, np.float64)
  return a.reshape(-1, a.shape[-1])


def _per_row(v, shape=SHAPE):
  """Broadcast per-example conditioning [B, ...] to one row per token."""
  v = np.asarray(v, np.float64)
  lead = v.shape[:-1] if v.ndim > 1 else v.shape
  tail = v.shape[-1:] if v.ndim > 1 else ()
  full = v.reshape(lead + (1,) * (len(shape) - 1 - len(lead)) + tail)
  full = np.broadcast_to(full, shape[:-1] + tail)
  return full.reshape((-1,) + tail)


def _tol(dtype):
  return dict(atol=3e-6, rtol=3e-6) if dtype == 'float32' else dict(
      atol=1e-12, rtol=1e-12)


def _check(name, dtype, got, want, tol=None):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  scale = max(1.0, float(np.max(np.abs(want))))
  conftest.record_deviation(f'zoo {name} ({dtype})',
                            np.max(np.abs(got - want)) / scale)
  np.testing.assert_allclose(got, want, err_msg=name, **(tol or _tol(dtype)))


# ---------------------------------------------------------------------------
# 1. and 2. Forward and backward against the references.
#
# name -> (JAX y = f(x, params), NumPy y = f(x_rows, params), params factory)
# `x_rows` is [B*T, C] float64; params are NumPy float64 there.

TAU = np.array([0.7, -1.3])
COND_SHIFT = _rng(40).normal(size=(B, C)) * 0.5
COND_SCALE = _rng(41).normal(size=(B, C)) * 0.5


def _np(params):
  return jax.tree.map(lambda v: np.asarray(v, np.float64), params)


CASES = {
    'dyt_no_bias_scalar_alpha': (
        lambda x, p: nf.dyt(x, p)[0],
        lambda x, p: ref.dyt(x, p['alpha'], p['scale']),
        lambda dt: {'alpha': jnp.asarray(1.3, dt),
                    'scale': _affine(dt)['scale']}),
    'groupnorm': (
        lambda x, p: nf.group_norm(x, p, num_groups=4)[0],
        lambda x, p: ref.group_norm(x, 4, p['scale'], p['bias']),
        _affine),
    'layernorm_scaling_rms': (
        lambda x, p: nf.layer_norm_scaling(x, p, layer_index=5,
                                           base='rmsnorm')[0],
        lambda x, p: ref.layer_norm_scaling(x, 5, 'rmsnorm', p['scale']),
        lambda dt: {'scale': _affine(dt)['scale']}),
    'adaln_zero': (
        lambda x, p: nf.ada_ln_zero(x, shift=p['shift'], scale=p['scale'])[0],
        lambda x, p: ref.ada_ln_zero(x, _per_row(p['shift']),
                                     _per_row(p['scale'])),
        lambda dt: {'shift': jnp.asarray(COND_SHIFT, dt),
                    'scale': jnp.asarray(COND_SCALE, dt)}),
    'td_layernorm': (
        lambda x, p: nf.td_layer_norm(x, p['td'], tau=p['tau'])[0],
        lambda x, p: ref.td_layer_norm(x, p['td'], _per_row(p['tau'])),
        lambda dt: {'td': _td(dt), 'tau': jnp.asarray(TAU, dt)}),
    'td_rmsnorm': (
        lambda x, p: nf.td_rms_norm(x, p['td'], tau=p['tau'])[0],
        lambda x, p: ref.td_rms_norm(x, p['td'], _per_row(p['tau'])),
        lambda dt: {'td': _td(dt), 'tau': jnp.asarray(TAU, dt)}),
    'qk_norm_q_rms_per_head': (  # the q output of qk_norm, [B, T, 2, 4]
        lambda x, p: nf.qk_norm(x.reshape(B, T, 2, 4), x[..., None, :4], p,
                                None)[0].reshape(SHAPE),
        lambda x, p: ref.qk_norm(x.reshape(-1, 2, 4), 'rmsnorm',
                                 p['scale']).reshape(-1, C),
        lambda dt: {'scale': _vec(7, 4, 1.0, 0.3, dt)}),
    'qk_norm_q_ln_full_width': (
        lambda x, p: nf.qk_norm(x.reshape(B, T, 2, 4), x.reshape(B, T, 2, 4),
                                p, p, kind='layernorm',
                                per_head=False)[0].reshape(SHAPE),
        lambda x, p: ref.qk_norm(x.reshape(-1, 2, 4), 'layernorm', p['scale'],
                                 p['bias'], per_head=False).reshape(-1, C),
        lambda dt: {'scale': _vec(7, C, 1.0, 0.3, dt).reshape(2, 4),
                    'bias': _vec(8, C, 0.0, 0.3, dt).reshape(2, 4)}),
}


@functools.partial(jax.jit, static_argnums=0)
def _forward_and_vjp(fn, x, p, dy):
  y, vjp = jax.vjp(lambda x: fn(x, p), x)
  return y, vjp(dy)[0]


@pytest.mark.parametrize('name', sorted(CASES))
def test_forward_and_gradient_match_reference(name, float_dtype):
  """y against the NumPy forward, and d/dx sum(y * dy) by autodiff against
  central differences of the float64 NumPy forward."""
  fn, ref_fn, make = CASES[name]
  x, p = _x(float_dtype, seed=1), make(float_dtype)
  dy = jnp.asarray(_rng(2).normal(size=SHAPE), float_dtype)

  y, dx = _forward_and_vjp(fn, x, p, dy)
  assert y.dtype == dx.dtype == x.dtype
  pn = _np(p)
  _check(f'{name}: y', float_dtype, _rows(y), ref_fn(_rows(x), pn))
  want = ref.numeric_vjp(lambda v: ref_fn(v, pn), _rows(x), _rows(dy))
  tol = (dict(atol=2e-5, rtol=2e-5) if float_dtype == 'float32' else
         dict(atol=1e-7, rtol=1e-7))  # finite differences: ~1e-9
  _check(f'{name}: dx (vs finite differences)', float_dtype, _rows(dx), want,
         tol)


def test_dyt_forward_and_gradients_match_analytic(float_dtype):
  x, dy = _x(float_dtype, seed=1), jnp.asarray(_rng(2).normal(size=SHAPE),
                                               float_dtype)
  p = dict(_affine(float_dtype), alpha=jnp.asarray([0.7], float_dtype))

  def loss(x, p):
    y = nf.dyt(x, p)[0]
    return jnp.sum(y * dy), y

  (_, y), (g_x, g_p) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1),
                                                  has_aux=True))(x, p)
  _check('dyt: y', float_dtype, _rows(y),
         ref.dyt(_rows(x), 0.7, p['scale'], p['bias']))
  dx, dalpha, dscale, dbias = ref.dyt_vjp(_rows(x), _rows(dy), 0.7,
                                          np.asarray(p['scale']))
  for what, got, want in [('dx', _rows(g_x), dx),
                          ('dalpha', g_p['alpha'], [dalpha]),
                          ('dscale', g_p['scale'], dscale),
                          ('dbias', g_p['bias'], dbias)]:
    _check(f'dyt: {what} (analytic)', float_dtype, got, want,
           dict(atol=1e-5, rtol=1e-5) if float_dtype == 'float32' else None)


def test_check_grads_conditional():
  with jax.enable_x64(True):
    x = _x('float64', seed=4)
    shift = jnp.asarray(COND_SHIFT)
    scale = jnp.asarray(COND_SCALE)
    check_grads(jax.jit(lambda x, s, a: nf.ada_ln_zero(x, shift=s,
                                                        scale=a)[0]),
                (x, shift, scale), order=1, modes=['rev'], atol=1e-6,
                rtol=1e-6)
    tau = jnp.asarray(TAU)
    # Spec 8 (g) 4: gradients w.r.t. (p0, p1, w, b) (and x, tau).
    for fn in (nf.td_layer_norm, nf.td_rms_norm):
      check_grads(jax.jit(lambda x, p, t, fn=fn: fn(x, p, tau=t)[0]),
                  (x, _td('float64'), tau), order=1, modes=['rev'],
                  atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------
# 3. bfloat16, masks, jit and vmap of the conditional norms.

def test_conditional_norms_are_stateless_and_apart_from_the_slot_norms():
  assert set(nf.CONDITIONAL_FUNCTIONS) == {'adaln_zero', 'td_layernorm',
                                           'td_rmsnorm'}
  assert not set(nf.CONDITIONAL_FUNCTIONS) & set(nf.FUNCTIONS)
  for kind in nf.CONDITIONAL_FUNCTIONS:
    assert nf.init_state(kind, C) == nf.EmptyState()


def test_bfloat16_conditional_and_qk():
  x16 = _x().astype(jnp.bfloat16)
  x32 = x16.astype(jnp.float32)
  shift, scale = jnp.asarray(COND_SHIFT), jnp.asarray(COND_SCALE)
  for f in (lambda x: nf.ada_ln_zero(x, shift=shift, scale=scale)[0],
            lambda x: nf.td_layer_norm(x, _td(), tau=jnp.asarray(TAU))[0],
            lambda x: nf.td_rms_norm(x, _td(), tau=jnp.asarray(TAU))[0],
            lambda x: nf.qk_norm(x.reshape(B, T, 2, 4),
                                 x.reshape(B, T, 2, 4))[1]):
    y16 = f(x16)
    assert y16.dtype == jnp.bfloat16
    chex.assert_trees_all_equal(y16, f(x32).astype(jnp.bfloat16))


def test_conditional_pads_do_not_change_real_outputs():
  x = _x()
  xp = jnp.where(MASK[..., None], x, -7e2)
  m = jnp.asarray(MASK)
  shift, scale = jnp.asarray(COND_SHIFT), jnp.asarray(COND_SCALE)
  for f in (lambda x: nf.ada_ln_zero(x, shift=shift, scale=scale, mask=m)[0],
            lambda x: nf.td_layer_norm(x, _td(), tau=jnp.asarray(TAU),
                                       mask=m)[0],
            lambda x: nf.td_rms_norm(x, _td(), tau=jnp.asarray(TAU),
                                     mask=m)[0]):
    chex.assert_trees_all_equal(jnp.where(MASK[..., None], f(x) - f(xp), 0),
                                0.0)


def test_jit_and_vmap_conditional():
  x = _x()
  td, tau = _td(), jnp.asarray(TAU)
  shift, scale = jnp.asarray(COND_SHIFT), jnp.asarray(COND_SCALE)
  for f in (lambda x, s, a, t: nf.ada_ln_zero(x, shift=s, scale=a)[0],
            lambda x, s, a, t: nf.td_rms_norm(x, td, tau=t)[0]):
    eager = f(x, shift, scale, tau)
    chex.assert_trees_all_close(jax.jit(f)(x, shift, scale, tau), eager,
                                atol=1e-6, rtol=1e-6)
    # vmap over the batch: per-example conditioning becomes per-call.
    mapped = jax.vmap(lambda x, s, a, t: f(x[None], s[None], a[None],
                                           t[None])[0])(x, shift, scale, tau)
    chex.assert_trees_all_close(mapped, eager, atol=1e-6, rtol=1e-6)


def test_batch_independence_and_causality():
  """Spec cross-cutting 4 and 5: TD-LN and adaLN see no other example, and
  no later token (the slot norms: contract_test)."""
  x = _x()
  x_other = x.at[1].set(x[1] * 5 + 3)
  x_future = x.at[:, 2].set(x[:, 2] * -4 + 1)  # change token t = 2
  td, tau = _td(), jnp.asarray(TAU)
  shift, scale = jnp.asarray(COND_SHIFT), jnp.asarray(COND_SCALE)
  for f in (lambda x: nf.td_layer_norm(x, td, tau=tau)[0],
            lambda x: nf.ada_ln_zero(x, shift=shift, scale=scale)[0]):
    y = f(x)
    chex.assert_trees_all_equal(y[0], f(x_other)[0])
    chex.assert_trees_all_equal(y[:, :2], f(x_future)[:, :2])


# ---------------------------------------------------------------------------
# 4. Modules.


def _init(module, *args):
  return nn.unbox(jax.jit(module.init)(jax.random.key(0), *args))


def _randomize(params, seed=20):
  leaves, tree = jax.tree.flatten(params)
  return jax.tree.unflatten(tree, [
      jnp.asarray(_rng(seed + i).normal(size=v.shape) * 0.3 + (
          1.0 if v.ndim and i % 2 == 0 else 0.0), v.dtype)
      for i, v in enumerate(leaves)])


def test_dyt_module_alpha_init_by_site_and_param_count():
  x = _x(shape=(2, 3, 16))
  for alpha_init, want in [('attention', 0.8), ('ffn', 0.2), ('final', 0.2),
                           ('default', 0.5), (0.25, 0.25)]:
    params = _init(nl.DyT(alpha_init=alpha_init), x)['params']
    np.testing.assert_allclose(params['alpha'], [want])
  # Spec 5 (g) 5: 2d + 1 parameters, d + 1 for the LLaMA variant.
  count = lambda m: sum(v.size for v in jax.tree.leaves(_init(m, x)))
  assert count(nl.DyT()) == 2 * 16 + 1
  assert count(nl.DyT(use_bias=False)) == 16 + 1


def test_make_norm_conditional_kinds_and_misspelled_options():
  """(The slot kinds: bad_input_test.test_unknown_option_is_named.)"""
  for kind in nf.CONDITIONAL_FUNCTIONS:
    assert nl.make_norm(kind)().__class__.__name__
  for kind, typo in [('adaln_zero', 'use_gates'), ('td_layernorm', 'tau'),
                     ('td_rmsnorm', 'epsilon_')]:
    with pytest.raises(ValueError, match=rf"make_norm\('{kind}'\): unknown "
                       rf"options \['{typo}'\]"):
      nl.make_norm(kind, **{typo: 1})
  with pytest.raises(ValueError, match=r"unknown norm kind 'adaln'.*"
                     r"conditional.*adaln_zero"):
    nl.make_norm('adaln')
  with pytest.raises(ValueError, match=r'unknown norm kind.*td_layernorm'):
    nf.get_norm('td_ln')


def test_layer_norm_scaling_module_needs_layer_index():
  module = nl.make_norm('layernorm_scaling')()
  with pytest.raises(ValueError, match=r'`layer_index`'):
    module.init(jax.random.key(0), _x())


# ---------------------------------------------------------------------------
# 5. Invariants of the zoo spec.

# DyT (spec 5 g).


def test_dyt_alpha_init_table():
  assert nf.dyt_alpha_init() == 0.5
  assert nf.dyt_alpha_init('default', 512) == 0.5
  table = {4096: (0.8, 0.2, 0.2), 5120: (0.6, 0.15, 0.15),
           8192: (0.2, 0.05, 0.05)}
  for width, want in table.items():
    got = tuple(nf.dyt_alpha_init(site, width, strict=True)
                for site in ('attention', 'ffn', 'final'))
    assert got == want
  # Other widths: the row of the smallest listed width >= width.
  assert nf.dyt_alpha_init('attention', 512) == 0.8
  assert nf.dyt_alpha_init('attention', 4097) == 0.6
  assert nf.dyt_alpha_init('ffn', 16384) == 0.05
  with pytest.raises(ValueError, match=r'`width`=512 is not in the LLaMA'):
    nf.dyt_alpha_init('attention', 512, strict=True)
  with pytest.raises(ValueError, match=r"needs `width`"):
    nf.dyt_alpha_init('ffn')
  with pytest.raises(ValueError, match=r"`site` must be one of"):
    nf.dyt_alpha_init('mlp', 4096)


def test_dyt_invariants():
  with jax.enable_x64(True):
    x = _x('float64', shape=(2, 3, 4))
    p = dict(_affine('float64', n=4), alpha=jnp.asarray([0.9]))
    f = lambda x: np.asarray(nf.dyt(x, p)[0])
    beta, gamma = np.asarray(p['bias']), np.asarray(p['scale'])
    x = np.asarray(x)
    # 1. Diagonal Jacobian: no cross-token, cross-channel or batch mixing.
    jac = np.asarray(jax.jit(jax.jacobian(lambda x: nf.dyt(x, p)[0]))(
        jnp.asarray(x))).reshape(x.size, x.size)
    np.testing.assert_array_equal(jac - np.diag(np.diag(jac)), 0.0)
    assert np.all(np.diag(jac) != 0)
    # 2. |y - beta| <= |gamma|, with saturation at +-gamma for large |x|.
    big = 1e3 * x
    assert np.all(np.abs(f(big) - beta) <= np.abs(gamma) + 1e-15)
    np.testing.assert_allclose(f(big), np.sign(big) * gamma + beta,
                               atol=1e-12)
    # 3. Odd symmetry: y(-x) - beta = -(y(x) - beta).
    np.testing.assert_allclose(f(-x) - beta, -(f(x) - beta), atol=1e-15)
    # 4. Small alpha: y ~ gamma alpha x + beta, relative error O(alpha^2 x^2).
    for a in (1e-2, 1e-3):
      small = dict(p, alpha=jnp.asarray([a]))
      lin = gamma * a * x
      rel = np.max(np.abs((np.asarray(nf.dyt(x, small)[0]) - beta - lin)
                          / lin))
      assert rel <= (a * np.max(np.abs(x))) ** 2 / 3 * 1.01
      assert rel > 0
    # A fixed alpha when params hold none: tanh(alpha x).
    np.testing.assert_allclose(nf.dyt(x, alpha=2.0)[0], np.tanh(2 * x),
                               atol=1e-15)


# CRMSNorm (spec 4 g 4).


def test_crms_norm_equals_rms_norm_and_layer_norm_of_the_full_vector(
    float_dtype):
  x = _x(float_dtype, seed=3, shape=(B, T, 9))
  eps = 1e-6
  ln, _ = nf.layer_norm(x, None, eps=eps)
  zero_mean = x - jnp.mean(x, axis=-1, keepdims=True)
  rms, _ = nf.rms_norm(zero_mean, None, eps=eps)
  crms, _ = nf.crms_norm(zero_mean[..., :-1], None, eps=eps)
  tol = dict(atol=2e-6, rtol=2e-6) if float_dtype == 'float32' else dict(
      atol=1e-13, rtol=1e-13)
  _check('crmsnorm: == rms_norm(zero-mean x)[:d-1]', float_dtype, crms,
         rms[..., :-1], tol)
  _check('crmsnorm: == layer_norm(x)[:d-1]', float_dtype, crms, ln[..., :-1],
         tol)
  # The dropped coordinate is minus the sum of the kept ones.
  _check('crmsnorm: recovered last coordinate', float_dtype,
         -jnp.sum(crms, -1), ln[..., -1], tol)


# GroupNorm.


def test_group_norm_matches_flax_per_token():
  float_dtype = 'float32'
  x = _x(float_dtype)
  p = _affine(float_dtype)
  y, _ = nf.group_norm(x, p, num_groups=4)
  variables = {'params': p}
  ours = nn.GroupNorm(num_groups=4, reduction_axes=-1,
                      use_fast_variance=False, param_dtype=float_dtype)
  _check('groupnorm: vs flax GroupNorm(reduction_axes=-1)', float_dtype, y,
         jax.jit(ours.apply)(variables, x))
  # flax's default reduces over all non-batch axes: the same per token when
  # each token is its own example.
  flat = jax.jit(nn.GroupNorm(num_groups=4, use_fast_variance=False,
                              param_dtype=float_dtype).apply)(
                                  variables, x.reshape(-1, C))
  _check('groupnorm: vs flax GroupNorm on [B*T, C]', float_dtype,
         y.reshape(-1, C), flat)
  # ... and not per token on [B, T, C].
  seq = jax.jit(nn.GroupNorm(num_groups=4,
                             param_dtype=float_dtype).apply)(variables, x)
  assert not np.allclose(seq, y, atol=1e-3)


def test_group_norm_limits():
  with jax.enable_x64(True):
    x = _x('float64')
    p = _affine('float64')
    # G = 1 is LayerNorm with the same eps.
    chex.assert_trees_all_close(nf.group_norm(x, p, num_groups=1)[0],
                                nf.layer_norm(x, p)[0], atol=1e-14)
    # G = C: every feature is its own group, so the output is the bias.
    chex.assert_trees_all_close(nf.group_norm(x, p, num_groups=C)[0],
                                jnp.broadcast_to(p['bias'], SHAPE),
                                atol=1e-15)
    # Shift/scale invariance per group.
    chex.assert_trees_all_close(
        nf.group_norm(3 * x + 7, None, num_groups=2, eps=0.0)[0],
        nf.group_norm(x, None, num_groups=2, eps=0.0)[0], atol=1e-12)


def test_group_norm_and_evonorm_keep_precision_with_a_large_mean():
  x = jnp.asarray(1e4 + 0.01 * _rng(2).normal(size=(16, 64)), jnp.float32)
  y, _ = nf.group_norm(x, None, num_groups=4)
  want = ref.group_norm(np.asarray(x), 4)
  np.testing.assert_allclose(y, want, atol=2e-2)  # f32 sum of 16 ~1e4
  s0, _ = nf.evonorm_s0(x, None, num_groups=4)
  np.testing.assert_allclose(s0, ref.evonorm_s0(np.asarray(x), 4),
                             rtol=2e-3)


# EvoNorm-S0 (spec 6 g).


def test_evonorm_s0_limits():
  with jax.enable_x64(True):
    x = _x('float64')
    p = _affine('float64')
    xn, gamma, beta = np.asarray(x), np.asarray(p['scale']), np.asarray(
        p['bias'])
    sigma = np.sqrt(xn.reshape(B, T, 2, 4).var(-1) + 1e-5)
    sigma = np.repeat(sigma, 4, axis=-1)
    # 2. v = 0: x / (2 sigma) * gamma + beta, scale-invariant as eps -> 0.
    v0 = dict(p, v=jnp.zeros(C))
    y0, _ = nf.evonorm_s0(x, v0, num_groups=2)
    np.testing.assert_allclose(y0, 0.5 * xn / sigma * gamma + beta,
                               atol=1e-14)
    chex.assert_trees_all_close(nf.evonorm_s0(4.0 * x, v0, num_groups=2,
                                              eps=0.0)[0],
                                nf.evonorm_s0(x, v0, num_groups=2, eps=0.0)[0],
                                atol=1e-13)
    # v -> +inf: relu(x) / sigma * gamma + beta.
    vbig = dict(p, v=jnp.full(C, 1e6))
    np.testing.assert_allclose(
        nf.evonorm_s0(x, vbig, num_groups=2)[0],
        np.maximum(xn, 0) / sigma * gamma + beta, atol=1e-12)
    # 4. nonlinearity=False is the exact affine map gamma x + beta.
    y_aff, _ = nf.evonorm_s0(x, p, nonlinearity=False)
    np.testing.assert_array_equal(y_aff, xn * gamma + beta)
    # The official group rule: 3 -> 2 groups for 8 features, 32 -> 8.
    assert nf.evonorm_num_groups(8, 3) == 2
    assert nf.evonorm_num_groups(8, 32) == 8
    assert nf.evonorm_num_groups(512, 32) == 32
    chex.assert_trees_all_equal(nf.evonorm_s0(x, p, num_groups=3)[0],
                                nf.evonorm_s0(x, p, num_groups=2)[0])


# LayerNorm Scaling (spec 3 g 5).


def test_layer_norm_scaling_is_the_surgery_forward_not_its_gradient():
  with jax.enable_x64(True):
    x = _x('float64')
    p = _affine('float64')
    dy = jnp.asarray(_rng(5).normal(size=SHAPE))
    @jax.jit  # the index traced, as under nn.scan over layers
    def lns_and_surgery(l):
      s = jax.lax.rsqrt(l.astype(jnp.float64))
      surgery = jax.tree.map(lambda v: v * s, p)
      y, g_lns = jax.value_and_grad(lambda p: jnp.sum(
          nf.layer_norm_scaling(x, p, layer_index=l)[0] * dy))(p)
      y_s, g_surg = jax.value_and_grad(lambda q: jnp.sum(
          nf.layer_norm(x, q)[0] * dy))(surgery)
      return (nf.layer_norm_scaling(x, p, layer_index=l)[0],
              nf.layer_norm(x, surgery)[0], g_lns, g_surg, s)

    for l in (1, 2, 7):
      y, y_surgery, g_lns, g_surg, s = lns_and_surgery(jnp.asarray(l))
      chex.assert_trees_all_close(y, y_surgery, atol=1e-15)
      # d/dgamma of LN(x; gamma)/sqrt(l) = (1/sqrt(l)) dLN/dgamma'.
      chex.assert_trees_all_close(g_lns, jax.tree.map(lambda g: g * s,
                                                      g_surg), atol=1e-13)
      # The Python-int index gives the same result.
      chex.assert_trees_all_close(
          nf.layer_norm_scaling(x, p, layer_index=l)[0], y, atol=1e-15)
    chex.assert_trees_all_equal(
        nf.layer_norm_scaling(x, p, layer_index=1)[0], nf.layer_norm(x, p)[0])
  assert nf.layer_norm_scaling_factor(4) == 0.5
  assert nf.layer_norm_scaling_factor(np.int64(1)) == 1.0


# adaLN-Zero (spec 8).


def test_adaln_zero_is_identity_at_init():
  x = _x()
  cond = jnp.asarray(_rng(3).normal(size=(B, 6)), jnp.float32)
  module = nl.AdaLNZero()
  variables = _init(module, x, cond)
  assert {k: v.shape for k, v in variables['params'].items()} == {
      'modulation_kernel': (6, 3, C), 'modulation_bias': (3, C)}
  chex.assert_trees_all_equal(jax.tree.leaves(variables),
                              [jnp.zeros((3, C)), jnp.zeros((6, 3, C))])
  y, gate = module.apply(variables, x, cond)
  chex.assert_trees_all_close(y, nf.layer_norm(x, None)[0], atol=1e-6)
  chex.assert_trees_all_equal(gate, jnp.zeros((B, C)))
  # The block x + gate * F(y) is the identity, whatever F.
  branch = jnp.tanh(3 * y) + 1.0
  chex.assert_trees_all_equal(nf.gated_residual(x, branch, gate), x)
  # modulate(x, 0, 0) = x.
  zeros = jnp.zeros((B, C))
  chex.assert_trees_all_equal(nf.modulate(x, zeros, zeros), x)


@pytest.mark.parametrize('per_token', [False, True])
def test_adaln_zero_module_matches_reference(per_token):
  x = _x()
  cond_shape = (B, T, 5) if per_token else (B, 5)
  cond = jnp.asarray(_rng(3).normal(size=cond_shape), jnp.float32)
  module = nl.AdaLNZero()
  params = _randomize(_init(module, x, cond)['params'])
  y, gate = jax.jit(module.apply)({'params': params}, x, cond)
  mod = ref.adaln_modulation(_per_row(cond), params['modulation_kernel'],
                             params['modulation_bias'])
  want = ref.ada_ln_zero(_rows(x), mod[:, 0], mod[:, 1])
  _check('adaln_zero module: y', 'float32', _rows(y), want,
         dict(atol=1e-5, rtol=1e-5))
  _check('adaln_zero module: gate', 'float32', _per_row(gate) if not per_token
         else _rows(gate), mod[:, 2], dict(atol=1e-5, rtol=1e-5))
  # No gate (DiT's final layer): 2 modulation vectors.
  final = nl.AdaLNZero(use_gate=False)
  v = _init(final, x, cond)
  assert v['params']['modulation_bias'].shape == (2, C)
  assert final.apply(v, x, cond)[1] is None


def test_conditional_modules_reject_the_slot_call():
  x = _x()
  for module in (nl.AdaLNZero(), nl.TDLayerNorm(), nl.TDRMSNorm()):
    for call in (lambda m: m.init(jax.random.key(0), x),
                 lambda m: m.init(jax.random.key(0), x, True, mask=MASK)):
      with pytest.raises(TypeError, match=r'needs the conditioning `cond`.*'
                         r'norm\(x, cond\)'):
        call(module)


# TD-LN (spec 8 g).


def test_td_norms_at_init_equal_plain_norms_for_every_tau():
  with jax.enable_x64(True):
    x = _x('float64')
    p = nf.init_td_params(C, dtype=jnp.float64)
    for tau in (jnp.asarray(-30.0), jnp.asarray([0.3, 2.0]),
                jnp.asarray(np.linspace(-5, 5, B * T).reshape(B, T))):
      chex.assert_trees_all_close(nf.td_layer_norm(x, p, tau=tau)[0],
                                  nf.layer_norm(x, None, eps=1e-5)[0],
                                  atol=1e-14)
      want = _rows(x) / (np.sqrt((_rows(x) ** 2).mean(-1, keepdims=True))
                         + 1e-8)
      chex.assert_trees_all_close(
          _rows(nf.td_rms_norm(x, {'scale': p['scale']}, tau=tau)[0]), want,
          atol=1e-14)
  # The modules at init, likewise.
  x = _x()
  for module, plain in ((nl.TDLayerNorm(), nf.layer_norm(x, None, eps=1e-5)),
                        (nl.TDRMSNorm(), None)):
    v = _init(module, x, jnp.asarray(TAU, jnp.float32))
    y1 = module.apply(v, x, jnp.asarray(TAU, jnp.float32))
    y2 = module.apply(v, x, jnp.asarray([9.0, -9.0], jnp.float32))
    chex.assert_trees_all_close(y1, y2, atol=1e-6)
    if plain is not None:
      chex.assert_trees_all_close(y1, plain[0], atol=1e-6)


def test_td_parameter_interpolates_between_endpoints():
  with jax.enable_x64(True):
    p = _td('float64')['scale']
    p = dict(p, nodecay_weight=jnp.abs(p['nodecay_weight']))  # w > 1 > 0
    tau = jnp.linspace(-20, 20, 41)
    pt = nf.td_parameter(p, tau)
    lo = np.minimum(p['param0'], p['param1'])
    hi = np.maximum(p['param0'], p['param1'])
    pt = np.asarray(pt)
    assert np.all((pt >= lo - 1e-15) & (pt <= hi + 1e-15))  # convex comb.
    big = nf.td_parameter(p, jnp.asarray([1e3, -1e3]))
    chex.assert_trees_all_close(big[0], p['param0'], atol=1e-12)  # tau->+inf
    chex.assert_trees_all_close(big[1], p['param1'], atol=1e-12)  # tau->-inf
    np.testing.assert_allclose(pt, ref.td_parameter(_np(p), np.asarray(tau)),
                               atol=1e-15)


def test_td_layer_norm_is_adaln_with_time_dependent_modulation():
  """The relation to adaLN: TD-LN(x, tau) = LN(x) (1 + a) + s with
  s = bias(tau), 1 + a = scale(tau): adaLN whose modulation is a per-feature
  sigmoid interpolation (4C params per vector) instead of a linear map of the
  conditioning (DiT: 6 d^2 + 6d per block); both are plain LN at init."""
  with jax.enable_x64(True):
    x = _x('float64')
    td, tau = _td('float64'), jnp.asarray(TAU)
    shift = nf.td_parameter(td['bias'], tau)
    scale = nf.td_parameter(td['scale'], tau) - 1
    chex.assert_trees_all_close(
        nf.td_layer_norm(x, td, tau=tau, eps=1e-6)[0],
        nf.ada_ln_zero(x, shift=shift, scale=scale, eps=1e-6)[0], atol=1e-14)
  # Parameter counts per norm site.
  x = _x()
  tdln = _init(nl.TDLayerNorm(), x, jnp.asarray(TAU, jnp.float32))
  adaln = _init(nl.AdaLNZero(), x, jnp.ones((B, C), jnp.float32))
  count = lambda v: sum(a.size for a in jax.tree.leaves(v))
  assert count(tdln) == 2 * 4 * C
  assert count(adaln) == 3 * C * C + 3 * C


def test_td_rms_norm_zero_token_has_finite_gradient():
  x = _x().at[0, 2].set(0.0)  # a zero-padded token
  td = _td()
  g = jax.jit(jax.grad(lambda x: jnp.sum(nf.td_rms_norm(x, td,
                                                      tau=TAU)[0])))(x)
  chex.assert_tree_all_finite(g)


def test_td_module_equals_function():
  x = _x()
  tau = jnp.asarray(TAU, jnp.float32)
  for module, fn in ((nl.TDLayerNorm(epsilon=1e-4), functools.partial(
      nf.td_layer_norm, eps=1e-4)), (nl.TDRMSNorm(use_bias=True),
                                     nf.td_rms_norm)):
    params = _randomize(_init(module, x, tau)['params'])
    assert set(params) == {'scale', 'bias'}
    assert set(params['scale']) == {'param0', 'param1', 'nodecay_weight',
                                    'nodecay_bias'}
    y_m, g_m = jax.jit(jax.value_and_grad(lambda p: jnp.sum(module.apply(
        {'params': p}, x, tau) * x)))(params)
    y_f, g_f = jax.jit(jax.value_and_grad(lambda p: jnp.sum(
        fn(x, p, tau=tau)[0] * x)))(params)
    chex.assert_trees_all_close(y_m, y_f, atol=1e-5, rtol=1e-6)
    chex.assert_trees_all_close(g_m, g_f, atol=1e-5, rtol=1e-5)


# QK-norm (spec 11 g).


def _logits(q, k):
  return jnp.einsum('...qhd,...khd->...hqk', q, k) / np.sqrt(q.shape[-1])


def test_qk_norm_invariances_and_logit_bound():
  with jax.enable_x64(True):
    q = _x('float64', seed=1, shape=(B, T, 2, 16))
    k = _x('float64', seed=2, shape=(B, T, 2, 16))
    for kind in ('rmsnorm', 'layernorm'):
      base = _logits(*nf.qk_norm(q, k, kind=kind, eps=0.0))
      # 1. W_q -> c W_q, W_k -> c W_k (c > 0) leaves the logits unchanged.
      chex.assert_trees_all_close(
          _logits(*nf.qk_norm(3.0 * q, 0.2 * k, kind=kind, eps=0.0)), base,
          atol=1e-12)
    # ... and per-token shifts of q with the LN variant.
    shift = jnp.asarray(_rng(3).normal(size=(B, T, 2, 1)))
    chex.assert_trees_all_close(
        _logits(*nf.qk_norm(q + shift, k, kind='layernorm', eps=0.0)),
        _logits(*nf.qk_norm(q, k, kind='layernorm', eps=0.0)), atol=1e-12)
    # 2. RMS QK-norm, unit scales: ||N(q)|| = sqrt(d_h), |logit| <= sqrt(d_h).
    qn, kn = nf.qk_norm(q, k, eps=0.0)
    chex.assert_trees_all_close(jnp.linalg.norm(qn, axis=-1), 4.0, atol=1e-12)
    assert np.max(np.abs(_logits(qn, kn))) <= 4.0 + 1e-12
    # Full width (OLMo 2) equals RMSNorm of the flattened projection.
    qf, _ = nf.qk_norm(q, k, per_head=False)
    chex.assert_trees_all_close(
        qf.reshape(B, T, 32), nf.rms_norm(q.reshape(B, T, 32), None)[0],
        atol=1e-14)


def test_qk_norm_module():
  q = _x(seed=1, shape=(B, T, 4, 8))
  k = _x(seed=2, shape=(B, T, 2, 8))  # grouped-query attention
  shared = nl.QKNorm(kind='layernorm')
  v = nn.unbox(shared.init(jax.random.key(0), q, k))
  assert {n: a.shape for n, a in v['params'].items()} == {
      'query_scale': (8,), 'key_scale': (8,)}
  specs = nn.get_partition_spec(shared.init(jax.random.key(0), q, k))
  assert specs['params']['query_scale'] == jax.sharding.PartitionSpec('kv')
  per_head = nl.QKNorm(scale_shared_across_heads=False, use_bias=True,
                       per_head=False)
  boxed = per_head.init(jax.random.key(0), q, k)
  params = _randomize(nn.unbox(boxed)['params'])
  assert {n: a.shape for n, a in params.items()} == {
      'query_scale': (4, 8), 'query_bias': (4, 8), 'key_scale': (2, 8),
      'key_bias': (2, 8)}
  assert nn.get_partition_spec(boxed)['params']['key_scale'] == (
      jax.sharding.PartitionSpec('heads', 'kv'))
  got = jax.jit(per_head.apply)({'params': params}, q, k)
  want = nf.qk_norm(q, k, {'scale': params['query_scale'],
                           'bias': params['query_bias']},
                    {'scale': params['key_scale'], 'bias': params['key_bias']},
                    per_head=False)
  chex.assert_trees_all_close(got, want, atol=1e-6)
  np.testing.assert_allclose(
      np.asarray(got[1]).reshape(-1, 2, 8),
      ref.qk_norm(np.asarray(k).reshape(-1, 2, 8), 'rmsnorm',
                  params['key_scale'], params['key_bias'], per_head=False),
      atol=1e-5)


# ---------------------------------------------------------------------------
# 6. Bad inputs of the conditional norms (eagerly and under jit).

jit_modes = pytest.mark.parametrize('jit', [False, True], ids=['eager', 'jit'])


def _maybe_jit(f, jit):
  return jax.jit(f) if jit else f


COND_KINDS = ['adaln_zero', 'td_layernorm', 'td_rmsnorm']  # slot: bad_input_test


def _call_any(kind, x, params='default', mask=None, **kw):
  if kind in nc.KINDS:
    return nc.call(kind, x, nc.params(kind) if params == 'default' else params,
                   mask=mask, **kw)
  if kind == 'adaln_zero':
    kw.setdefault('shift', jnp.asarray(COND_SHIFT, jnp.float32))
    kw.setdefault('scale', jnp.asarray(COND_SCALE, jnp.float32))
    return nf.ada_ln_zero(x, None if params == 'default' else params,
                          mask=mask, **kw)
  kw.setdefault('tau', jnp.asarray(TAU, jnp.float32))
  return nf.get_norm(kind)(x, _td() if params == 'default' else params,
                           mask=mask, **kw)


@jit_modes
@pytest.mark.parametrize('kind', COND_KINDS)
def test_non_float_x(kind, jit):
  with pytest.raises(TypeError, match=r'`x` must be a floating-point.*int32'):
    _maybe_jit(lambda x: _call_any(kind, x), jit)(jnp.ones(SHAPE, jnp.int32))


@jit_modes
@pytest.mark.parametrize('kind', COND_KINDS)
def test_bad_mask_shape_and_dtype(kind, jit):
  with pytest.raises(ValueError, match=r'`mask` has shape \(2, 4\).*does not '
                     'broadcast'):
    _maybe_jit(lambda x, m: _call_any(kind, x, mask=m), jit)(
        _x(), jnp.ones((B, T + 1), bool))
  with pytest.raises(TypeError, match=r'`mask` must be boolean'):
    _maybe_jit(lambda x, m: _call_any(kind, x, mask=m), jit)(
        _x(), jnp.ones((B, T), jnp.float32))


@jit_modes
def test_zoo_specific_params(jit):
  run = lambda kind, p: _maybe_jit(lambda x, p: _call_any(kind, x, p), jit)(
      _x(), p)
  with pytest.raises(ValueError, match=r"`params\['alpha'\]` has shape \(8,\);"
                     r' expected shape \(1,\) or \(\)'):
    run('dyt', {'alpha': jnp.ones(C)})
  with pytest.raises(ValueError, match=r"`params\['v'\]` has shape \(4,\) but "
                     '`x` has 8 features'):
    run('evonorm_s0', {'v': jnp.ones(4)})
  with pytest.raises(ValueError, match=r"`params` has unknown keys \['gamma'\]"
                     r"; expected only 'alpha', 'scale' and 'bias'"):
    run('dyt', {'gamma': jnp.ones(C)})
  with pytest.raises(ValueError, match=r"`params\['scale'\]\['param0'\]` has "
                     r'shape \(9,\) but `x` has 8 features'):
    run('td_layernorm', {'scale': dict(_td()['scale'],
                                       param0=jnp.ones(C + 1))})
  with pytest.raises(ValueError, match=r"`params\['bias'\]` lacks "
                     r"\['nodecay_bias'\]"):
    bias = dict(_td()['bias'])
    del bias['nodecay_bias']
    run('td_rmsnorm', {'bias': bias})
  with pytest.raises(ValueError, match=r"`params` has unknown keys "
                     r"\['scale0'\]"):
    run('td_layernorm', {'scale0': _td()['scale']})
  with pytest.raises(ValueError, match=r'`params` must be None: the LayerNorm '
                     'of adaLN has no affine'):
    run('adaln_zero', _affine())


@jit_modes
@pytest.mark.parametrize('num_groups', [3, 0, 16])
def test_groups_not_dividing_features(num_groups, jit):
  with pytest.raises(ValueError, match=rf'`num_groups`={num_groups} must '
                     r'divide the number of features 8.*\[1, 2, 4, 8\]'
                     if num_groups else r'`num_groups` must be a positive'):
    _maybe_jit(lambda x: nf.group_norm(x, num_groups=num_groups), jit)(_x())
  if num_groups == 0:
    with pytest.raises(ValueError, match=r'`num_groups` must be a positive'):
      nf.evonorm_s0(_x(), num_groups=0)


@jit_modes
def test_wrong_cond_shape(jit):
  x = _x()
  bad = [
      (dict(shift=jnp.zeros((B, C + 1))), r'`shift` has shape \(2, 9\), '
       r'expected \[\*lead, 8\].*\[2, 8\] for one vector per example or '
       r'\[2, 3, 8\] per token'),
      (dict(scale=jnp.zeros((3, C))), r'`scale` has shape \(3, 8\)'),
      (dict(scale=jnp.zeros((B, T, T, C))),
       r'`scale` has shape \(2, 3, 3, 8\)'),
  ]
  for kw, pattern in bad:
    with pytest.raises(ValueError, match=pattern):
      _maybe_jit(lambda x: _call_any('adaln_zero', x, **kw), jit)(x)
  with pytest.raises(TypeError, match=r'`shift` must be a floating-point'):
    _maybe_jit(lambda x: _call_any('adaln_zero', x, shift=jnp.zeros(
        (B, C), jnp.int32)), jit)(x)
  for kind in ('td_layernorm', 'td_rmsnorm'):
    with pytest.raises(ValueError, match=r'`tau` has shape \(3,\), expected '
                       r'a prefix of the token shape'):
      _maybe_jit(lambda x: _call_any(kind, x, tau=jnp.zeros(3)), jit)(x)
    with pytest.raises(TypeError, match=r'`tau` must be a floating-point'):
      _maybe_jit(lambda x: _call_any(kind, x, tau=jnp.zeros(B, jnp.int32)),
                 jit)(x)
  # The module names `cond`.
  with pytest.raises(ValueError, match=r'AdaLNZero: `cond` has shape '
                     r'\(3, 4\)'):
    nl.AdaLNZero().init(jax.random.key(0), x, jnp.ones((3, 4)))
  with pytest.raises(ValueError,
                     match=r'td_layer_norm: `tau` has shape \(3,\)'):
    nl.TDLayerNorm().init(jax.random.key(0), x, jnp.ones((3,)))


def test_other_bad_arguments():
  with pytest.raises(ValueError, match=r'`layer_index` must be >= 1'):
    nf.layer_norm_scaling(_x(), layer_index=0)
  with pytest.raises(TypeError, match=r'`layer_index` must be an int'):
    nf.layer_norm_scaling(_x(), layer_index=2.0)
  with pytest.raises(ValueError, match=r"`base` must be one of"):
    nf.layer_norm_scaling(_x(), layer_index=2, base='batchnorm')
  q = _x(shape=(B, T, 2, 4))
  with pytest.raises(ValueError, match=r'same head_dim'):
    nf.qk_norm(q, _x(shape=(B, T, 2, 5)))
  with pytest.raises(ValueError, match=r'`k` must have shape \[\.\.\., '
                     r'heads, head_dim\]'):
    nf.qk_norm(q, jnp.ones((4,)))
  with pytest.raises(TypeError, match=r'`q` must be a floating-point'):
    nf.qk_norm(jnp.ones((B, 2, 4), jnp.int32), q)
  with pytest.raises(ValueError, match=r"`params_k\['scale'\]` has shape "
                     r'\(3,\); expected shape \(4,\) or \(2, 4\)'):
    nf.qk_norm(q, q, None, {'scale': jnp.ones(3)})
  with pytest.raises(ValueError, match=r"`kind` must be one of"):
    nf.qk_norm(q, q, kind='l2')
  with pytest.raises(ValueError, match=r'`branch` has shape'):
    nf.gated_residual(_x(), jnp.ones((B, T, 1)), jnp.ones((B, C)))
