"""Flax linen modules of the norms that are not slot norms.

The conditional norms (AdaLNZero, TDLayerNorm, TDRMSNorm) are called
`norm(x, cond)` and QKNorm `norm(q, k)`: they are wired by hand. Thin
wrappers over `normjax.functional`, no math here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from normjax._src import conditional_norm as cond_lib
from normjax._src import qk_norm as qk_lib

Array = jax.Array
Initializer = Callable[..., Array]


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

  Attributes:
    epsilon: LayerNorm's epsilon inside the sqrt (DiT: 1e-6).
    use_gate: also return the gate (False: DiT's final layer).
    dtype: output dtype (None: the input's).
    param_dtype: dtype of the modulation params.
    kernel_init: init of `modulation_kernel` (zeros: adaLN-Zero).
    bias_init: init of `modulation_bias` (zeros).
    param_axes: logical axis names of the feature axis, for sharding.
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
  nodecay_weight, nodecay_bias (init 0), each [features].

  Attributes:
    features: length of the vector.
    value: init of param0 and param1 (1 for a scale, 0 for a bias).
    param_dtype: dtype of the params.
    param_axes: logical axis names of the feature axis, for sharding.
  """
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
  """Fields of the DiMR time-dependent norms.

  Attributes:
    epsilon: added to the variance (TDLayerNorm) or outside the sqrt
      (TDRMSNorm).
    use_scale: learn a time-dependent scale.
    use_bias: learn a time-dependent bias.
    dtype: output dtype (None: the input's).
    param_dtype: dtype of the params.
    param_axes: logical axis names of the feature axis, for sharding.
  """
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
  `normjax.functional.td_layer_norm` (tau = logSNR / 4 in DiMR).

  Attributes: epsilon (1e-5), use_scale, use_bias, dtype, param_dtype,
  param_axes, as in `_TDNorm`.
  """

  def _function(self):
    return cond_lib.td_layer_norm


class TDRMSNorm(_TDNorm):
  """DiMR's TDRMSNorm (eps 1e-8 outside the sqrt, no bias by default),
  `norm(x, tau)`; wraps `normjax.functional.td_rms_norm`.

  Attributes: epsilon (1e-8), use_scale, use_bias (False), dtype,
  param_dtype, param_axes, as in `_TDNorm`.
  """
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

  Attributes:
    kind: 'rmsnorm' or 'layernorm'.
    epsilon: added to the mean square (or variance) inside the sqrt.
    per_head: normalise each head's head_dim (False: the full width).
    scale_shared_across_heads: one (head_dim,) scale for all heads (False:
      one per head).
    use_scale: learn the scales.
    use_bias: learn biases too.
    scale_init: init of the scales (ones).
    bias_init: init of the biases (zeros).
    dtype: output dtype (None: the input's).
    param_dtype: dtype of the params.
    param_axes: logical axis names of (heads, head_dim), for sharding.
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


# Built by `make_norm` too, but called `norm(x, cond)`: not slot norms.
CONDITIONAL_MODULES: dict[str, type[nn.Module]] = {
    'adaln_zero': AdaLNZero,
    'td_layernorm': TDLayerNorm,
    'td_rmsnorm': TDRMSNorm,
}
