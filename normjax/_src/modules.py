"""Flax linen modules: thin wrappers over the functional norms, no math here.

Each module is a drop-in for flax.linen's LayerNorm/BatchNorm conventions:
`epsilon`, `use_scale`/`use_bias`, `scale_init`/`bias_init`, `dtype`,
`param_dtype`, `use_running_average` (in the constructor or the call, as
`nn.BatchNorm`), params `scale`/`bias`, running statistics in `batch_stats`.
Statistics that the backward pass updates (PowerNorm's `ema_gz`, UN's
`ema_gz`/`bwd_window`) live in the `grad_stats` collection: differentiate
the loss with respect to it and fold the result back with
`normjax.apply_backward_stats`; never hand it to the optimizer.

Every module of `MODULES` is called as
`module(x, use_running_average=None, *, mask=None)`, so any norm can be
injected where another was. The conditional norms (`CONDITIONAL_MODULES`:
AdaLNZero, TDLayerNorm, TDRMSNorm) are called `module(x, cond, *, mask=None)`
and QKNorm `module(q, k)`: they are wired by hand. `dtype=None` returns the
dtype of `x` (flax would promote bf16 activations to the float32 of the
params).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from normjax._src import batch_norm as bn_lib
from normjax._src import conditional_norm as cond_lib
from normjax._src import dyt as dyt_lib
from normjax._src import group_norm as gn_lib
from normjax._src import layer_norm as ln_lib
from normjax._src import power_norm as pn_lib
from normjax._src import probes
from normjax._src import qk_norm as qk_lib
from normjax._src import unified_norm as un_lib

Array = jax.Array
Initializer = Callable[..., Array]

BATCH_STATS = 'batch_stats'
GRAD_STATS = 'grad_stats'


class _Norm(nn.Module):
  """Fields shared by every normjax module (flax.linen names)."""
  epsilon: float = 1e-6
  dtype: Any = None
  param_dtype: Any = jnp.float32
  use_scale: bool = True
  use_bias: bool = True
  scale_init: Initializer = nn.initializers.ones
  bias_init: Initializer = nn.initializers.zeros
  axis_name: Any = None
  param_axes: tuple[str, ...] = ('embed',)

  def _params(self, features: int) -> dict[str, Array]:
    return _affine_params(self, features)

  def _out(self, y: Array) -> Array:
    return y if self.dtype is None else y.astype(self.dtype)


def _affine_params(module: nn.Module, features: int) -> dict[str, Array]:
  """`scale`/`bias` [features] as the module's use_/_init fields say."""
  params = {}
  if module.use_scale:
    params['scale'] = module.param(
        'scale', nn.with_logical_partitioning(module.scale_init,
                                              module.param_axes),
        (features,), module.param_dtype)
  if module.use_bias:
    params['bias'] = module.param(
        'bias', nn.with_logical_partitioning(module.bias_init,
                                             module.param_axes),
        (features,), module.param_dtype)
  return params


class _StatefulNorm(_Norm):
  """Reads state variables, calls the function, writes the forward state."""
  epsilon: float = 1e-5
  use_running_average: bool | None = None
  num_batch_groups: int = 1

  def _function(self) -> Callable[..., tuple[Array, Any]]:
    raise NotImplementedError

  def _fresh_state(self, features: int) -> Any:
    raise NotImplementedError

  def _options(self) -> dict[str, Any]:
    raise NotImplementedError

  def _probe_statistics(self, x: Array, state: Any
                        ) -> tuple[Array, dict[str, Array]]:
    """(input as the statistics see it, {statistic: running value})."""
    raise NotImplementedError

  @nn.compact
  def __call__(self, x: Array, use_running_average: bool | None = None, *,
               mask: Array | None = None) -> Array:
    use_running_average = nn.merge_param(
        'use_running_average', self.use_running_average, use_running_average)
    features = jnp.shape(x)[-1]
    params = self._params(features)
    fresh = self._fresh_state(features)
    backward = getattr(fresh, 'BACKWARD_FIELDS', ())
    variables = {}
    for name in fresh._fields:
      value = getattr(fresh, name)
      axes = ((None,) * (value.ndim - 1) + tuple(self.param_axes)
              if value.ndim else ())
      init = nn.with_logical_partitioning(lambda v=value: v, axes)
      variables[name] = self.variable(
          GRAD_STATS if name in backward else BATCH_STATS, name, init)
    state = type(fresh)(**{k: v.value for k, v in variables.items()})
    if not use_running_average and self.is_mutable_collection(
        probes.PROBES):
      seen, running = self._probe_statistics(x, state)
      probes.record(self, x, mask, running, statistics_input=seen)
    y, new_state = self._function()(
        x, params, state, mask=mask, use_running_average=use_running_average,
        axis_name=self.axis_name, num_batch_groups=self.num_batch_groups,
        eps=self.epsilon, **self._options())
    if not self.is_initializing() and not use_running_average:
      for name in fresh._fields:
        if name not in backward:
          variables[name].value = getattr(new_state, name)
    return self._out(y)


