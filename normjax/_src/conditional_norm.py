"""Conditional norms: adaLN-Zero (DiT) and TD-LN / TD-RMSNorm (DiMR).

Both take, besides `x`, a conditioning input: adaLN-Zero the modulation
vectors (shift, scale, gate) that a zero-initialised projection computes
from a conditioning vector, TD-LN the time tau. They keep the functional
signature `f(x, params, state, *, mask, ...) -> (y, state)` with the
conditioning as a required keyword, but not the slot signature of the Flax
modules (`norm(x, use_running_average, mask=)`): their modules are called
`norm(x, cond)`. Zoo spec section 8.

Conditioning shapes: a vector conditioning has shape [*lead, K] and a
scalar one (tau) shape [*lead], where `lead` is a prefix of the token shape
x.shape[:-1] (each entry equal or 1): [B] per example for x [B, L, C],
[B, L] per token, [] for the whole batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from normjax._src import common
from normjax._src import layer_norm as ln_lib

Array = jax.Array

TD_FIELDS = ('param0', 'param1', 'nodecay_weight', 'nodecay_bias')


def _lead_fits(lead: tuple[int, ...], x: Array) -> bool:
  token_shape = tuple(x.shape[:-1])
  return len(lead) <= len(token_shape) and all(
      a in (1, b) for a, b in zip(lead, token_shape))


def _floating(v: Any, name: str, fn: str) -> Array:
  if not hasattr(v, 'dtype') or not hasattr(v, 'shape'):
    v = jnp.asarray(v)
  if not jnp.issubdtype(v.dtype, jnp.floating):
    raise TypeError(f'{fn}: `{name}` must be a floating-point array, got '
                    f'dtype {v.dtype}.')
  return v


def check_cond(cond: Any, x: Array, fn: str, name: str = 'cond',
               features: int | None = None) -> Array:
  """Checks a vector conditioning [*lead, K] against `x` [..., C].

  `features`, when given, is the K it must have (C for shift/scale/gate).
  """
  cond = _floating(cond, name, fn)
  if cond.ndim < 1 or not _lead_fits(tuple(cond.shape[:-1]), x) or (
      features is not None and cond.shape[-1] != features):
    k = 'K' if features is None else str(features)
    per_example = ', '.join(map(str, x.shape[:1])) + f', {k}'
    per_token = ', '.join(map(str, x.shape[:-1])) + f', {k}'
    raise ValueError(
        f'{fn}: `{name}` has shape {tuple(cond.shape)}, expected '
        f'[*lead, {k}] with lead a prefix of the token shape x.shape[:-1] = '
        f'{tuple(x.shape[:-1])}: [{per_example}] for one vector per '
        f'example or [{per_token}] per token.')
  return cond


def check_tau(tau: Any, x: Array, fn: str, name: str = 'tau') -> Array:
  """Checks a scalar conditioning [*lead] against `x` [..., C]."""
  tau = _floating(tau, name, fn)
  if not _lead_fits(tuple(tau.shape), x):
    raise ValueError(
        f'{fn}: `{name}` has shape {tuple(tau.shape)}, expected a prefix of '
        f'the token shape x.shape[:-1] = {tuple(x.shape[:-1])}: () for the '
        f'whole batch, {tuple(x.shape[:1])} per example, or '
        f'{tuple(x.shape[:-1])} per token.')
  return tau


def expand(v: Array, ndim: int) -> Array:
  """[*lead, C] -> [*lead, 1, ..., 1, C] of rank `ndim` (explicit broadcast)."""
  lead = tuple(v.shape[:-1])
  return v.reshape(lead + (1,) * (ndim - 1 - len(lead)) + v.shape[-1:])


def modulate(x: Array, shift: Array, scale: Array) -> Array:
  """DiT's `modulate`: x * (1 + scale) + shift, conditioning broadcast over
  the token axes; computed in float32 (float64) and returned in x's dtype."""
  fn = 'modulate'
  x = common.check_input(x, fn)
  shift = check_cond(shift, x, fn, 'shift', x.shape[-1])
  scale = check_cond(scale, x, fn, 'scale', x.shape[-1])
  dtype = common.stats_dtype(x)
  return _modulate(x.astype(dtype), shift, scale, dtype).astype(x.dtype)


