"""normjax.probes: values against NumPy, recorded only when asked, and
PowerNorm's exact-autodiff backward used to compare gradients."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normjax
from normjax import functional as nf
from normjax import linen as nnorm

X = (np.random.default_rng(0).standard_normal((4, 6, 8)) * 3 + 1).astype(
    np.float32)
LENGTHS = np.array([6, 3, 5, 1])
MASK = np.arange(6)[None] < LENGTHS[:, None]


def _real(x):
  return np.asarray(x, np.float64)[MASK]  # [tokens, features]


def _group_scale(x, groups, eps=1e-5):
  g = x.reshape(*x.shape[:-1], groups, -1)
  g = g / np.sqrt(np.mean(g**2, axis=-1, keepdims=True) + eps)
  return g.reshape(x.shape)


def _apply(kind, **kwargs):
  module = nnorm.make_norm(kind, **kwargs)()
  variables = nn.unbox(module.init(jax.random.PRNGKey(1), X, False,
                                   mask=MASK))
  _, out = module.apply(variables, X, False, mask=MASK,
                        mutable=['batch_stats', 'probes'])
  return variables, normjax.probes.flatten(out['probes'])


def test_activation_probes_match_numpy():
  got = normjax.probes.activation_probes(X, MASK)
  real = _real(X)
  np.testing.assert_allclose(got['act_var'], real.var(), rtol=1e-5)
  np.testing.assert_allclose(got['act_max'], np.abs(real).max(), rtol=1e-6)
  chex.assert_shape(list(got.values()), ())


def test_batchnorm_distances_match_numpy():
  variables, got = _apply('batchnorm')
  real = _real(X)
  st = variables['batch_stats']
  np.testing.assert_allclose(
      got['mean_dist'], np.abs(real.mean(0) - st['mean']).mean(), rtol=1e-5)
  np.testing.assert_allclose(
      got['var_dist'], np.abs(real.var(0) - st['var']).mean(), rtol=1e-5)
  assert 'qm_dist' not in got


@pytest.mark.parametrize('kind', ['powernorm', 'pn_v'])
def test_powernorm_distance_is_after_group_scaling(kind):
  _, got = _apply(kind, num_groups=2)
  seen = _group_scale(np.asarray(X, np.float64), 2)[MASK]
  np.testing.assert_allclose(got['qm_dist'],
                             np.abs((seen**2).mean(0) - 1.0).mean(), rtol=1e-5)
  # The activation probes describe the raw input, as for every other norm.
  np.testing.assert_allclose(got['act_var'], _real(X).var(), rtol=1e-5)


def test_unified_norm_distance_uses_its_running_statistic():
  _, got = _apply('unified')
  np.testing.assert_allclose(
      got['qm_dist'], np.abs((_real(X)**2).mean(0) - 1.0).mean(), rtol=1e-5)


@pytest.mark.parametrize('kind', ['layernorm', 'rmsnorm', 'dyt', 'none',
                                  'crmsnorm'])
def test_stateless_norms_record_activation_probes(kind):
  _, got = _apply(kind)
  assert set(got) == {'act_var', 'act_max', 'nonfinite_frac'}
  assert float(got['nonfinite_frac']) == 0.0


def test_nothing_is_recorded_unless_asked_or_in_evaluation():
  module = nnorm.make_norm('batchnorm')()
  variables = module.init(jax.random.PRNGKey(1), X, False, mask=MASK)
  _, out = module.apply(variables, X, False, mask=MASK,
                        mutable=['batch_stats'])
  assert set(out) == {'batch_stats'}
  _, out = module.apply(variables, X, True, mask=MASK, mutable=['probes'])
  assert not out.get('probes')


def test_probes_do_not_change_outputs_or_state():
  module = nnorm.make_norm('powernorm', warmup_steps=2)()
  variables = module.init(jax.random.PRNGKey(1), X, False, mask=MASK)
  y0, s0 = module.apply(variables, X, False, mask=MASK,
                        mutable=['batch_stats'])
  y1, s1 = module.apply(variables, X, False, mask=MASK,
                        mutable=['batch_stats', 'probes'])
  np.testing.assert_array_equal(y0, y1)
  chex.assert_trees_all_equal(s0['batch_stats'], s1['batch_stats'])


def test_all_padding_gives_zero_probes_not_nan():
  got = normjax.probes.statistic_distances(
      X, np.zeros(MASK.shape, bool), {'mean': np.zeros(8), 'var': np.ones(8)})
  act = normjax.probes.activation_probes(X, np.zeros(MASK.shape, bool))
  assert all(float(v) == 0.0 for v in [*got.values(), *act.values()])


def test_unknown_running_statistic_is_named():
  with pytest.raises(ValueError, match='unknown running statistic'):
    normjax.probes.statistic_distances(X, None, {'phi': np.ones(8)})


# ------------------------------------- PowerNorm's exact-autodiff backward --

def _pn_loss(x, backward, warmup, step=0):
  st = nf.init_power_norm_state(8)._replace(
      step=jnp.asarray(step, jnp.int32), running_phi=jnp.full((8,), 2.0))
  # dx only: the backward statistic is frozen on purpose.
  y, _ = nf.power_norm(x, None, st, mask=MASK, warmup_steps=warmup,
                       num_groups=2, backward=backward,
                       freeze_backward_stats=True)
  return jnp.sum(jnp.sin(y))


@pytest.mark.parametrize('step', [0, 5])  # in warmup (W = 3), after it
def test_autodiff_backward_is_autodiff_of_the_forward(step, float_dtype):
  x = jnp.asarray(X, float_dtype)

  def reference(x):  # the forward written out, differentiated by JAX
    xs = _jax_group_scale(x)
    if step + 1 <= 3:
      psi2 = jnp.sum(jnp.where(MASK[..., None], xs**2, 0), (0, 1)) / MASK.sum()
      d = jnp.sqrt(psi2 + 1e-5)
    else:
      d = jnp.sqrt(jnp.full((8,), 2.0, x.dtype) + 1e-5)
    return jnp.sum(jnp.sin(xs / d[None, None]))

  want = jax.grad(reference)(x)
  got = jax.grad(_pn_loss)(x, 'autodiff', 3, step)
  tol = 1e-5 if float_dtype == 'float32' else 1e-12
  np.testing.assert_allclose(got, want, atol=tol, rtol=tol)
  approx = jax.grad(_pn_loss)(x, 'approximate', 3, step)
  assert float(jnp.max(jnp.abs(approx - want))) > 1e-3


def _jax_group_scale(x):
  g = x.reshape(*x.shape[:-1], 2, 4)
  g = g / jnp.sqrt(jnp.mean(g**2, -1, keepdims=True) + 1e-5)
  return g.reshape(x.shape)


def test_context_manager_switches_the_default_at_trace_time():
  x = jnp.asarray(X)
  exact = jax.grad(_pn_loss)(x, 'autodiff', 3)
  with nf.power_norm_autodiff():
    inside = jax.grad(_pn_loss)(x, None, 3)
  outside = jax.grad(_pn_loss)(x, None, 3)
  np.testing.assert_array_equal(inside, exact)
  np.testing.assert_array_equal(outside, jax.grad(_pn_loss)(x, 'approximate', 3))
  with pytest.raises(ValueError, match='backward'):
    _pn_loss(x, 'exact', 3)
