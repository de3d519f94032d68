"""Masked BatchNorm with flax.linen-compatible running averages."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from normjax._src import common

Array = jax.Array


class BatchNormState(NamedTuple):
  """Running statistics of BatchNorm (names and init as flax.linen.BatchNorm)."""
  mean: Array  # [features] EMA of the batch mean, init 0.
  var: Array   # [features] EMA of the biased batch variance, init 1.


def init_batch_norm_state(features: int, dtype=jnp.float32,
                          num_batch_groups: int = 1) -> BatchNormState:
  state = BatchNormState(mean=jnp.zeros((features,), dtype),
                         var=jnp.ones((features,), dtype))
  return common.group_state(state, num_batch_groups)


def batch_norm(
    x: Array,
    params: common.Params,
    state: BatchNormState,
    *,
    mask: Array | None = None,
    use_running_average: bool = False,
    axis_name: Any = None,
    momentum: float = 0.99,
    eps: float = 1e-5,
    num_batch_groups: int = 1,
) -> tuple[Array, BatchNormState]:
  """Masked BatchNorm (Ioffe & Szegedy, 2015, https://arxiv.org/abs/1502.03167).

      mu = mean_V(x),  var = mean_V((x - mu)^2)      over real tokens V
      y  = (x - mu) / sqrt(var + eps) * scale + bias  at every token
      mean <- momentum * mean + (1 - momentum) * mu   (and var alike)

  Statistics are over every axis except the feature axis; pad tokens are
  normalised too but never enter the statistics. The running averages use
  flax.linen.BatchNorm's convention (momentum 0.99, biased variance), so a
  flax checkpoint's `batch_stats` can be used as is. In evaluation mode
  (`use_running_average=True`) y = (x - mean) / sqrt(var + eps) * scale + bias.

  Args:
    x: [batch, ..., features].
    params: optional `{'scale', 'bias'}` of shape [features].
    state: a `BatchNormState`; see `init_batch_norm_state`.
    mask: True for real tokens, broadcastable to `x.shape[:-1]`.
    use_running_average: evaluation mode.
    axis_name: mesh axis name(s) to sum the statistics over under
      `shard_map`/`pmap` (sums of x, x^2 and counts, so uneven padding across
      devices stays exact). Not needed under `jax.jit`, which computes global
      statistics of a sharded batch by itself.
    momentum: decay of the running averages.
    eps: added to the variance.
    num_batch_groups: split the batch axis into this many groups with their
      own statistics and running state (a virtual per-device batch).

  Returns:
    `(y, new_state)`. A batch without real tokens is normalised with the
    running statistics and leaves the state unchanged.
  """
  fn = 'batch_norm'
  x = common.check_input(x, fn, min_rank=2)
  params = common.check_params(params, x.shape[-1], fn)
  mask = common.check_mask(mask, x, fn)
  dtype = common.stats_dtype(x)
  if use_running_average:
    state0 = common.first_group(state, num_batch_groups)
    common.check_state(state0, init_batch_norm_state(x.shape[-1]), fn,
                       'init_batch_norm_state')
    xf = x.astype(dtype)
    z = (xf - common.feat(state0.mean.astype(dtype), xf.ndim)) * (
        common.feat(jax.lax.rsqrt(state0.var.astype(dtype) + eps), xf.ndim))
    return common.affine(z, params, dtype).astype(x.dtype), state
  common.check_state(
      state, init_batch_norm_state(x.shape[-1], num_batch_groups=
                                   num_batch_groups), fn,
      'init_batch_norm_state')

  def train(xg, maskg, st):
    xf = xg.astype(dtype)
    mu, count = common.masked_row_mean(xf, maskg, axis_name)
    var, _ = common.masked_row_mean(
        jnp.square(xf - common.feat(mu, xf.ndim)), maskg, axis_name)
    has_data = count > 0
    mu = jnp.where(has_data, mu, st.mean.astype(dtype))
    var = jnp.where(has_data, var, st.var.astype(dtype))
    z = (xf - common.feat(mu, xf.ndim)) * common.feat(
        jax.lax.rsqrt(var + eps), xf.ndim)
    y = common.affine(z, params, dtype)
    mu, var = jax.lax.stop_gradient((mu, var))
    new = BatchNormState(mean=momentum * st.mean + (1 - momentum) * mu,
                         var=momentum * st.var + (1 - momentum) * var)
    return y.astype(x.dtype), common.keep_if(has_data, new, st)

  return common.apply_grouped(train, num_batch_groups, x, mask, state,
                              name=fn)