class LayerNorm(_Norm):
  """LayerNorm over `reduction_axes`; wraps `normjax.functional.layer_norm`."""
  reduction_axes: Any = -1

  @nn.compact
  def __call__(self, x: Array, use_running_average: bool | None = None, *,
               mask: Array | None = None) -> Array:
    del use_running_average
    probes.record(self, x, mask)
    y, _ = ln_lib.layer_norm(
        x, self._params(jnp.shape(x)[-1]), mask=mask, axis=self.reduction_axes,
        eps=self.epsilon, axis_name=self.axis_name)
    return self._out(y)


class RMSNorm(_Norm):
  """RMSNorm; wraps `normjax.functional.rms_norm`. Only `scale` by default."""
  use_bias: bool = False
  reduction_axes: Any = -1

  @nn.compact
  def __call__(self, x: Array, use_running_average: bool | None = None, *,
               mask: Array | None = None) -> Array:
    del use_running_average
    probes.record(self, x, mask)
    y, _ = ln_lib.rms_norm(
        x, self._params(jnp.shape(x)[-1]), mask=mask, axis=self.reduction_axes,
        eps=self.epsilon, axis_name=self.axis_name)
    return self._out(y)


class GroupScaling(_Norm):
  """PowerNorm's GroupScaling alone; wraps `normjax.functional.group_scaling`."""
  epsilon: float = 1e-5
  num_groups: int = 1
  use_scale: bool = False
  use_bias: bool = False

  @nn.compact
  def __call__(self, x: Array, use_running_average: bool | None = None, *,
               mask: Array | None = None) -> Array:
    del use_running_average, mask
    y, _ = ln_lib.group_scaling(x, self._params(jnp.shape(x)[-1]),
                                num_groups=self.num_groups, eps=self.epsilon)
    return self._out(y)


class BatchNorm(_StatefulNorm):
  """Masked BatchNorm; wraps `normjax.functional.batch_norm`."""
  momentum: float = 0.99

  def _function(self):
    return bn_lib.batch_norm

  def _fresh_state(self, features):
    return bn_lib.init_batch_norm_state(features, jnp.float32,
                                        self.num_batch_groups)

  def _options(self):
    return dict(momentum=self.momentum)

  def _probe_statistics(self, x, state):
    return x, {'mean': state.mean, 'var': state.var}


def _group_scaled(module: nn.Module, x: Array) -> Array:
  """PowerNorm's/PN-V's input as their statistics see it."""
  return pn_lib._prescale(  # pylint: disable=protected-access
      x, jnp.float32, module.use_group_scaling, module.num_groups,
      module.group_scaling_eps)


class PowerNorm(_StatefulNorm):
  """PowerNorm; wraps `normjax.functional.power_norm` (see its docstring)."""
  warmup_steps: int = 10000
  alpha_fwd: float = 0.9
  alpha_bkw: float = 0.9
  num_groups: int = 1
  use_group_scaling: bool = True
  group_scaling_eps: float = 1e-5
  backward_denominator: str = 'batch'
  grad_mean_over: str = 'padded'
  backward: str | None = None  # None: 'approximate' (see power_norm)

  def _function(self):
    return pn_lib.power_norm

  def _fresh_state(self, features):
    return pn_lib.init_power_norm_state(features, jnp.float32,
                                        self.num_batch_groups)

  def _options(self):
    return dict(warmup_steps=self.warmup_steps, alpha_fwd=self.alpha_fwd,
                alpha_bkw=self.alpha_bkw, num_groups=self.num_groups,
                use_group_scaling=self.use_group_scaling,
                group_scaling_eps=self.group_scaling_eps,
                backward_denominator=self.backward_denominator,
                grad_mean_over=self.grad_mean_over, backward=self.backward)

  def _probe_statistics(self, x, state):
    return _group_scaled(self, x), {'quad_mean': state.running_phi}


