"""PowerNorm invariants (spec §3.1): state recursions, the custom gradient
against autodiff, pad semantics, GroupScaling, evaluation."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref

import normjax
from normjax import functional as nf

C = 8
EPS = 1e-5


def batch(seed, b=4, t=5, pads=True):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(b, t, C)) * rng.uniform(0.5, 2, C) + 0.3
  lengths = rng.integers(1, t + 1, size=b) if pads else np.full(b, t)
  lengths[0] = t
  mask = np.arange(t)[None] < lengths[:, None]
  dy = rng.normal(size=(b, t, C))
  return jnp.asarray(x), jnp.asarray(mask), jnp.asarray(dy)


def grads(x, params, state, mask, dy, **kw):
  """(y, dx, dparams, du, new_state) of one training step."""
  def loss(x, params, u):
    y, new = nf.power_norm(x, params, state._replace(ema_gz=u), mask=mask,
                           **kw)
    return jnp.sum(y * dy), (y, new)
  (dx, dp, du), (y, new) = jax.grad(loss, (0, 1, 2), has_aux=True)(
      x, params, state.ema_gz)
  return y, dx, dp, du, new


def masked_mean(v, mask):
  m = mask[..., None]
  return jnp.sum(jnp.where(m, v, 0), (0, 1)) / jnp.sum(mask)


@pytest.fixture(autouse=True)
def x64():
  # Broadcasting in the test formulas is implicit; the library itself is
  # checked under 'raise' by exactness_test.py.
  with jax.enable_x64(True), jax.numpy_rank_promotion('allow'):
    yield


PARAMS = {'scale': jnp.linspace(0.5, 1.5, C), 'bias': jnp.linspace(-1, 1, C)}


def test_running_phi_trajectory_across_warmup():
  w = 5
  state = nf.init_power_norm_state(C, jnp.float64)
  for t in range(1, 10):
    x, mask, _ = batch(t)
    xs = ref.group_scaling(np.asarray(x).reshape(-1, C), 2)
    psi2 = (xs[np.asarray(mask).reshape(-1)] ** 2).mean(0)
    y, new = nf.power_norm(x, None, state, mask=mask, warmup_steps=w,
                           num_groups=2)
    # The forward uses the batch statistic up to W, then phi_{t-1}.
    denom = np.sqrt(psi2 + EPS) if t <= w else np.sqrt(
        np.asarray(state.running_phi) + EPS)
    chex.assert_trees_all_close(np.asarray(y).reshape(-1, C), xs / denom,
                                atol=1e-12)
    phi_prev = np.asarray(state.running_phi)
    if t == 1:
      expected = 0.9 * psi2 + 0.1 * psi2  # the CMA discards the init
    elif t < w:
      expected = 0.9 * (phi_prev * (t - 1) / t + psi2 / t) + 0.1 * psi2
    else:
      expected = 0.9 * phi_prev + 0.1 * psi2
    chex.assert_trees_all_close(new.running_phi, expected, atol=1e-12)
    assert int(new.step) == t
    state = new


def test_u_recursion_matches_paper_form():
  """(1-a) u_t = nu (1 - (1-a) Gamma) + (1-a) Lambda, with nu = (1-a) u."""
  a = 0.9
  state = nf.init_power_norm_state(C, jnp.float64)
  for t in range(1, 6):
    x, mask, dy = batch(10 + t)
    _, _, _, du, new = grads(x, PARAMS, state, mask, dy, warmup_steps=3,
                             num_groups=2)
    u_new = state.ema_gz + du
    xs = ref.group_scaling(np.asarray(x).reshape(-1, C), 2)
    m = np.asarray(mask).reshape(-1)
    psi2 = (xs[m] ** 2).mean(0)
    d = np.sqrt(psi2 + EPS) if t <= 3 else np.sqrt(
        np.asarray(state.running_phi) + EPS)
    z = xs / d
    g = np.asarray(PARAMS['scale']) * np.asarray(dy).reshape(-1, C)
    gamma, lam = (z * z).mean(0), (g * z).mean(0)  # over ALL rows
    nu = (1 - a) * np.asarray(state.ema_gz)
    chex.assert_trees_all_close((1 - a) * u_new,
                                nu * (1 - (1 - a) * gamma) + (1 - a) * lam,
                                atol=1e-13)
    state = new._replace(ema_gz=u_new)


def test_first_step_gradient_is_not_autodiff():
  """u_0 = 0, so dxs = g / psi_B: autodiff would subtract mean_V(g z) z."""
  x, mask, dy = batch(3)
  params = {'scale': PARAMS['scale']}
  state = nf.init_power_norm_state(C, jnp.float64)
  kw = dict(warmup_steps=10, use_group_scaling=False)
  _, dx, _, _, _ = grads(x, params, state, mask, dy, **kw)

  def batch_rms_norm(x):  # the same forward, differentiated exactly
    psi2 = masked_mean(x * x, mask)
    return params['scale'] * x / jnp.sqrt(psi2 + EPS)
  dx_auto = jax.vjp(batch_rms_norm, x)[1](dy)[0]
  psi = jnp.sqrt(masked_mean(x * x, mask) + EPS)
  z = x / psi
  g = params['scale'] * dy
  chex.assert_trees_all_close(dx, g / psi, atol=1e-13)
  assert float(jnp.max(jnp.abs(dx - dx_auto))) > 1e-3
  # Exact autodiff subtracts sum_all(g z) / N_V (pad outputs depend on psi
  # too; the spec's mean_V(g z) assumes dy = 0 at pads) on the real rows.
  corr = jnp.sum(g * z, (0, 1)) / jnp.sum(mask)
  chex.assert_trees_all_close(
      dx - dx_auto, jnp.where(mask[..., None], corr * z / psi, 0),
      atol=1e-13)


def test_post_warmup_gradient_formula():
  x, mask, dy = batch(4)
  rng = np.random.default_rng(1)
  state = nf.PowerNormState(
      running_phi=jnp.asarray(rng.uniform(0.5, 2, C)),
      ema_gz=jnp.asarray(rng.normal(size=C)), step=jnp.asarray(7, jnp.int32))
  kw = dict(warmup_steps=3, use_group_scaling=False)
  _, dx, _, _, _ = grads(x, PARAMS, state, mask, dy, **kw)
  psi_b = jnp.sqrt(masked_mean(x * x, mask) + EPS)
  run = jnp.sqrt(state.running_phi + EPS)
  g = PARAMS['scale'] * dy
  nu = 0.1 * state.ema_gz
  expected = g / run + g * (1 / psi_b - 1 / run) - nu * (x / run) / psi_b
  chex.assert_trees_all_close(dx, expected, atol=1e-12)
  # With nu = 0 and phi = psi_B^2 it equals autodiff of the frozen affine.
  state = state._replace(ema_gz=jnp.zeros(C),
                         running_phi=masked_mean(x * x, mask))
  _, dx, _, _, _ = grads(x, PARAMS, state, mask, dy, **kw)
  frozen = lambda x: PARAMS['scale'] * x / jnp.sqrt(state.running_phi + EPS)
  chex.assert_trees_all_close(dx, jax.vjp(frozen, x)[1](dy)[0], atol=1e-12)


def test_param_gradients_ignore_u():
  x, mask, dy = batch(5)
  state = nf.init_power_norm_state(C, jnp.float64)
  _, _, dp0, _, _ = grads(x, PARAMS, state, mask, dy, warmup_steps=3)
  state = state._replace(ema_gz=jnp.full((C,), 5.0))
  _, _, dp1, _, _ = grads(x, PARAMS, state, mask, dy, warmup_steps=3)
  chex.assert_trees_all_close(dp0, dp1, atol=1e-13)


def test_pad_semantics():
  x, mask, dy = batch(6)
  assert not bool(jnp.all(mask))
  rng = np.random.default_rng(2)
  state = nf.PowerNormState(
      running_phi=jnp.ones(C), ema_gz=jnp.asarray(rng.normal(size=C)),
      step=jnp.asarray(0, jnp.int32))
  kw = dict(warmup_steps=5, num_groups=2)
  y, dx, _, du, new = grads(x, PARAMS, state, mask, dy, **kw)
  # (a) pad inputs do not change real outputs or the forward state.
  x2 = jnp.where(mask[..., None], x, 50 * x + 3)
  y2, _, _, du2, new2 = grads(x2, PARAMS, state, mask, dy, **kw)
  chex.assert_trees_all_close(jnp.where(mask[..., None], y - y2, 0), 0.0,
                              atol=1e-12)
  chex.assert_trees_all_close(new.running_phi, new2.running_phi, atol=1e-12)
  # (b) ... but they change u, through Gamma and the 1/N denominator.
  assert float(jnp.max(jnp.abs(du - du2))) > 1e-6
  # (c) pads get a gradient even where dy is zero there.
  dy0 = jnp.where(mask[..., None], dy, 0)
  _, dx0, _, _, _ = grads(x, PARAMS, state, mask, dy0, **kw)
  assert float(jnp.min(jnp.max(jnp.abs(dx0), -1)[~mask])) > 0
  # ... and not with the paper's mean over valid tokens.
  _, dxv, _, _, _ = grads(x, PARAMS, state, mask, dy0,
                          grad_mean_over='valid', **kw)
  chex.assert_trees_all_close(jnp.where(mask[..., None], 0, dxv), 0.0,
                              atol=1e-15)
  # (d) no mask == an all-True mask.
  full = jnp.ones_like(mask)
  a = grads(x, PARAMS, state, None, dy, **kw)
  b = grads(x, PARAMS, state, full, dy, **kw)
  chex.assert_trees_all_close(a, b, atol=1e-13)


def test_group_scaling_invariance_and_gradient():
  x, mask, dy = batch(7)
  c = jnp.asarray(np.random.default_rng(3).uniform(0.1, 10, (4, 5, 2, 1)))
  x_scaled = (x.reshape(4, 5, 2, 4) * c).reshape(x.shape)
  state = nf.init_power_norm_state(C, jnp.float64)
  kw = dict(warmup_steps=5, num_groups=2, group_scaling_eps=0.0)
  y1, _ = nf.power_norm(x, PARAMS, state, mask=mask, **kw)
  y2, _ = nf.power_norm(x_scaled, PARAMS, state, mask=mask, **kw)
  chex.assert_trees_all_close(y1, y2, atol=1e-10)
  # dx is GroupScaling's VJP applied to the PowerNorm core's gradient.
  _, dx, _, _, _ = grads(x, PARAMS, state, mask, dy, warmup_steps=5,
                         num_groups=2)
  _, dxs, _, _, _ = grads(nf.group_scaling(x, num_groups=2)[0], PARAMS, state,
                          mask, dy, warmup_steps=5, use_group_scaling=False)
  gs = lambda v: nf.group_scaling(v, num_groups=2)[0]
  chex.assert_trees_all_close(dx, jax.vjp(gs, x)[1](dxs)[0], atol=1e-12)


def test_eval_is_affine_of_group_scaling():
  x, mask, _ = batch(8)
  state = nf.PowerNormState(running_phi=jnp.linspace(0.5, 2, C),
                            ema_gz=jnp.ones(C), step=jnp.asarray(3, jnp.int32))
  y, new = nf.power_norm(x, PARAMS, state, mask=mask, num_groups=4,
                         use_running_average=True)
  xs = nf.group_scaling(x, num_groups=4)[0]
  expected = (PARAMS['scale'] * xs / jnp.sqrt(state.running_phi + EPS)
              + PARAMS['bias'])
  chex.assert_trees_all_close(y, expected, atol=1e-13)
  assert new is state


def test_official_and_paper_options_differ():
  x, mask, dy = batch(9)
  state = nf.PowerNormState(
      running_phi=jnp.linspace(0.5, 2, C), ema_gz=jnp.linspace(-1, 1, C),
      step=jnp.asarray(9, jnp.int32))
  outs = {
      (den, over): grads(x, PARAMS, state, mask, dy, warmup_steps=3,
                         backward_denominator=den, grad_mean_over=over)
      for den in ('batch', 'running') for over in ('padded', 'valid')}
  dxs = [o[1] for o in outs.values()]
  for i in range(len(dxs)):
    for j in range(i):
      assert float(jnp.max(jnp.abs(dxs[i] - dxs[j]))) > 1e-4
  # The forward is the same whatever the backward options.
  for o in outs.values():
    chex.assert_trees_all_close(o[0], outs[('batch', 'padded')][0])


def test_apply_backward_stats_adds_the_cotangent():
  x, mask, dy = batch(11)
  state = nf.init_power_norm_state(C, jnp.float64)
  _, _, _, du, new = grads(x, PARAMS, state, mask, dy, warmup_steps=3)
  chex.assert_trees_all_equal(new.ema_gz, state.ema_gz)  # not in the forward
  assert float(jnp.max(jnp.abs(du))) > 0
  stats = {'ema_gz': jnp.full((C,), 0.5)}
  out = normjax.apply_backward_stats(stats, {'ema_gz': du})
  chex.assert_trees_all_close(out['ema_gz'], 0.5 + du)
