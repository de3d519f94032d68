"""Unified Normalization (UN) with its smoothed backward.

Yang, Zhou, Liu, Pu, Zhang, Wang, Sun. "Unified Normalization for
Accelerating and Stabilizing Transformers", ACM MM 2022,
https://arxiv.org/abs/2208.01313. Semantics of the official `UN1d`
(hikvision-research/Unified-Normalization, `unified_normalization.py`).

As with PowerNorm, the statistics that the official backward updates in place
(`ema_gz` = nu and the backward window `buffer_gz` = H) enter the custom_vjp
core as inputs, and their updates come back as their cotangents; see
`normjax.apply_backward_stats`.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from normjax._src import common, power_kernel, rules
from normjax._src import definition as nd

Array = jax.Array

UNIFIED_NORM_DOC = """Unified Normalization (Yang et al., 2022, https://arxiv.org/abs/2208.01313).

  Training step t, with windows M_f, M_b and s_t = mean_rows(x^2):

      rho   = var_unbiased(sqrt(F))           one scalar over the whole window
      F[t % M_f] = s_t
      outlier (if filtration and t >= W): any_c AM(F) - GM(F) > M_f rho;
              then F[t % M_f] = R and the batch is skipped
      sigma2 = s_t if t <= M_f or t < W or skipped else GM(F)
      r      = sqrt(sigma2 + eps) / sqrt(R + eps), clipped to [1/c, c];
               r = 1 if t <= max(compensation_delay, W) or skipped
      y      = scale * x / sqrt(sigma2 + eps) + bias
      R      = m R + (1 - m) sigma2

  Backward, with g = r * scale * dy and z = x / sqrt(sigma2 + eps):

      q      = mean_rows(g z);  H[t % M_b] = nu if skipped else q
      mu     = q if t <= M_b or t < W or skipped else mean(H)
      nu     = m nu + (1 - m) mu
      dx     = (g - (mu if skipped else nu) z) / sqrt(sigma2 + eps)
      dscale = sum(dy r z),  dbias = sum(dy)

  Evaluation: y = scale * x / sqrt(R + eps) + bias, a per-channel affine map
  that folds into the next linear layer. With M = 1 every batch is "skipped"
  and the backward is exact autodiff of batch RMS normalisation.

  Args:
    x: [batch, ..., features].
    params: optional `{'scale', 'bias'}` of shape [features].
    state: a `UnifiedNormState` (see `init_unified_norm_state`).
    mask: True for real tokens. Ignored with `mean_over='padded'`; 'valid'
      takes every statistic over real tokens; 'official_masked' (the
      official UN1d's `pad_mask`) only s_t, while q and the correction
      still run over every row.
    use_running_average: evaluation mode.
    axis_name: mesh axis name(s) for `shard_map`/`pmap`.

  Returns:
    `(y, new_state)`; `new_state.ema_gz` and `new_state.bwd_window` are those
    of `state` (their updates are cotangents). A batch without real tokens
    ('valid', 'official_masked') is normalised with R and leaves the state
    unchanged. So does, for the whole state, a batch whose forward statistic
    rows ('valid', 'official_masked': the real tokens; 'padded': every row)
    hold a NaN or an infinity, and nu and
    H ignore an update made non-finite by the cotangent.
  """


class UnifiedNormState(NamedTuple):
  """State of UN. Leaves carry a leading [groups] axis with num_batch_groups."""
  running_var: Array  # R [C]: EMA of the statistic used, init 1 (forward).
  fwd_window: Array   # F [M_f, C]: last M_f batch statistics, init 0.
  step: Array         # t: int32 training forward calls, init 0.
  skip_count: Array   # int32 number of batches filtered as outliers.
  ema_gz: Array       # nu [C]: EMA of the gradient statistic, init 0.
  bwd_window: Array   # H [M_b, C]: last M_b gradient statistics, init 0.

  BACKWARD_FIELDS = ('ema_gz', 'bwd_window')


def _windows(window_size: int | tuple[int, int], fn: str) -> tuple[int, int]:
  try:
    sizes = ((window_size, window_size) if isinstance(window_size, int)
             else tuple(window_size))
  except TypeError:
    sizes = ()
  if len(sizes) != 2 or not all(isinstance(m, int) and m >= 1 for m in sizes):
    raise ValueError(
        f'{fn}: `window_size` must be a positive int or a pair (forward, '
        f'backward) of positive ints, got {window_size!r}.')
  return sizes


def init_unified_norm_state(features: int,
                            window_size: int | tuple[int, int] | None = None,
                            dtype=jnp.float32,
                            num_batch_groups: int = 1) -> UnifiedNormState:
  """The fresh state of `unified_norm`: the window of the last
  `window_size` (forward, backward) statistics, the running mean and
  variance, and the step (`window_size` None: the default window)."""
  if window_size is None:
    window_size = UNIFIED_NORM.defaults['window_size']
  m_f, m_b = _windows(window_size, 'init_unified_norm_state')
  state = UnifiedNormState(
      running_var=jnp.ones((features,), dtype),
      fwd_window=jnp.zeros((m_f, features), dtype),
      step=jnp.zeros((), jnp.int32),
      skip_count=jnp.zeros((), jnp.int32),
      ema_gz=jnp.zeros((features,), dtype),
      bwd_window=jnp.zeros((m_b, features), dtype))
  return common.group_state(state, num_batch_groups)


def _geometric_mean(window: Array) -> Array:
  return jnp.exp(jnp.mean(jnp.log(window), axis=0))


@functools.partial(jax.custom_vjp, nondiff_argnums=(9, 10, 11))
def _un_core(x, var, r, skip, step, row_weight, has_data, ema_gz, bwd_window,
             momentum, warmup_steps, axis_name):
  """z = x / sqrt(var + eps'), with the official UN backward.

  `var` already includes eps. The cotangents returned for `ema_gz` and
  `bwd_window` are their updates (new - old).
  """
  del r, skip, step, row_weight, has_data, ema_gz, bwd_window
  return x * common.feat(jax.lax.rsqrt(var), x.ndim)


def _un_core_fwd(x, var, r, skip, step, row_weight, has_data, ema_gz,
                 bwd_window, momentum, warmup_steps, axis_name):
  z = x * common.feat(jax.lax.rsqrt(var), x.ndim)
  return z, (z, var, r, skip, step, row_weight, has_data, ema_gz, bwd_window)


def _gradient_statistics(q, t, skip, nu_prev, window_prev, momentum,
                         warmup_steps):
  """UN's backward statistics from q = mean_rows(g z): (coef, nu, H)."""
  m_b = window_prev.shape[0]
  window = window_prev.at[t % m_b].set(jnp.where(skip, nu_prev, q))
  use_batch = (t <= m_b) | (t < warmup_steps) | skip
  mu = jnp.where(use_batch, q, jnp.mean(window, axis=0))
  nu = momentum * nu_prev + (1 - momentum) * mu
  return jnp.where(skip, mu, nu), nu, window


def _updates(has_data, q, nu, nu_prev, window, window_prev):
  """The cotangents of nu and H: their updates, or 0 when the batch does
  not count (`has_data` false) or q is not finite (a non-finite input or
  cotangent)."""
  keep = has_data & common.all_finite(q)
  return (jnp.where(keep, nu - nu_prev, 0),
          jnp.where(keep, window - window_prev, 0))


def _un_core_bwd(momentum, warmup_steps, axis_name, res, dz):
  z, var, r, skip, t, row_weight, has_data, nu_prev, window_prev = res
  g = common.feat(r, dz.ndim) * dz
  q, _ = common.masked_row_mean(g * z, row_weight, axis_name)
  coef, nu, window = _gradient_statistics(q, t, skip, nu_prev, window_prev,
                                          momentum, warmup_steps)
  correction = common.feat(coef, z.ndim) * z
  if row_weight is not None:
    correction = correction * row_weight[..., None]
  dx = (g - correction) * common.feat(jax.lax.rsqrt(var), z.ndim)
  d_nu, d_window = _updates(has_data, q, nu, nu_prev, window, window_prev)
  return dx, None, None, None, None, None, None, d_nu, d_window


_un_core.defvjp(_un_core_fwd, _un_core_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(11, 12))
def _un_fused(x, scale, bias, var, r, skip, step, cw, has_data, ema_gz,
              bwd_window, momentum, warmup_steps):
  """`_un_core` and the affine map, through the fused CPU kernels.

  y = scale * x / sqrt(var) + bias; the backward is `_un_core_bwd`'s in two
  passes (q, dscale and dbias first: the correction needs q), with
  dscale = r * sum(dy z). cw [...] is 1 for the rows of q and the correction.
  """
  return _un_fused_fwd(x, scale, bias, var, r, skip, step, cw, has_data,
                       ema_gz, bwd_window, momentum, warmup_steps)[0]


def _un_fused_fwd(x, scale, bias, var, r, skip, step, cw, has_data, ema_gz,
                  bwd_window, momentum, warmup_steps):
  inv = jax.lax.rsqrt(var)
  y = power_kernel.apply(x, None, inv, scale, bias)
  return y, (x, scale, inv, r, skip, step, cw, has_data, ema_gz, bwd_window)


def _un_fused_bwd(momentum, warmup_steps, res, dy):
  x, scale, inv, r, skip, t, cw, has_data, nu_prev, window_prev = res
  g_scale = r * scale
  q, dscale, dbias, _ = power_kernel.columns(x, inv, g_scale, cw, dy)
  q = q / jnp.maximum(jnp.sum(cw), 1)
  coef, nu, window = _gradient_statistics(q, t, skip, nu_prev, window_prev,
                                          momentum, warmup_steps)
  dx = power_kernel.backward(x, None, inv, inv, g_scale, coef, cw, dy,
                             False, sums=False)[0]
  d_nu, d_window = _updates(has_data, q, nu, nu_prev, window, window_prev)
  return (dx, r * dscale, dbias, None, None, None, None, None, None, d_nu,
          d_window)


_un_fused.defvjp(_un_fused_fwd, _un_fused_bwd)


def _batch_second_moment(x: Array, mask: Array | None, axis_name: Any
                         ) -> tuple[Array, Array]:
  """(mean over real rows of x^2 [C], count); x carries no gradient."""
  if not power_kernel.usable(x, 'unified_norm') or axis_name is not None:
    return common.masked_row_mean(jnp.square(x), mask, axis_name)
  w = (jnp.ones(x.shape[:-1], x.dtype) if mask is None
       else mask.astype(x.dtype))
  count = jnp.sum(w)

  def fused(x, w):
    return power_kernel.stats(x, w, 0, 0.0)[1] / jnp.maximum(count, 1)

  def xla(x, w):
    return common.masked_row_mean(jnp.square(x), mask)[0]
  return power_kernel.on_cpu(fused, xla, x, w), count


def _scale_grad(scale: Array, r: Array) -> Array:
  """Equals `scale` exactly; its derivative with respect to scale is r.

  UN's dscale is sum(dy * r * z) while the forward uses scale * z. Written
  with stop_gradient rather than a custom_vjp so that vmap over batch groups
  (a batched r, an unbatched scale) stays correct.
  """
  r = jax.lax.stop_gradient(r)
  return (jax.lax.stop_gradient(scale) + scale * r
          - jax.lax.stop_gradient(scale * r))


def _forward_statistics(s, count, state, options):
  """sigma2, r, skip and the new forward window from s = mean_rows(x^2)."""
  dtype = s.dtype
  eps, warmup = options['eps'], options['warmup_steps']
  t = state.step + 1
  r_prev = state.running_var.astype(dtype)
  has_data = count > 0
  s = jnp.where(has_data, s, r_prev)
  window_prev = state.fwd_window.astype(dtype)
  m_f = window_prev.shape[0]
  if m_f > 1:
    rho = jnp.var(jnp.sqrt(window_prev), ddof=1)
  else:
    rho = jnp.asarray(jnp.nan, dtype)  # torch's var of one value
  slot = t % m_f
  window = window_prev.at[slot].set(s)
  skip = jnp.asarray(m_f <= 1)
  outlier = jnp.asarray(False)
  if options['outlier_filtration']:
    spread = jnp.mean(window, axis=0) - _geometric_mean(window)
    outlier = (t >= warmup) & jnp.any(spread > m_f * rho)
    window = jnp.where(outlier, window.at[slot].set(r_prev), window)
    skip = skip | outlier
  use_batch = (t <= m_f) | (t < warmup) | skip | ~has_data
  sigma2 = jnp.where(use_batch, s, _geometric_mean(window))
  clamp = options['compensation_clamp']
  r = jnp.sqrt(sigma2 + eps) / jnp.sqrt(r_prev + eps)
  r = jnp.where((t <= max(options['compensation_delay'], warmup)) | skip, 1.0,
                jnp.clip(r, 1 / clamp, clamp))
  return sigma2, r, skip, outlier, window


def _normalize(xf, grad_rows, params, stats, grad_stats, options, axis_name):
  """y = scale * x / sqrt(sigma2 + eps) + bias with UN's backward.

  `grad_rows` (None: every row) are the rows of q and of the correction.
  """
  dtype = xf.dtype
  momentum, warmup = options['momentum'], options['warmup_steps']
  r = stats[1]
  row_weight = None if grad_rows is None else grad_rows.astype(dtype)
  p = common.filled_params(params, xf.shape[-1], dtype)

  def xla_path(xf, scale, bias, *_):
    z = _un_core(xf, *stats, row_weight, *grad_stats, momentum, warmup,
                 axis_name)
    given = {'scale': _scale_grad(scale, r), 'bias': bias}
    return common.affine(z, {k: v for k, v in given.items() if k in params},
                         dtype)

  if not power_kernel.usable(xf, 'unified_norm') or axis_name is not None:
    return xla_path(xf, p['scale'], p['bias'])
  cw = jnp.ones(xf.shape[:-1], dtype) if row_weight is None else row_weight
  return power_kernel.on_cpu(
      lambda *a: _un_fused(*a, *stats, cw, *grad_stats, momentum, warmup),
      xla_path, xf, p['scale'], p['bias'])


def _unified_norm_train(x, mask, state, params, options, axis_name):
  """One batch group's UN training step ('padded': the mask is ignored;
  'official_masked': it selects the forward statistic's rows only)."""
  mean_over = options['mean_over']
  if mean_over == 'padded':
    mask = None
  dtype = common.stats_dtype(x)
  x, params, state = common.guard_backward_stats(
      x, params, state, options, 'unified_norm',
      UnifiedNormState.BACKWARD_FIELDS)
  xf = x.astype(dtype)
  s, count = _batch_second_moment(jax.lax.stop_gradient(xf), mask, axis_name)
  sigma2, r, skip, outlier, window = _forward_statistics(s, count, state,
                                                         options)
  t = state.step + 1
  update = (count > 0) & common.all_finite(s)
  stats = (sigma2 + options['eps'], r, skip, t)
  grad_stats = (update, state.ema_gz.astype(dtype),
                state.bwd_window.astype(dtype))
  grad_rows = mask
  if mean_over == 'official_masked' and mask is not None:
    # q and the correction over every row; none (as in 'valid') when the
    # batch has no real token, which is then normalised like evaluation.
    grad_rows = jnp.broadcast_to(count > 0, mask.shape)
  y = _normalize(xf, grad_rows, params, stats, grad_stats, options, axis_name)
  m = options['momentum']
  new = state._replace(
      running_var=m * state.running_var.astype(dtype) + (1 - m) * sigma2,
      fwd_window=window, step=t,
      skip_count=state.skip_count + outlier.astype(jnp.int32))
  return y, common.keep_if(update, new, state)


def _eval_affine(params, state, options, xp):
  """UN evaluation: scale * x / sqrt(R + eps) + bias."""
  del xp
  return nd.EvalAffine(
      scale=params['scale'] / (state.running_var + options['eps']) ** 0.5,
      center=None, bias=params['bias'], core=('none', {}))


UNIFIED_NORM = nd.register(nd.NormDefinition(
    kind='unified', name='unified_norm', module='UnifiedNorm',
    options=(
        nd.Option('window_size', 4, 'M, or (M_f, M_b) (official 4).',
                  check=rules.positive_int_or_pair()),
        nd.Option('warmup_steps', 4000, 'W (official 4000); 0: no warmup.',
                  check=rules.STEPS),
        nd.Option('momentum', 0.9, 'm for R and nu (0.9).',
                  check=rules.DECAY),
        nd.Option('eps', 1e-5, 'added to the statistics.', field='epsilon',
                  check=rules.EPS),
        nd.Option('outlier_filtration', False, 'the adaptive outlier filter '
                  '(official: off for translation, on for vision).',
                  check=rules.FLAG),
        nd.Option('compensation_delay', 1000, 'r stays 1 up to step '
                  'max(this, W) (official 1000).', check=rules.STEPS),
        nd.Option('compensation_clamp', 5.0, 'r is clipped to [1/c, c] '
                  '(official 5), so c >= 1; inf: no clipping.',
                  check=rules.number(1, math.inf)),
        nd.Option('mean_over', 'padded',
                  "'padded' (official as the NMT code calls it, without a "
                  'mask: every statistic over all rows, the mask is ignored, '
                  "so padding changes the statistics), 'valid' (real tokens "
                  'only; pads are normalised but get no correction term) or '
                  "'official_masked' (the official UN1d given a pad mask: "
                  'the forward statistic s over real tokens, the gradient '
                  'statistic q and the correction over every row).',
                  check=rules.one_of('padded', 'valid', 'official_masked')),
        nd.Option('num_batch_groups', 1, 'per-group statistics and state, '
                  'as in `power_norm`.', check=rules.COUNT),
        nd.Option('freeze_backward_stats', False,
                  common.FREEZE_BACKWARD_STATS_DOC, check=rules.FLAG),
    ),
    doc=UNIFIED_NORM_DOC,
    train=_unified_norm_train,
    init_state=lambda features, dtype, o: init_unified_norm_state(
        features, o['window_size'], dtype, o['num_batch_groups']),
    backward_stats=UnifiedNormState.BACKWARD_FIELDS,
    eval_affine=_eval_affine,
    probe=lambda x, state, options: (x, {'quad_mean': state.running_var}),
    state_maker='init_unified_norm_state',
))
unified_norm = UNIFIED_NORM.function