class PNV(_StatefulNorm):
  """PN-V; wraps `normjax.functional.pn_v`."""
  momentum: float = 0.9
  num_groups: int = 1
  use_group_scaling: bool = True
  group_scaling_eps: float = 1e-5

  def _function(self):
    return pn_lib.pn_v

  def _fresh_state(self, features):
    return pn_lib.init_pn_v_state(features, jnp.float32,
                                  self.num_batch_groups)

  def _options(self):
    return dict(momentum=self.momentum, num_groups=self.num_groups,
                use_group_scaling=self.use_group_scaling,
                group_scaling_eps=self.group_scaling_eps)

  def _probe_statistics(self, x, state):
    return _group_scaled(self, x), {'quad_mean': state.running_phi}


class UnifiedNorm(_StatefulNorm):
  """Unified Normalization; wraps `normjax.functional.unified_norm`."""
  window_size: Any = 4
  warmup_steps: int = 4000
  momentum: float = 0.9
  outlier_filtration: bool = False
  compensation_delay: int = 1000
  compensation_clamp: float = 5.0
  mean_over: str = 'padded'

  def _function(self):
    return un_lib.unified_norm

  def _fresh_state(self, features):
    return un_lib.init_unified_norm_state(features, self.window_size,
                                          jnp.float32, self.num_batch_groups)

  def _options(self):
    return dict(window_size=self.window_size, warmup_steps=self.warmup_steps,
                momentum=self.momentum,
                outlier_filtration=self.outlier_filtration,
                compensation_delay=self.compensation_delay,
                compensation_clamp=self.compensation_clamp,
                mean_over=self.mean_over)

  def _probe_statistics(self, x, state):
    return x, {'quad_mean': state.running_var}


class DyT(nn.Module):
  """Dynamic Tanh; wraps `normjax.functional.dyt`. No epsilon, no statistics.

  `alpha_init` is alpha_0, a float or a site name of `dyt_alpha_init`
  ('default', 'attention', 'ffn', 'final'), resolved with the width of `x`
  (the LLaMA recipe). The LLaMA variant has no bias: `use_bias=False`.
  """
  alpha_init: float | str = dyt_lib.DEFAULT_ALPHA
  dtype: Any = None
  param_dtype: Any = jnp.float32
  use_scale: bool = True
  use_bias: bool = True
  scale_init: Initializer = nn.initializers.ones
  bias_init: Initializer = nn.initializers.zeros
  param_axes: tuple[str, ...] = ('embed',)

  @nn.compact
  def __call__(self, x: Array, use_running_average: bool | None = None, *,
               mask: Array | None = None) -> Array:
    del use_running_average
    probes.record(self, x, mask)
    features = jnp.shape(x)[-1]
    alpha0 = self.alpha_init
    if isinstance(alpha0, str):
      alpha0 = dyt_lib.dyt_alpha_init(alpha0, features)
    alpha = self.param(
        'alpha', nn.with_logical_partitioning(
            nn.initializers.constant(alpha0), (None,)), (1,),
        self.param_dtype)
    params = {'alpha': alpha, **_affine_params(self, features)}
    y, _ = dyt_lib.dyt(x, params, mask=mask)
    return y if self.dtype is None else y.astype(self.dtype)


class CRMSNorm(_Norm):
  """Compressed RMSNorm; wraps `normjax.functional.crms_norm`. No affine by
  default (the official CRMSNorm has none)."""
  use_scale: bool = False
  use_bias: bool = False

  @nn.compact
  def __call__(self, x: Array, use_running_average: bool | None = None, *,
               mask: Array | None = None) -> Array:
    del use_running_average
    probes.record(self, x, mask)
    y, _ = ln_lib.crms_norm(x, self._params(jnp.shape(x)[-1]), mask=mask,
                            eps=self.epsilon)
    return self._out(y)


class GroupNorm(_Norm):
  """Per-token GroupNorm; wraps `normjax.functional.group_norm`."""
  num_groups: int = 32

  @nn.compact
  def __call__(self, x: Array, use_running_average: bool | None = None, *,
               mask: Array | None = None) -> Array:
    del use_running_average
    probes.record(self, x, mask)
    y, _ = gn_lib.group_norm(x, self._params(jnp.shape(x)[-1]), mask=mask,
                             num_groups=self.num_groups, eps=self.epsilon)
    return self._out(y)


