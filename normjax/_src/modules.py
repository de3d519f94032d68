"""Flax linen modules: thin wrappers over the functional norms, no math here.

Each module is a drop-in for flax.linen's LayerNorm/BatchNorm conventions:
`epsilon`, `use_scale`/`use_bias`, `scale_init`/`bias_init`, `dtype`,
`param_dtype`, `use_running_average` (in the constructor or the call, as
`nn.BatchNorm`), params `scale`/`bias`, running statistics in `batch_stats`.
Statistics that the backward pass updates (PowerNorm's `ema_gz`, UN's
`ema_gz`/`bwd_window`) live in the `grad_stats` collection: differentiate
the loss with respect to it and fold the result back with
`normjax.apply_backward_stats`; never hand it to the optimizer.

Every module is called as `module(x, use_running_average=None, *, mask=None)`,
so any norm can be injected where another was. `dtype=None` returns the dtype
of `x` (flax would promote bf16 activations to the float32 of the params).
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
from normjax._src import layer_norm as ln_lib
from normjax._src import power_norm as pn_lib
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
    params = {}
    if self.use_scale:
      params['scale'] = self.param(
          'scale', nn.with_logical_partitioning(self.scale_init,
                                                self.param_axes),
          (features,), self.param_dtype)
    if self.use_bias:
      params['bias'] = self.param(
          'bias', nn.with_logical_partitioning(self.bias_init,
                                               self.param_axes),
          (features,), self.param_dtype)
    return params

  def _out(self, y: Array) -> Array:
    return y if self.dtype is None else y.astype(self.dtype)


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
                grad_mean_over=self.grad_mean_over)


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


class Identity(nn.Module):
  """No normalisation, with the common call signature (`kind='none'`)."""

  @nn.compact
  def __call__(self, x: Array, use_running_average: bool | None = None, *,
               mask: Array | None = None) -> Array:
    del use_running_average, mask
    return x


MODULES: dict[str, type[nn.Module]] = {
    'layernorm': LayerNorm,
    'rmsnorm': RMSNorm,
    'batchnorm': BatchNorm,
    'powernorm': PowerNorm,
    'pn_v': PNV,
    'unified': UnifiedNorm,
    'group_scaling': GroupScaling,
    'none': Identity,
}


def make_norm(kind: str, **kwargs: Any) -> Callable[..., nn.Module]:
  """A factory for the norm `kind` with `kwargs` bound, for model injection.

  >>> norm = make_norm('powernorm', num_groups=4, warmup_steps=8000)
  >>> y = norm(name='ln1')(x, use_running_average=not train, mask=mask)

  Unknown kinds and unknown options raise a ValueError that lists the valid
  ones, so a typo in a config fails at model construction.
  """
  if kind not in MODULES:
    raise ValueError(f'make_norm: unknown norm kind {kind!r}; choose from '
                     f'{sorted(MODULES)}.')
  cls = MODULES[kind]
  fields = {f.name for f in dataclasses.fields(cls)
            if f.name not in ('parent', 'name')}
  unknown = set(kwargs) - fields
  if unknown:
    raise ValueError(f'make_norm({kind!r}): unknown options {sorted(unknown)};'
                     f' {cls.__name__} accepts {sorted(fields)}.')
  return functools.partial(cls, **kwargs)
