"""PowerNorm with its approximate backward, and PN-V.

Shen, Yao, Gholami, Mahoney, Keutzer. "PowerNorm: Rethinking Batch
Normalization in Transformers", ICML 2020, https://arxiv.org/abs/2003.07845.
The semantics are those of the official code (sIncerass/powernorm,
`fairseq/modules/norms/mask_powernorm.py`), including its GroupScaling,
warmup and pad handling.

The official backward updates a buffer (`ema_gz`) in place. JAX has no
mutation, so `ema_gz` enters the custom_vjp core as an input and its update
comes back as that input's *cotangent*: differentiate the loss with respect
to `state.ema_gz` (the `'grad_stats'` collection of the Flax module) as well
as the parameters, then add the result to the state with
`normjax.apply_backward_stats`. It never goes through the optimizer.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from normjax._src import common, power_kernel
from normjax._src.layer_norm import check_num_groups, group_scale

Array = jax.Array


class PowerNormState(NamedTuple):
  """State of PowerNorm. Leaves are [features] (or [groups, features])."""
  running_phi: Array  # phi: running quadratic mean, init 1 (forward pass).
  ema_gz: Array       # u: running gradient statistic, init 0 (backward pass).
  step: Array         # t: int32 training forward calls so far, init 0.

  BACKWARD_FIELDS = ('ema_gz',)  # updated through their cotangents


def init_power_norm_state(features: int, dtype=jnp.float32,
                          num_batch_groups: int = 1) -> PowerNormState:
  state = PowerNormState(running_phi=jnp.ones((features,), dtype),
                         ema_gz=jnp.zeros((features,), dtype),
                         step=jnp.zeros((), jnp.int32))
  return common.group_state(state, num_batch_groups)


_BACKWARD = contextvars.ContextVar('power_norm_backward',
                                   default='approximate')


@contextlib.contextmanager
def power_norm_autodiff() -> Iterator[None]:
  """Within this block PowerNorm's `backward=None` means 'autodiff'.

  It acts at trace time: the functions traced inside use ordinary autodiff
  through PowerNorm's forward pass, which lets a train step compare the
  approximate gradient with the exact one of the same forward (the probes'
  `grad_cosine`) without a second model.
  """
  token = _BACKWARD.set('autodiff')
  try:
    yield
  finally:
    _BACKWARD.reset(token)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _pn_core(xs, denom, bwd_denom, row_weight, has_data, ema_gz, alpha_bkw,
             axis_name):
  """z = xs / denom, with the approximate backward of the official code.

  Args:
    xs: [..., C] GroupScaled input.
    denom: [C] normaliser of the forward pass.
    bwd_denom: [C] normaliser of the backward pass.
    row_weight: None (every row counts in the gradient statistic and gets the
      correction term, the official behaviour) or a 0/1 [...] array of the
      rows that do.
    has_data: bool scalar; without real tokens the statistic does not move.
    ema_gz: [C] u_{t-1}; the cotangent returned for it is u_t - u_{t-1}.
  """
  del bwd_denom, row_weight, has_data, ema_gz
  return xs / common.feat(denom, xs.ndim)


def _pn_core_fwd(xs, denom, bwd_denom, row_weight, has_data, ema_gz,
                 alpha_bkw, axis_name):
  z = xs / common.feat(denom, xs.ndim)
  return z, (z, bwd_denom, row_weight, has_data, ema_gz)


def _pn_core_bwd(alpha_bkw, axis_name, res, g):
  z, bwd_denom, row_weight, has_data, u = res
  # Without real tokens the step is an evaluation step: no correction.
  correction = common.feat(jnp.where(has_data, (1 - alpha_bkw) * u, 0),
                           z.ndim) * z
  if row_weight is not None:
    correction = correction * row_weight[..., None]
  g_hat = g - correction
  du, _ = common.masked_row_mean(g_hat * z, row_weight, axis_name)
  du = jnp.where(has_data, du, 0).astype(u.dtype)
  return g_hat / common.feat(bwd_denom, z.ndim), None, None, None, None, du


_pn_core.defvjp(_pn_core_fwd, _pn_core_bwd)


def _prescale(x: Array, dtype, use_group_scaling: bool, num_groups: int,
              group_scaling_eps: float) -> Array:
  """x in the statistics dtype, GroupScaled unless disabled."""
  x = x.astype(dtype)
  if use_group_scaling:
    return group_scale(x, num_groups, group_scaling_eps)
  return x


def _eval(x: Array, params: dict[str, Array], running_phi: Array, eps: float,
          prescale) -> Array:
  """scale * prescale(x) / sqrt(phi + eps) + bias: PowerNorm/PN-V evaluation."""
  dtype = common.stats_dtype(x)
  z = prescale(x) * common.feat(
      jax.lax.rsqrt(running_phi.astype(dtype) + eps), x.ndim)
  return common.affine(z, params, dtype).astype(x.dtype)


def power_norm(
    x: Array,
    params: common.Params,
    state: PowerNormState,
    *,
    mask: Array | None = None,
    use_running_average: bool = False,
    axis_name: Any = None,
    warmup_steps: int = 10000,
    alpha_fwd: float = 0.9,
    alpha_bkw: float = 0.9,
    eps: float = 1e-5,
    num_groups: int = 1,
    use_group_scaling: bool = True,
    group_scaling_eps: float = 1e-5,
    backward_denominator: str = 'batch',
    grad_mean_over: str = 'padded',
    num_batch_groups: int = 1,
    backward: str | None = None,
) -> tuple[Array, PowerNormState]:
  """PowerNorm (Shen et al., 2020, https://arxiv.org/abs/2003.07845).

  Training step t (t counts training calls, starting at 1):

      xs    = GroupScaling(x)                     per token, `num_groups`
      psi2  = mean_V(xs^2)                        real tokens V, no gradient
      d     = sqrt(psi2 + eps) if t <= W else sqrt(phi_{t-1} + eps)
      y     = scale * xs / d + bias               at every token
      phi   = phi (t-1)/t + psi2/t   if t < W     (cumulative average)
      phi   = a_f phi + (1 - a_f) psi2            (always, after the line above)

  Approximate backward, with g = scale * dy and z = xs / d:

      g_hat = g - (1 - a_b) u_{t-1} z
      u_t   = u_{t-1} + mean_rows(g_hat z)        every row, pads included
      dxs   = g_hat / sqrt(psi2 + eps)            the batch statistic, even
                                                  after warmup
      dscale = sum(dy z),  dbias = sum(dy),  dx = GroupScaling VJP of dxs.

  Evaluation: y = scale * GroupScaling(x) / sqrt(phi + eps) + bias.

  These are the official code's semantics. Where it differs from the paper's
  Algorithm 2 an option selects the paper's form:
  `backward_denominator='running'` divides the backward by the `d` of the
  forward pass, and `grad_mean_over='valid'` takes the gradient statistic over
  real tokens only (pads then get no correction term). With 'padded' the
  result depends on how much padding the batch carries, as fairseq's did.

  Args:
    x: [batch, ..., features].
    params: optional `{'scale', 'bias'}` of shape [features].
    state: a `PowerNormState` (see `init_power_norm_state`).
    mask: True for real tokens, broadcastable to `x.shape[:-1]`.
    use_running_average: evaluation mode; the state is returned unchanged.
    axis_name: mesh axis name(s) for `shard_map`/`pmap`, over which the
      forward statistic and the gradient statistic are summed. Not needed
      under `jax.jit`, where a sharded batch already gives global statistics.
    warmup_steps: W; official class default 10000, the fairseq layers use the
      learning-rate warmup (8000), the final stack norm 1000.
    alpha_fwd, alpha_bkw: decays of phi and u (official 0.9, 0.9).
    eps: added to the quadratic mean (1e-5).
    num_groups: GroupScaling groups (the official runs use the head count).
    use_group_scaling: False drops GroupScaling (an ablation).
    group_scaling_eps: GroupScaling's eps (hard-wired to 1e-5 officially).
    backward_denominator: 'batch' (official) or 'running' (paper).
    grad_mean_over: 'padded' (official) or 'valid' (paper).
    backward: 'approximate' (the rule above) or 'autodiff': exact autodiff
      of the same forward pass (through psi2 in warmup; after it phi_{t-1}
      is a constant), leaving u unchanged. None: 'approximate', or
      'autodiff' inside `normjax.functional.power_norm_autodiff()`.
    num_batch_groups: split the batch axis into this many groups, each with
      its own statistics and state, to reproduce the official per-GPU
      behaviour whatever the device count. Evaluation uses group 0's state,
      as the official checkpoints held rank 0's buffers.

  Returns:
    `(y, new_state)`, `y` in the dtype of `x`. `new_state.ema_gz` is
    `state.ema_gz`: its update is the cotangent of `state.ema_gz` (see the
    module docstring). A batch without real tokens is normalised with phi and
    leaves the whole state unchanged.
  """
  fn = 'power_norm'
  x = common.check_input(x, fn, min_rank=2)
  features = x.shape[-1]
  params = common.check_params(params, features, fn)
  mask = common.check_mask(mask, x, fn)
  if use_group_scaling:
    check_num_groups(num_groups, features, fn)
  common.check_choice(backward_denominator, 'backward_denominator',
                      ('batch', 'running'), fn)
  common.check_choice(grad_mean_over, 'grad_mean_over', ('padded', 'valid'), fn)
  backward = _BACKWARD.get() if backward is None else backward
  common.check_choice(backward, 'backward', ('approximate', 'autodiff'), fn)
  dtype = common.stats_dtype(x)
  scaled = functools.partial(_prescale, dtype=dtype,
                             use_group_scaling=use_group_scaling,
                             num_groups=num_groups,
                             group_scaling_eps=group_scaling_eps)
  if use_running_average:
    st = common.first_group(state, num_batch_groups)
    common.check_state(st, init_power_norm_state(features), fn,
                       'init_power_norm_state')
    return _eval(x, params, st.running_phi, eps, scaled), state
  common.check_state(
      state, init_power_norm_state(features, num_batch_groups=num_batch_groups),
      fn, 'init_power_norm_state')

  def xla_train(xg, maskg, st, t, scale, bias):
    """(y, psi2) of the approximate rule, in jnp."""
    xs = scaled(xg)
    phi_prev = st.running_phi.astype(dtype)
    psi2, count = common.masked_row_mean(
        jnp.square(jax.lax.stop_gradient(xs)), maskg, axis_name)
    has_data = count > 0
    psi2 = jnp.where(has_data, psi2, phi_prev)
    batch_denom = jnp.sqrt(psi2 + eps)
    denom = jnp.where(t <= warmup_steps, batch_denom, jnp.sqrt(phi_prev + eps))
    bwd_denom = batch_denom if backward_denominator == 'batch' else denom
    row_weight = None
    if grad_mean_over == 'valid' and maskg is not None:
      row_weight = maskg.astype(dtype)
    z = _pn_core(xs, denom, bwd_denom, row_weight, has_data,
                 st.ema_gz.astype(dtype), alpha_bkw, axis_name)
    p = {k: v for k, v in (('scale', scale), ('bias', bias)) if k in params}
    return common.affine(z, p, dtype), psi2

  def approximate(xg, maskg, st, t):
    c = xg.shape[-1]
    scale = params.get('scale', jnp.ones((c,), dtype)).astype(dtype)
    bias = params.get('bias', jnp.zeros((c,), dtype)).astype(dtype)
    xf = xg.astype(dtype)
    if not power_kernel.usable(xf, 'power_norm') or axis_name is not None:
      return xla_train(xf, maskg, st, t, scale, bias)
    ones = jnp.ones(xf.shape[:-1], dtype)
    stat_w = ones if maskg is None else maskg.astype(dtype)
    cw = stat_w if grad_mean_over == 'valid' else ones
    opts = power_kernel.PowerNormOptions(
        warmup_steps, alpha_bkw, eps, num_groups if use_group_scaling else 0,
        group_scaling_eps, backward_denominator == 'running')
    return power_kernel.on_cpu(
        lambda *a: power_kernel.power_norm_train(*a, opts),
        lambda x_, s_, b_, *_: xla_train(x_, maskg, st, t, s_, b_),
        xf, scale, bias, stat_w, cw, st.running_phi.astype(dtype),
        st.ema_gz.astype(dtype), t)

  def train(xg, maskg, st):
    t = st.step + 1
    phi_prev = st.running_phi.astype(dtype)
    if backward == 'autodiff':
      xs = scaled(xg)
      psi2, count = common.masked_row_mean(jnp.square(xs), maskg, axis_name)
      psi2 = jnp.where(count > 0, psi2, phi_prev)
      denom = jnp.where(t <= warmup_steps, jnp.sqrt(psi2 + eps),
                        jnp.sqrt(phi_prev + eps))
      y = common.affine(xs / common.feat(denom, xs.ndim), params, dtype)
      psi2 = jax.lax.stop_gradient(psi2)
    else:
      y, psi2 = approximate(xg, maskg, st, t)
    count = (jnp.asarray(xg.size // xg.shape[-1]) if maskg is None
             else jnp.sum(maskg))
    if axis_name is not None:
      count = jax.lax.psum(count, axis_name)
    has_data = count > 0
    tf = t.astype(dtype)
    phi = jnp.where(t < warmup_steps, phi_prev * (tf - 1) / tf + psi2 / tf,
                    phi_prev)
    phi = alpha_fwd * phi + (1 - alpha_fwd) * psi2
    new = st._replace(running_phi=phi, step=t)
    return y.astype(x.dtype), common.keep_if(has_data, new, st)

  return common.apply_grouped(train, num_batch_groups, x, mask, state,
                              name=fn)


class PNVState(NamedTuple):
  """State of PN-V: the running quadratic mean used only for evaluation."""
  running_phi: Array  # [features] EMA of the batch quadratic mean, init 1.


def init_pn_v_state(features: int, dtype=jnp.float32,
                    num_batch_groups: int = 1) -> PNVState:
  return common.group_state(PNVState(running_phi=jnp.ones((features,), dtype)),
                            num_batch_groups)


def pn_v(
    x: Array,
    params: common.Params,
    state: PNVState,
    *,
    mask: Array | None = None,
    use_running_average: bool = False,
    axis_name: Any = None,
    momentum: float = 0.9,
    eps: float = 1e-5,
    num_groups: int = 1,
    use_group_scaling: bool = True,
    group_scaling_eps: float = 1e-5,
    num_batch_groups: int = 1,
) -> tuple[Array, PNVState]:
  """PN-V: batch quadratic-mean normalisation (Shen et al., 2020, §4.1, https://arxiv.org/abs/2003.07845).

  The paper's first step from BatchNorm to PowerNorm: no mean-centring, the
  current batch's quadratic mean in training and ordinary (exact) autodiff
  through it; a running average serves evaluation only.

      xs   = GroupScaling(x)                  (as PowerNorm; optional)
      psi2 = mean_V(xs^2)                     over real tokens V
      y    = scale * xs / sqrt(psi2 + eps) + bias
      phi  = momentum * phi + (1 - momentum) * psi2
      eval: y = scale * xs / sqrt(phi + eps) + bias

  The official repository ships no PN-V; GroupScaling and momentum 0.9 are
  kept from PowerNorm for parity. Arguments as in `power_norm`.
  """
  fn = 'pn_v'
  x = common.check_input(x, fn, min_rank=2)
  features = x.shape[-1]
  params = common.check_params(params, features, fn)
  mask = common.check_mask(mask, x, fn)
  if use_group_scaling:
    check_num_groups(num_groups, features, fn)
  dtype = common.stats_dtype(x)
  scaled = functools.partial(_prescale, dtype=dtype,
                             use_group_scaling=use_group_scaling,
                             num_groups=num_groups,
                             group_scaling_eps=group_scaling_eps)
  if use_running_average:
    st = common.first_group(state, num_batch_groups)
    common.check_state(st, init_pn_v_state(features), fn, 'init_pn_v_state')
    return _eval(x, params, st.running_phi, eps, scaled), state
  common.check_state(
      state, init_pn_v_state(features, num_batch_groups=num_batch_groups), fn,
      'init_pn_v_state')

  def train(xg, maskg, st):
    xs = scaled(xg)
    psi2, count = common.masked_row_mean(jnp.square(xs), maskg, axis_name)
    has_data = count > 0
    psi2 = jnp.where(has_data, psi2, st.running_phi.astype(dtype))
    y = common.affine(xs * common.feat(jax.lax.rsqrt(psi2 + eps), xs.ndim),
                      params, dtype)
    phi = (momentum * st.running_phi
           + (1 - momentum) * jax.lax.stop_gradient(psi2))
    return (y.astype(x.dtype),
            common.keep_if(has_data, PNVState(running_phi=phi), st))

  return common.apply_grouped(train, num_batch_groups, x, mask, state,
                              name=fn)