class EvoNormS0(_Norm):
  """EvoNorm-S0 (per-token groups); wraps `normjax.functional.evonorm_s0`.

  Params `v` (`v_init`, ones), `scale`, `bias`; no `v` with
  `nonlinearity=False`. The official `init_zero` is `scale_init=zeros`.
  """
  epsilon: float = 1e-5
  num_groups: int = 32
  nonlinearity: bool = True
  v_init: Initializer = nn.initializers.ones

  @nn.compact
  def __call__(self, x: Array, use_running_average: bool | None = None, *,
               mask: Array | None = None) -> Array:
    del use_running_average
    probes.record(self, x, mask)
    features = jnp.shape(x)[-1]
    params = {}
    if self.nonlinearity:
      params['v'] = self.param(
          'v', nn.with_logical_partitioning(self.v_init, self.param_axes),
          (features,), self.param_dtype)
    params.update(self._params(features))
    y, _ = gn_lib.evonorm_s0(x, params, mask=mask, num_groups=self.num_groups,
                             nonlinearity=self.nonlinearity, eps=self.epsilon)
    return self._out(y)


class LayerNormScaling(_Norm):
  """LayerNorm Scaling: the norm of block `layer_index` (1-based) times
  1/sqrt(layer_index); wraps `normjax.functional.layer_norm_scaling`.

  `layer_index` is required (there is no neutral default: block 1 is the
  unscaled one). `base='rmsnorm'` with `use_bias=False` is the official
  LLaMA form. Do not use it for the final norm, which stays unscaled.
  """
  layer_index: int | None = None
  base: str = 'layernorm'
  reduction_axes: Any = -1

  @nn.compact
  def __call__(self, x: Array, use_running_average: bool | None = None, *,
               mask: Array | None = None) -> Array:
    del use_running_average
    probes.record(self, x, mask)
    if self.layer_index is None:
      raise ValueError(
          'LayerNormScaling: set `layer_index`, the 1-based index of the '
          'block (e.g. make_norm("layernorm_scaling", layer_index=l)).')
    y, _ = ln_lib.layer_norm_scaling(
        x, self._params(jnp.shape(x)[-1]), layer_index=self.layer_index,
        base=self.base, axis=self.reduction_axes, mask=mask, eps=self.epsilon,
        axis_name=self.axis_name)
    return self._out(y)


class Identity(nn.Module):
  """No normalisation, with the common call signature (`kind='none'`)."""

  @nn.compact
  def __call__(self, x: Array, use_running_average: bool | None = None, *,
               mask: Array | None = None) -> Array:
    del use_running_average
    probes.record(self, x, mask)
    return x


# ---------------------------------------------------------------------------
# Conditional norms: called `norm(x, cond)`, so they cannot fill a plain norm
# slot `norm(x, use_running_average, mask=)`. Wire them by hand: compute the
# conditioning once per forward (DiT: c = t_emb + y_emb; DiMR: tau =
# logSNR / 4) and pass it to every conditional norm of the network.


def _check_cond_given(cond: Any, cls: str, what: str) -> None:
  if cond is None or isinstance(cond, bool):
    raise TypeError(
        f'{cls} needs the conditioning `cond` ({what}) as its second '
        f'argument: it does not fit the norm slot signature '
        f'norm(x, use_running_average, mask=); call it as norm(x, cond).')


