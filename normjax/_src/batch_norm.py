"""Masked BatchNorm with flax.linen-compatible running averages."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from normjax._src import common, rules
from normjax._src import definition as nd

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


DOC = """Masked BatchNorm (Ioffe & Szegedy, 2015, https://arxiv.org/abs/1502.03167).

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

  Returns:
    `(y, new_state)`. A batch without real tokens is normalised with the
    running statistics and leaves the state unchanged. A batch whose real
    tokens hold a NaN or an infinity leaves it unchanged too (its output is
    the user's non-finite input normalised by the batch statistics).
  """


def _train(x, mask, state, params, options, axis_name):
  """One batch group's training step: batch statistics, EMA update."""
  dtype = common.stats_dtype(x)
  xf = x.astype(dtype)
  mu, count = common.masked_row_mean(xf, mask, axis_name)
  var, _ = common.masked_row_mean(
      jnp.square(xf - common.feat(mu, xf.ndim)), mask, axis_name)
  has_data = count > 0
  update = has_data & common.all_finite(mu, var)
  mu = jnp.where(has_data, mu, state.mean.astype(dtype))
  var = jnp.where(has_data, var, state.var.astype(dtype))
  z = (xf - common.feat(mu, xf.ndim)) * common.feat(
      jax.lax.rsqrt(var + options['eps']), xf.ndim)
  y = common.affine(z, params, dtype)
  mu, var = jax.lax.stop_gradient((mu, var))
  m = options['momentum']
  new = BatchNormState(mean=m * state.mean + (1 - m) * mu,
                       var=m * state.var + (1 - m) * var)
  return y, common.keep_if(update, new, state)


def _eval_affine(params, state, options, xp):
  """(x - mean) * scale / sqrt(var + eps) + bias."""
  return nd.EvalAffine(
      scale=params['scale'] / xp.sqrt(state.var + options['eps']),
      center=state.mean, bias=params['bias'], core=('none', {}))


BATCH_NORM = nd.register(nd.NormDefinition(
    kind='batchnorm', name='batch_norm', module='BatchNorm',
    options=(
        nd.Option('momentum', 0.99, 'decay of the running averages (flax); '
                  '1 freezes them.', check=rules.DECAY),
        nd.Option('eps', 1e-5, 'added to the variance.', field='epsilon',
                  check=rules.EPS),
        nd.Option('num_batch_groups', 1,
                  'split the batch axis into this many groups with their own '
                  'statistics and running state (a virtual per-device '
                  'batch).', check=rules.COUNT),
    ),
    doc=DOC,
    train=_train,
    init_state=lambda features, dtype, o: init_batch_norm_state(
        features, dtype, o['num_batch_groups']),
    eval_affine=_eval_affine,
    probe=lambda x, state, options: (x, {'mean': state.mean,
                                         'var': state.var}),
    state_maker='init_batch_norm_state',
))
batch_norm = BATCH_NORM.function
