"""Multi-step comparison of every stateful norm with its NumPy reference.

Each case runs >= 12 training steps (across warmup and, for UN, into the
geometric-mean and gradient-compensation regimes) on padded batches, threads
the state, and compares the output, dx, dscale, dbias and every state leaf
(backward statistics included, via their cotangents) with tests/reference.py,
in float32 and float64.
"""

import conftest
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref

import normjax
from normjax import functional as nf

B, T, C = 4, 6, 8
STEPS = 14

# name -> (function, init_state, reference class, {jax field: ref attribute},
#          options shared by both, options for JAX only)
PN_FIELDS = {'running_phi': 'phi', 'ema_gz': 'u', 'step': 't'}
UN_FIELDS = {'running_var': 'R', 'fwd_window': 'F', 'step': 't',
             'skip_count': 'skip_counter', 'ema_gz': 'nu', 'bwd_window': 'H'}
CASES = {
    'batchnorm': (nf.batch_norm, nf.init_batch_norm_state, ref.BatchNormRef,
                  {'mean': 'mean', 'var': 'var'}, dict(momentum=0.8)),
    # The PowerNorm paper's BN row (official MaskSyncBatchNorm).
    'paper_batchnorm': (nf.paper_batch_norm, nf.init_paper_batch_norm_state,
                        ref.PaperBatchNormRef,
                        {'running_mean': 'mean', 'running_var': 'var'},
                        dict(momentum=0.8)),
    'pn_v': (nf.pn_v, nf.init_pn_v_state, ref.PNVRef,
             {'running_phi': 'phi'}, dict(num_groups=2)),
    'powernorm': (nf.power_norm, nf.init_power_norm_state, ref.PowerNormRef,
                  PN_FIELDS, dict(num_groups=2, warmup_steps=5)),
    'powernorm_paper': (nf.power_norm, nf.init_power_norm_state,
                        ref.PowerNormRef, PN_FIELDS,
                        dict(num_groups=2, warmup_steps=5,
                             backward_denominator='running',
                             grad_mean_over='valid')),
    'powernorm_running_padded': (
        nf.power_norm, nf.init_power_norm_state, ref.PowerNormRef, PN_FIELDS,
        dict(num_groups=4, warmup_steps=3, backward_denominator='running')),
    'powernorm_batch_valid': (
        nf.power_norm, nf.init_power_norm_state, ref.PowerNormRef, PN_FIELDS,
        dict(warmup_steps=4, grad_mean_over='valid')),
    'powernorm_no_group_scaling': (
        nf.power_norm, nf.init_power_norm_state, ref.PowerNormRef, PN_FIELDS,
        dict(warmup_steps=5, use_group_scaling=False, alpha_fwd=0.8,
             alpha_bkw=0.7)),
    'unified': (nf.unified_norm, nf.init_unified_norm_state,
                ref.UnifiedNormRef, UN_FIELDS,
                dict(window_size=3, warmup_steps=4, compensation_delay=6)),
    'unified_outliers': (nf.unified_norm, nf.init_unified_norm_state,
                         ref.UnifiedNormRef, UN_FIELDS,
                         dict(window_size=(3, 2), warmup_steps=4,
                              compensation_delay=5, outlier_filtration=True)),
    'unified_valid': (nf.unified_norm, nf.init_unified_norm_state,
                      ref.UnifiedNormRef, UN_FIELDS,
                      dict(window_size=2, warmup_steps=3, compensation_delay=4,
                           mean_over='valid', compensation_clamp=1.2)),
    # The official UN1d given a pad mask: s over real tokens, q over all rows.
    'unified_official_masked': (
        nf.unified_norm, nf.init_unified_norm_state, ref.UnifiedNormRef,
        UN_FIELDS, dict(window_size=2, warmup_steps=3, compensation_delay=4,
                        mean_over='official_masked',
                        compensation_clamp=1.2)),
}