class AdaLNZero(nn.Module):
  """adaLN-Zero of DiT: y = LN(x) (1 + scale(c)) + shift(c) and gate(c).

  `__call__(x, cond, *, mask=None) -> (y, gate)`: `cond` is [B, K] (one
  vector per example, DiT's t_emb + y_emb) or [B, L, K] (per token); the
  module holds the zero-initialised projection SiLU(cond) -> (shift, scale,
  gate) (params `modulation_kernel` [K, 3, C], `modulation_bias` [3, C]).
  At init y = LN(x) and gate = 0, so `x + gate * F(y)` is the identity.
  Use the gate with `normjax.functional.gated_residual(x, F(y), gate)`.
  `use_gate=False` (DiT's final layer) returns gate None. Wraps
  `normjax.functional.ada_ln_zero` and `adaln_modulation`. In a block:

      c = t_emb + y_emb                               # [B, K], once
      h, gate = AdaLNZero(name='norm1')(x, c)
      x = gated_residual(x, attention(h), gate)
      h, gate = AdaLNZero(name='norm2')(x, c)
      x = gated_residual(x, mlp(h), gate)

  (DiT computes all six vectors of a block with one Linear; two modules
  with three each are the same map, split.)
  """
  epsilon: float = 1e-6
  use_gate: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Initializer = nn.initializers.zeros
  bias_init: Initializer = nn.initializers.zeros
  param_axes: tuple[str, ...] = ('embed',)

  @nn.compact
  def __call__(self, x: Array, cond: Array | None = None,
               use_running_average: bool | None = None, *,
               mask: Array | None = None) -> tuple[Array, Array | None]:
    del use_running_average
    _check_cond_given(cond, 'AdaLNZero', 'a [B, K] or [B, L, K] vector')
    cond = cond_lib.check_cond(cond, x, 'AdaLNZero')
    features, n = jnp.shape(x)[-1], 3 if self.use_gate else 2
    kernel = self.param(
        'modulation_kernel', nn.with_logical_partitioning(
            self.kernel_init, (None, None) + tuple(self.param_axes)),
        (cond.shape[-1], n, features), self.param_dtype)
    bias = self.param(
        'modulation_bias', nn.with_logical_partitioning(
            self.bias_init, (None,) + tuple(self.param_axes)),
        (n, features), self.param_dtype)
    mods = cond_lib.adaln_modulation(cond, kernel, bias, x, 'AdaLNZero')
    y, _ = cond_lib.ada_ln_zero(x, shift=mods[0], scale=mods[1], mask=mask,
                                eps=self.epsilon)
    dtype = y.dtype if self.dtype is None else self.dtype
    gate = mods[2].astype(dtype) if self.use_gate else None
    return y.astype(dtype), gate


class TimeDependentParameter(nn.Module):
  """DiMR's time-dependent vector: params param0, param1 (init `value`),
  nodecay_weight, nodecay_bias (init 0), each [features]."""
  features: int
  value: float
  param_dtype: Any = jnp.float32
  param_axes: tuple[str, ...] = ('embed',)

  @nn.compact
  def __call__(self) -> dict[str, Array]:
    def make(name, value):
      return self.param(name, nn.with_logical_partitioning(
          nn.initializers.constant(value), self.param_axes),
          (self.features,), self.param_dtype)
    return {'param0': make('param0', self.value),
            'param1': make('param1', self.value),
            'nodecay_weight': make('nodecay_weight', 0.0),
            'nodecay_bias': make('nodecay_bias', 0.0)}


class _TDNorm(nn.Module):
  """Fields of the DiMR time-dependent norms."""
  epsilon: float = 1e-5
  use_scale: bool = True
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  param_axes: tuple[str, ...] = ('embed',)

  def _function(self):
    raise NotImplementedError

  @nn.compact
  def __call__(self, x: Array, cond: Array | None = None,
               use_running_average: bool | None = None, *,
               mask: Array | None = None) -> Array:
    del use_running_average
    name = type(self).__name__
    _check_cond_given(cond, name, 'the time tau, [] or [B] or [B, L]')
    features = jnp.shape(x)[-1]
    params = {}
    for key, value, use in (('scale', 1.0, self.use_scale),
                            ('bias', 0.0, self.use_bias)):
      if use:
        params[key] = TimeDependentParameter(
            features, value, self.param_dtype, self.param_axes, name=key)()
    y, _ = self._function()(x, params, tau=cond, mask=mask, eps=self.epsilon)
    return y if self.dtype is None else y.astype(self.dtype)


class TDLayerNorm(_TDNorm):
  """DiMR's time-dependent LayerNorm, `norm(x, tau)`; wraps
  `normjax.functional.td_layer_norm` (tau = logSNR / 4 in DiMR)."""

  def _function(self):
    return cond_lib.td_layer_norm


class TDRMSNorm(_TDNorm):
  """DiMR's TDRMSNorm (eps 1e-8 outside the sqrt, no bias by default),
  `norm(x, tau)`; wraps `normjax.functional.td_rms_norm`."""
  epsilon: float = 1e-8
  use_bias: bool = False

  def _function(self):
    return cond_lib.td_rms_norm