def _modulate(x, shift, scale, dtype):
  return (x * (1 + expand(scale.astype(dtype), x.ndim))
          + expand(shift.astype(dtype), x.ndim))


def gated_residual(x: Array, branch: Array, gate: Array) -> Array:
  """adaLN-Zero's residual update x + gate * branch (gate [*lead, C])."""
  fn = 'gated_residual'
  x = common.check_input(x, fn)
  branch = _floating(branch, 'branch', fn)
  if branch.shape != x.shape:
    raise ValueError(f'{fn}: `branch` has shape {tuple(branch.shape)}, '
                     f'expected the shape of `x` {tuple(x.shape)}.')
  gate = check_cond(gate, x, fn, 'gate', x.shape[-1])
  dtype = jnp.result_type(x, branch, gate)
  return x + expand(gate, x.ndim).astype(dtype) * branch


def _normalized(x: Array, dtype, center: bool) -> Array:
  """LayerNorm (center) or RMSNorm statistics without eps: (values, moment)."""
  # pylint: disable-next=protected-access
  return ln_lib._centered_and_var(x.astype(dtype), (x.ndim - 1,), None, None,
                                  center)


def ada_ln_zero(
    x: Array,
    params: Any = None,
    state: Any = None,
    *,
    shift: Array,
    scale: Array,
    mask: Array | None = None,
    eps: float = 1e-6,
    use_running_average: bool = False,
    axis_name: Any = None,
) -> tuple[Array, Any]:
  """adaLN(-Zero) of DiT.

  Peebles & Xie, "Scalable Diffusion Models with Transformers", ICCV 2023,
  https://arxiv.org/abs/2212.09748:

      y = LN(x) * (1 + scale) + shift,  LN without affine (eps 1e-6),

  and the block uses it as x <- x + gate * F(y) (`gated_residual`), where
  (shift, scale, gate) = Linear(SiLU(c)) with the Linear's weight and bias
  initialised to zero ("Zero": at init y = LN(x) and gate = 0, so every
  block is the identity). This function takes the modulation vectors; the
  module `AdaLNZero` holds the projection and returns the gate as well.

  Args:
    x: [..., C] activations.
    params: must be None (or empty): the LayerNorm of adaLN has no affine,
      the modulation supplies it.
    state: returned unchanged.
    shift, scale: [*lead, C] modulation, lead a prefix of x.shape[:-1]
      ([B, C] per example, [B, L, C] per token).
    mask: validated only; pads are normalised like any other token.
    eps: LayerNorm eps (DiT's 1e-6).
    use_running_average, axis_name: ignored.
  """
  del use_running_average, axis_name
  fn = 'ada_ln_zero'
  x = common.check_input(x, fn)
  if params:
    raise ValueError(
        f'{fn}: `params` must be None: the LayerNorm of adaLN has no affine '
        f'(the modulation shift/scale is the affine), got keys '
        f'{sorted(params)}.')
  common.check_mask(mask, x, fn)
  shift = check_cond(shift, x, fn, 'shift', x.shape[-1])
  scale = check_cond(scale, x, fn, 'scale', x.shape[-1])
  dtype = common.stats_dtype(x)
  centered, var = _normalized(x, dtype, True)
  y = _modulate(centered * jax.lax.rsqrt(var + eps), shift, scale, dtype)
  return y.astype(x.dtype), state


# ---------------------------------------------------------------------------
# TD-LN (DiMR).


def dimr_tau(log_snr: Array) -> Array:
  """DiMR's time input tau = logSNR / 4 (`TimeDependentParameter.seed_time`).
  """
  return jnp.asarray(log_snr) / 4.0