def make_batch(rng, dtype):
  """A padded batch: real tokens first, pads (with non-zero values) after."""
  lengths = rng.integers(1, T + 1, size=B)
  lengths[0] = T
  mask = np.arange(T)[None, :] < lengths[:, None]
  scale = rng.uniform(0.3, 3.0, size=(1, 1, C))  # channel scales vary
  x = rng.normal(size=(B, T, C)) * scale + rng.normal(size=(1, 1, C))
  dy = rng.normal(size=(B, T, C))
  return x.astype(dtype), mask, dy.astype(dtype)


def train_step(fn, options):
  """jit(grad) of sum(y * dy) wrt x, params and the backward statistics."""

  @jax.jit
  def step(x, params, state, mask, dy):
    backward = getattr(state, 'BACKWARD_FIELDS', ())
    stats = {k: getattr(state, k) for k in backward}

    def loss(x, params, stats):
      y, new_state = fn(x, params, state._replace(**stats), mask=mask,
                        **options)
      return jnp.sum(y * dy), (y, new_state)

    (dx, dparams, dstats), (y, new_state) = jax.grad(
        loss, argnums=(0, 1, 2), has_aux=True)(x, params, stats)
    new_state = new_state._replace(
        **normjax.apply_backward_stats(stats, dstats))
    return y, dx, dparams, new_state

  return step


def tolerance(dtype):
  return dict(rtol=2e-4, atol=2e-4) if dtype == 'float32' else dict(
      rtol=1e-10, atol=1e-10)


def check(name, what, got, want, tol):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  scale = max(1.0, float(np.max(np.abs(want))))
  conftest.record_deviation(f'{name}: {what}',
                            np.max(np.abs(got - want)) / scale)
  np.testing.assert_allclose(got, want, err_msg=f'{name}: {what}', **tol)


@pytest.mark.parametrize('name', sorted(CASES))
def test_matches_reference_over_steps(name, float_dtype):
  fn, init, ref_cls, fields, options = CASES[name]
  tag = f'{name} [{float_dtype}]'
  rng = np.random.default_rng(0)
  init_args = {'window_size': options['window_size']} if (
      'window_size' in options) else {}
  state = init(C, dtype=float_dtype, **init_args)
  reference = ref_cls(C, **options)
  params = {'scale': jnp.asarray(rng.uniform(0.5, 1.5, C), float_dtype),
            'bias': jnp.asarray(rng.normal(size=C), float_dtype)}
  step = train_step(fn, options)
  tol = tolerance(float_dtype)
  for t in range(STEPS):
    x, mask, dy = make_batch(rng, float_dtype)
    if name == 'unified_outliers' and t == 9:
      x[..., 2] *= 100.0  # one channel blows up: an outlier batch
    y, dx, dparams, state = step(jnp.asarray(x), params, state,
                                 jnp.asarray(mask), jnp.asarray(dy))
    y_ref = reference.forward(x.reshape(-1, C), mask.reshape(-1), True,
                              params['scale'], params['bias'])
    dx_ref, dscale_ref, dbias_ref = reference.backward(dy.reshape(-1, C))
    check(tag, 'y', y.reshape(-1, C), y_ref, tol)
    check(tag, 'dx', dx.reshape(-1, C), dx_ref, tol)
    check(tag, 'dscale', dparams['scale'], dscale_ref, tol)
    check(tag, 'dbias', dparams['bias'], dbias_ref, tol)
    for field, attr in fields.items():
      check(tag, f'state.{field}', getattr(state, field),
            getattr(reference, attr), tol)
  # Evaluation mode: the running statistics, no state change.
  x, mask, _ = make_batch(rng, float_dtype)
  y, new_state = fn(jnp.asarray(x), params, state, mask=jnp.asarray(mask),
                    use_running_average=True, **options)
  y_ref = reference.forward(x.reshape(-1, C), mask.reshape(-1), False,
                            params['scale'], params['bias'])
  check(tag, 'y (eval)', y.reshape(-1, C), y_ref, tol)
  assert new_state is state
  if 'unified' in name and options.get('outlier_filtration'):
    assert int(state.skip_count) >= 1, 'the injected outlier was not caught'
