"""Unified Normalization invariants (spec §3.2): window 1 = exact autodiff,
the geometric-mean forward, gradient compensation, outlier filtration, eval."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from normjax import functional as nf

C = 6
EPS = 1e-5


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True), jax.numpy_rank_promotion('allow'):
    yield


def rows(a, n=3):
  """A [2n, 1, C] batch of rows +a and -a: its quadratic mean is a^2."""
  a = jnp.asarray(a, jnp.float64)
  return jnp.concatenate([jnp.broadcast_to(a, (n, 1, C)),
                          -jnp.broadcast_to(a, (n, 1, C))])


def step(x, state, dy, params=None, **kw):
  """One training step: (y, dx, dparams, new_state with backward stats)."""
  params = params or {'scale': jnp.linspace(0.5, 1.5, C)}

  def loss(x, params, nu, h):
    y, new = nf.unified_norm(x, params, state._replace(ema_gz=nu, bwd_window=h),
                             **kw)
    return jnp.sum(y * dy), (y, new)
  (dx, dp, dnu, dh), (y, new) = jax.grad(loss, (0, 1, 2, 3), has_aux=True)(
      x, params, state.ema_gz, state.bwd_window)
  return y, dx, dp, new._replace(ema_gz=state.ema_gz + dnu,
                                 bwd_window=state.bwd_window + dh)


def rms_batch_norm(x, params):
  s = jnp.mean(x * x, axis=(0, 1))
  return params['scale'] * x / jnp.sqrt(s + EPS)


def test_window_one_is_exact_autodiff():
  rng = np.random.default_rng(0)
  state = nf.init_unified_norm_state(C, 1, jnp.float64)
  params = {'scale': jnp.linspace(0.5, 1.5, C)}
  kw = dict(window_size=1, warmup_steps=2, compensation_delay=3)
  for _ in range(6):  # through warmup and past the compensation delay
    x = jnp.asarray(rng.normal(size=(4, 3, C)) * 2 + 1)
    dy = jnp.asarray(rng.normal(size=(4, 3, C)))
    nu_prev = state.ema_gz
    y, dx, dp, state = step(x, state, dy, params, **kw)
    y_ref, vjp = jax.vjp(rms_batch_norm, x, params)
    dx_ref, dp_ref = vjp(dy)
    chex.assert_trees_all_close(y, y_ref, atol=1e-13)
    chex.assert_trees_all_close(dx, dx_ref, atol=1e-12)
    chex.assert_trees_all_close(dp, dp_ref, atol=1e-12)
    g = params['scale'] * dy
    q = jnp.mean(g * x / jnp.sqrt(jnp.mean(x * x, (0, 1)) + EPS), (0, 1))
    chex.assert_trees_all_close(state.ema_gz, 0.9 * nu_prev + 0.1 * q,
                                atol=1e-13)
    chex.assert_trees_all_close(state.bwd_window[0], nu_prev, atol=0)


def test_warmup_path():
  rng = np.random.default_rng(1)
  state = nf.init_unified_norm_state(C, 3, jnp.float64)._replace(
      ema_gz=jnp.asarray(rng.normal(size=C)))
  x = jnp.asarray(rng.normal(size=(4, 3, C)))
  dy = jnp.asarray(rng.normal(size=(4, 3, C)))
  params = {'scale': jnp.linspace(0.5, 1.5, C)}
  y, dx, _, new = step(x, state, dy, params, window_size=3, warmup_steps=10)
  s = jnp.mean(x * x, (0, 1))
  chex.assert_trees_all_close(y, rms_batch_norm(x, params), atol=1e-13)
  g = params['scale'] * dy
  z = x / jnp.sqrt(s + EPS)
  nu = 0.9 * state.ema_gz + 0.1 * jnp.mean(g * z, (0, 1))
  chex.assert_trees_all_close(new.ema_gz, nu, atol=1e-13)
  chex.assert_trees_all_close(dx, (g - nu * z) / jnp.sqrt(s + EPS),
                              atol=1e-12)


def test_geometric_mean_forward_and_running_var():
  m, w = 3, 2
  a = [np.linspace(1, 2, C) * k for k in (1.0, 1.5, 0.7, 2.0, 1.2, 0.9)]
  state = nf.init_unified_norm_state(C, m, jnp.float64)
  kw = dict(window_size=m, warmup_steps=w, compensation_delay=100)
  for t, at in enumerate(a, start=1):
    x = rows(at)
    y, new = nf.unified_norm(x, None, state, **kw)
    if t <= m:
      sigma2 = at ** 2
    else:
      sigma2 = np.prod([a[t - 1 - i] ** 2 for i in range(m)], 0) ** (1 / m)
    chex.assert_trees_all_close(y, x / np.sqrt(sigma2 + EPS), atol=1e-12)
    chex.assert_trees_all_close(
        new.running_var, 0.9 * state.running_var + 0.1 * sigma2, atol=1e-12)
    state = new


@pytest.mark.parametrize('r_prev,clip', [(1e-3, 5.0), (1e3, 0.2)])
def test_gradient_compensation_clamps(r_prev, clip):
  m = 2
  state = nf.init_unified_norm_state(C, m, jnp.float64)._replace(
      step=jnp.asarray(20, jnp.int32), running_var=jnp.full((C,), r_prev),
      fwd_window=jnp.ones((m, C)))
  x = rows(np.ones(C))
  dy = jnp.asarray(np.random.default_rng(2).normal(size=x.shape))
  params = {'scale': jnp.linspace(0.5, 1.5, C)}
  kw = dict(window_size=m, warmup_steps=3, compensation_delay=5)
  _, dx, dp, _ = step(x, state, dy, params, **kw)
  z = x / np.sqrt(1 + EPS)
  chex.assert_trees_all_close(dp['scale'], clip * jnp.sum(dy * z, (0, 1)),
                              atol=1e-12)
  # Before max(compensation_delay, W) r stays 1.
  early = state._replace(step=jnp.asarray(3, jnp.int32))
  _, _, dp_early, _ = step(x, early, dy, params, **kw)
  chex.assert_trees_all_close(dp_early['scale'], jnp.sum(dy * z, (0, 1)),
                              atol=1e-12)
  del dx


def test_outlier_batch_is_skipped_and_exact():
  m = 3
  rng = np.random.default_rng(3)
  state = nf.init_unified_norm_state(C, m, jnp.float64)
  kw = dict(window_size=m, warmup_steps=4, compensation_delay=4,
            outlier_filtration=True)
  params = {'scale': jnp.linspace(0.5, 1.5, C)}
  for _ in range(6):  # a steady stream: every channel at the same scale
    x = rows(np.ones(C) + 0.01 * rng.normal(size=C))
    _, _, _, state = step(x, state, jnp.ones_like(x), params, **kw)
  assert int(state.skip_count) == 0
  x = jnp.asarray(rng.normal(size=(4, 3, C)))
  x = x.at[..., 1].multiply(100.0)
  dy = jnp.asarray(rng.normal(size=x.shape))
  y, dx, _, new = step(x, state, dy, params, **kw)
  assert int(new.skip_count) == 1
  slot = int(new.step) % m
  chex.assert_trees_all_close(new.fwd_window[slot], state.running_var)
  chex.assert_trees_all_close(new.bwd_window[slot], state.ema_gz)
  y_ref, vjp = jax.vjp(lambda v: rms_batch_norm(v, params), x)
  chex.assert_trees_all_close(y, y_ref, atol=1e-12)
  chex.assert_trees_all_close(dx, vjp(dy)[0], rtol=1e-9, atol=1e-12)


def test_eval_is_per_channel_affine():
  state = nf.init_unified_norm_state(C, 4, jnp.float64)._replace(
      running_var=jnp.linspace(0.5, 3, C))
  params = {'scale': jnp.linspace(0.5, 1.5, C), 'bias': jnp.ones(C)}
  x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 3, C)))
  y, new = nf.unified_norm(x, params, state, use_running_average=True)
  a = params['scale'] / jnp.sqrt(state.running_var + EPS)
  chex.assert_trees_all_close(y, a * x + params['bias'], atol=1e-13)
  assert new is state
  # The Jacobian is diagonal and independent of the batch.
  jac = jax.jacobian(lambda v: nf.unified_norm(
      v[None, None], params, state, use_running_average=True)[0][0, 0])(
          x[0, 0])
  chex.assert_trees_all_close(jac, jnp.diag(a), atol=1e-13)


def test_padding_counts_in_padded_mode_only():
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(2, 4, C)))
  mask = jnp.asarray([[1, 1, 1, 0], [1, 1, 0, 0]], bool)
  state = nf.init_unified_norm_state(C, 2, jnp.float64)
  _, a = nf.unified_norm(x, None, state, mask=mask, window_size=2)
  _, b = nf.unified_norm(x, None, state, mask=None, window_size=2)
  chex.assert_trees_all_close(a, b)  # official: the mask is ignored
  _, v = nf.unified_norm(x, None, state, mask=mask, mean_over='valid',
                         window_size=2)
  real = x[mask]
  chex.assert_trees_all_close(
      v.running_var, 0.9 + 0.1 * jnp.mean(real * real, 0), atol=1e-13)
  assert float(jnp.max(jnp.abs(v.running_var - a.running_var))) > 1e-3