def init_td_params(features: int, *, use_scale: bool = True,
                   use_bias: bool = True, dtype=jnp.float32) -> dict:
  """Fresh TD-LN params: p0 = p1 = the norm's init (1 for scale, 0 for bias),
  nodecay_weight = 0 (w = 1 + nodecay_weight = 1), nodecay_bias = 0."""
  def td(value):
    full = jnp.full((features,), value, dtype)
    zeros = jnp.zeros((features,), dtype)
    return {'param0': full, 'param1': full, 'nodecay_weight': zeros,
            'nodecay_bias': zeros}
  params = {}
  if use_scale:
    params['scale'] = td(1.0)
  if use_bias:
    params['bias'] = td(0.0)
  return params


def td_parameter(p: Mapping[str, Array], tau: Array) -> Array:
  """p(tau) = p1 + sigmoid(w * tau + b) * (p0 - p1), w = 1 + nodecay_weight,
  b = nodecay_bias, elementwise (DiMR `tdp_torch`). [*tau.shape, C]."""
  dtype = jnp.promote_types(jnp.result_type(*p.values(), tau), jnp.float32)
  p0, p1, w_raw, b = (p[k].astype(dtype) for k in TD_FIELDS)
  t = jnp.asarray(tau, dtype)[..., None]  # [*lead, 1]

  def r(v):  # [C] -> [1, ..., 1, C] of the rank of t
    return v.reshape((1,) * (t.ndim - 1) + v.shape)

  return r(p1) + jax.nn.sigmoid(t * r(1 + w_raw) + r(b)) * r(p0 - p1)


def _check_td_params(params: Any, features: int, fn: str) -> dict:
  if params is None:
    return {}
  if not isinstance(params, Mapping):
    raise TypeError(
        f"{fn}: `params` must be a mapping with optional keys 'scale' and "
        f"'bias' (or None), got {type(params).__name__}.")
  unknown = set(params) - {'scale', 'bias'}
  if unknown:
    raise ValueError(
        f"{fn}: `params` has unknown keys {sorted(unknown)}; expected only "
        f"'scale' and 'bias', each a dict of {list(TD_FIELDS)} "
        f'(see init_td_params).')
  out = {}
  for name, sub in params.items():
    path = f"params['{name}']"
    sub = common.check_named_params(
        sub, fn, {k: (features,) for k in TD_FIELDS}, features, path)
    missing = [k for k in TD_FIELDS if k not in sub]
    if missing:
      raise ValueError(
          f'{fn}: `{path}` lacks {missing}; a time-dependent parameter has '
          f'all of {list(TD_FIELDS)} (see init_td_params).')
    out[name] = sub
  return out


def _td_norm(fn, center, x, params, state, tau, mask, eps, eps_outside):
  x = common.check_input(x, fn)
  params = _check_td_params(params, x.shape[-1], fn)
  common.check_mask(mask, x, fn)
  tau = check_tau(tau, x, fn)
  dtype = common.stats_dtype(x)
  values, moment = _normalized(x, dtype, center)
  if eps_outside:  # DiMR/bzhang torch RMSNorm: x / (rms + eps)
    positive = moment > 0
    rms = jnp.where(positive, jnp.sqrt(jnp.where(positive, moment, 1)), 0)
    z = values / (rms + eps)
  else:
    z = values * jax.lax.rsqrt(moment + eps)
  if 'scale' in params:
    z = z * expand(td_parameter(params['scale'], tau).astype(dtype), x.ndim)
  if 'bias' in params:
    z = z + expand(td_parameter(params['bias'], tau).astype(dtype), x.ndim)
  return z.astype(x.dtype), state