class QKNorm(nn.Module):
  """QK-norm, `qk_norm_module(q, k) -> (q, k)`; wraps
  `normjax.functional.qk_norm`.

  q [..., heads, head_dim], k [..., kv_heads, head_dim]. Params
  `query_scale`/`key_scale` (and `_bias` with `use_bias`), of shape
  (head_dim,) with `scale_shared_across_heads` (flax, ViT-22B) or
  (heads, head_dim) per head (OLMo 2). `per_head=False` normalises over the
  full width heads * head_dim (OLMo 2; apply before RoPE). Not a slot norm
  and not in `make_norm`: attention code calls it on q and k.
  """
  kind: str = 'rmsnorm'
  epsilon: float = 1e-6
  per_head: bool = True
  scale_shared_across_heads: bool = True
  use_scale: bool = True
  use_bias: bool = False
  scale_init: Initializer = nn.initializers.ones
  bias_init: Initializer = nn.initializers.zeros
  dtype: Any = None
  param_dtype: Any = jnp.float32
  param_axes: tuple[str, ...] = ('heads', 'kv')

  @nn.compact
  def __call__(self, q: Array, k: Array) -> tuple[Array, Array]:
    def params(prefix, t):
      shape = tuple(jnp.shape(t)[-1:] if self.scale_shared_across_heads
                    else jnp.shape(t)[-2:])
      axes = tuple(self.param_axes)[-len(shape):]
      out = {}
      for key, init, use in (('scale', self.scale_init, self.use_scale),
                             ('bias', self.bias_init, self.use_bias)):
        if use:
          out[key] = self.param(f'{prefix}_{key}',
                                nn.with_logical_partitioning(init, axes),
                                shape, self.param_dtype)
      return out
    if jnp.ndim(q) < 2 or jnp.ndim(k) < 2:
      raise ValueError('QKNorm: `q` and `k` must have shape '
                       '[..., heads, head_dim], got '
                       f'{jnp.shape(q)} and {jnp.shape(k)}.')
    q, k = qk_lib.qk_norm(q, k, params('query', q), params('key', k),
                          kind=self.kind, eps=self.epsilon,
                          per_head=self.per_head)
    if self.dtype is not None:
      q, k = q.astype(self.dtype), k.astype(self.dtype)
    return q, k


MODULES: dict[str, type[nn.Module]] = {
    'layernorm': LayerNorm,
    'rmsnorm': RMSNorm,
    'batchnorm': BatchNorm,
    'powernorm': PowerNorm,
    'pn_v': PNV,
    'unified': UnifiedNorm,
    'group_scaling': GroupScaling,
    'dyt': DyT,
    'crmsnorm': CRMSNorm,
    'groupnorm': GroupNorm,
    'evonorm_s0': EvoNormS0,
    'layernorm_scaling': LayerNormScaling,
    'none': Identity,
}

# Built by `make_norm` too, but called `norm(x, cond)`: not slot norms.
CONDITIONAL_MODULES: dict[str, type[nn.Module]] = {
    'adaln_zero': AdaLNZero,
    'td_layernorm': TDLayerNorm,
    'td_rmsnorm': TDRMSNorm,
}


def make_norm(kind: str, **kwargs: Any) -> Callable[..., nn.Module]:
  """A factory for the norm `kind` with `kwargs` bound, for model injection.

  >>> norm = make_norm('powernorm', num_groups=4, warmup_steps=8000)
  >>> y = norm(name='ln1')(x, use_running_average=not train, mask=mask)

  Unknown kinds and unknown options raise a ValueError that lists the valid
  ones, so a typo in a config fails at model construction. The kinds of
  `CONDITIONAL_MODULES` build modules called `norm(x, cond)`, which do not
  fit a plain norm slot.
  """
  if kind in MODULES:
    cls = MODULES[kind]
  elif kind in CONDITIONAL_MODULES:
    cls = CONDITIONAL_MODULES[kind]
  else:
    raise ValueError(f'make_norm: unknown norm kind {kind!r}; choose from '
                     f'{sorted(MODULES)} or the conditional '
                     f'{sorted(CONDITIONAL_MODULES)}.')
  fields = {f.name for f in dataclasses.fields(cls)
            if f.name not in ('parent', 'name')}
  unknown = set(kwargs) - fields
  if unknown:
    raise ValueError(f'make_norm({kind!r}): unknown options {sorted(unknown)};'
                     f' {cls.__name__} accepts {sorted(fields)}.')
  return functools.partial(cls, **kwargs)
