"""LayerNorm, RMSNorm, GroupScaling and PN-V/BatchNorm gradients: references,
invariants and numerical gradient checks for norms without a custom rule."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from jax.test_util import check_grads

from normjax import functional as nf

C = 8


def data(dtype, seed=0, shape=(3, 4, C)):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=shape) * rng.uniform(0.5, 3, C) + rng.normal(size=C)
  p = {'scale': rng.uniform(0.5, 1.5, C), 'bias': rng.normal(size=C)}
  return (jnp.asarray(x, dtype),
          {k: jnp.asarray(v, dtype) for k, v in p.items()})


def tol(dtype):
  return 1e-6 if dtype == 'float32' else 1e-13


@pytest.mark.parametrize('name', ['layer_norm', 'rms_norm'])
def test_per_token_norms_match_reference(name, float_dtype):
  x, p = data(float_dtype)
  y, state = getattr(nf, name)(x, p, eps=1e-5)
  want = getattr(ref, name)(np.asarray(x).reshape(-1, C), p['scale'],
                            p['bias'], eps=1e-5)
  np.testing.assert_allclose(np.asarray(y).reshape(-1, C), want,
                             atol=tol(float_dtype) * 10, rtol=tol(float_dtype))
  assert state is None
  assert y.dtype == x.dtype


def test_group_scaling_and_its_vjp_match_reference(float_dtype):
  x, _ = data(float_dtype)
  dy = jnp.asarray(np.random.default_rng(1).normal(size=x.shape), x.dtype)
  y, vjp = jax.vjp(lambda v: nf.group_scaling(v, num_groups=4)[0], x)
  x2 = np.asarray(x).reshape(-1, C)
  np.testing.assert_allclose(np.asarray(y).reshape(-1, C),
                             ref.group_scaling(x2, 4), atol=tol(float_dtype))
  np.testing.assert_allclose(
      np.asarray(vjp(dy)[0]).reshape(-1, C),
      ref.group_scaling_vjp(x2, np.asarray(dy).reshape(-1, C), 4),
      atol=tol(float_dtype) * 10)


def test_layer_norm_invariants():
  with jax.enable_x64(True), jax.numpy_rank_promotion('allow'):
    x, _ = data('float64')
    y, _ = nf.layer_norm(x, None, eps=0.0)
    y2, _ = nf.layer_norm(3.5 * x - 2.0, None, eps=0.0)
    chex.assert_trees_all_close(y, y2, atol=1e-12)  # shift/scale invariant
    mu = jnp.mean(x, -1, keepdims=True)
    chex.assert_trees_all_close(nf.layer_norm(x, None)[0],
                                nf.rms_norm(x - mu, None)[0], atol=1e-14)
    chex.assert_trees_all_close(jnp.mean(y, -1), 0.0, atol=1e-12)
    chex.assert_trees_all_close(jnp.mean(y * y, -1), 1.0, atol=1e-12)


def test_layer_norm_keeps_precision_with_a_large_mean():
  """flax's one-pass variance is off by ~30 here (std 7.6)."""
  rng = np.random.default_rng(2)
  x = jnp.asarray(1e4 + 0.01 * rng.normal(size=(16, 256)), jnp.float32)
  y, _ = nf.layer_norm(x, None)
  want = ref.layer_norm(np.asarray(x), eps=1e-6)
  np.testing.assert_allclose(np.asarray(y), want, atol=2e-6)


def test_layer_norm_over_token_axes_uses_the_mask():
  x, _ = data('float32')
  mask = jnp.asarray(np.arange(4)[None] < np.array([[4], [2], [3]]))
  y, _ = nf.layer_norm(x, None, axis=(1, 2), mask=mask)
  x_pad = jnp.where(mask[..., None], x, 1e3)
  y_pad, _ = nf.layer_norm(x_pad, None, axis=(1, 2), mask=mask)
  chex.assert_trees_all_close(jnp.where(mask[..., None], y - y_pad, 0), 0.0,
                              atol=1e-5)


# (The stateless norms: contract_test.test_gradients_match_finite_differences.)
NO_CUSTOM_RULE = {
    'batch_norm': lambda x, p: nf.batch_norm(
        x, p, nf.init_batch_norm_state(C, jnp.float64), mask=MASK)[0],
    'pn_v': lambda x, p: nf.pn_v(
        x, p, nf.init_pn_v_state(C, jnp.float64), mask=MASK, num_groups=2)[0],
    'unified_window_1': lambda x, p: nf.unified_norm(
        x, p, nf.init_unified_norm_state(C, 1, jnp.float64), window_size=1,
        freeze_backward_stats=True)[0],
}
MASK = np.arange(4)[None] < np.array([[4], [2], [3]])


@pytest.mark.parametrize('name', sorted(NO_CUSTOM_RULE))
def test_gradients_are_exact(name):
  """Reverse mode against finite differences (forward mode is not defined
  for custom_vjp functions, so UN is checked in reverse mode only)."""
  with jax.enable_x64(True):
    x, p = data('float64', seed=3)
    check_grads(NO_CUSTOM_RULE[name], (x, p), order=1, modes=['rev'],
                atol=1e-5, rtol=1e-5)