def td_layer_norm(
    x: Array,
    params: Any = None,
    state: Any = None,
    *,
    tau: Array,
    mask: Array | None = None,
    eps: float = 1e-5,
    use_running_average: bool = False,
    axis_name: Any = None,
) -> tuple[Array, Any]:
  """Time-dependent LayerNorm (TD-LN) of DiMR.

  Liu et al., "Alleviating Distortion in Image Generation via
  Multi-Resolution Diffusion Models", NeurIPS 2024,
  https://arxiv.org/abs/2406.09416:

      y = LN(x) * scale(tau) + bias(tau),
      p(tau) = p1 + sigmoid(w * tau + b) * (p0 - p1),   w = 1 + w_raw,

  elementwise for each affine vector p in {scale, bias} (zoo spec
  section 8): 4C parameters per vector, p0 = p1 = the LN init, w_raw = b =
  0 (`init_td_params`), so at init the output is plain LN for every tau.
  DiMR's tau is logSNR / 4 (`dimr_tau`). Compared with adaLN, whose
  modulation is a full linear map of the conditioning vector (6C^2 per
  block), TD-LN is adaLN with shift = bias(tau) and 1 + scale = scale(tau):
  a per-feature sigmoid interpolation between two learnt endpoints.

  Args:
    x: [..., C] activations.
    params: `{'scale': td, 'bias': td}` (each optional), td =
      `{'param0', 'param1', 'nodecay_weight', 'nodecay_bias'}` of shape [C];
      the `nodecay_` leaves are excluded from weight decay in DiMR.
    state: returned unchanged.
    tau: time, shape a prefix of x.shape[:-1] ([] or [B] or [B, L]).
    mask: validated only; pads are normalised like any other token.
    eps: inside the sqrt, as torch's layer_norm (DiMR's 1e-5).
    use_running_average, axis_name: ignored.
  """
  del use_running_average, axis_name
  return _td_norm('td_layer_norm', True, x, params, state, tau, mask, eps,
                  False)


def td_rms_norm(
    x: Array,
    params: Any = None,
    state: Any = None,
    *,
    tau: Array,
    mask: Array | None = None,
    eps: float = 1e-8,
    use_running_average: bool = False,
    axis_name: Any = None,
) -> tuple[Array, Any]:
  """TDRMSNorm of DiMR (the norm of its released configs, `norm_type='TDRMSN'`).

      y = x / (sqrt(mean(x^2)) + eps) * scale(tau) (+ bias(tau))

  with eps **outside** the sqrt (DiMR copies the torch RMSNorm of Zhang &
  Sennrich, eps 1e-8) and p(tau) as in `td_layer_norm`; DiMR has no bias by
  default. The gradient at an all-zero token is that of torch (finite).
  Arguments as in `td_layer_norm`.
  """
  del use_running_average, axis_name
  return _td_norm('td_rms_norm', False, x, params, state, tau, mask, eps,
                  True)


def adaln_modulation(cond: Array, kernel: Array, bias: Array, x: Array,
                     fn: str = 'adaln_modulation') -> tuple[Array, ...]:
  """(shift, scale[, gate]) = split(SiLU(cond) @ kernel + bias), DiT's
  `adaLN_modulation` (SiLU then Linear) for one norm site.

  `cond` [*lead, K], `kernel` [K, n, C] and `bias` [n, C] with n = 3
  (shift, scale, gate, in DiT's chunk order) or 2 (no gate, DiT's final
  layer); returns n arrays [*lead, C] in float32 (float64).
  """
  cond = check_cond(cond, x, fn)
  c = x.shape[-1]
  if kernel.ndim != 3 or kernel.shape[0] != cond.shape[-1] or (
      kernel.shape[2] != c or kernel.shape[1] not in (2, 3)):
    raise ValueError(
        f'{fn}: the modulation kernel has shape {tuple(kernel.shape)}, '
        f'expected ({cond.shape[-1]}, 3 or 2, {c}) for `cond` with '
        f'{cond.shape[-1]} features and `x` with {c}.')
  if tuple(bias.shape) != tuple(kernel.shape[1:]):
    raise ValueError(f'{fn}: the modulation bias has shape '
                     f'{tuple(bias.shape)}, expected {kernel.shape[1:]}.')
  dtype = jnp.promote_types(jnp.result_type(cond, kernel, bias), jnp.float32)
  h = jax.nn.silu(cond.astype(dtype))
  mod = jnp.einsum('...k,knc->...nc', h, kernel.astype(dtype))
  mod = mod + bias.astype(dtype).reshape((1,) * (mod.ndim - 2) + bias.shape)
  return tuple(mod[..., i, :] for i in range(kernel.shape[1]))
