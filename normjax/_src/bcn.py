"""Batch-Channel Normalization (Qiao, Wang, Liu, Shen, Yuille, 2019).

"Micro-Batch Training with Batch-Channel Normalization and Weight
Standardization", https://arxiv.org/abs/1903.10520; zoo spec section 7;
official joe-siyuan-qiao/Batch-Channel-Normalization@0244c3e9
(`imagenet/models/layers.py`, class `GN`, and `README.md`, `BCNorm`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from normjax._src import common, rules
from normjax._src import definition as nd
from normjax._src import group_norm as gn_lib

Array = jax.Array


class BCNState(NamedTuple):
  """Running statistics of BCN's batch stage (as flax BatchNorm's)."""
  mean: Array  # [features] EMA of the batch mean, init 0.
  var: Array   # [features] EMA of the biased batch variance, init 1.


def init_bcn_state(features: int, dtype=jnp.float32,
                   num_batch_groups: int = 1) -> BCNState:
  """The fresh state of `bcn`: running mean 0 and variance 1 per feature
  (the batch half of BCN)."""
  return common.group_state(BCNState(mean=jnp.zeros((features,), dtype),
                                     var=jnp.ones((features,), dtype)),
                            num_batch_groups)


DOC = """Batch-Channel Normalization for [batch, tokens, features], masked.

  Qiao et al. 2019, https://arxiv.org/abs/1903.10520 (zoo spec section 7):
  a masked BatchNorm, then a GroupNorm of every token:

      b = (x - mu) / sqrt(var + eps) * scale + bias          per feature
      y[n, k] = (b[n, k] - m_g(n)) / sqrt(s2_g(n) + group_eps)
                * group_scale[g] + group_bias[g]             per token

  mu, var: the biased statistics of each feature over the real tokens of
  the batch (training) or the running averages (evaluation; momentum 0.9,
  PyTorch's 0.1, flax convention, biased variance); `scale`/`bias` [C]
  (init 1 and 0) are the batch stage's affine. m_g, s2_g: mean and biased
  variance of the C / G features of group g of token n (g = k // (C / G));
  `group_scale`/`group_bias` [G] (init 1 and 0) are the per-group affine.
  Pads are normalised too but enter no statistic. Training needs the whole
  batch (not causal); the group stage is per token. Training mode is
  invariant to any positive per-feature affine map of x (as eps -> 0).

  Evaluation is the batch stage's affine map followed by a per-token
  GroupNorm: no affine map of x, so BCN does not fold into its readers.

  Args:
    x: [batch, ..., features].
    params: optional `{'scale', 'bias'}` [features] and
      `{'group_scale', 'group_bias'}` [num_groups].
    state: a `BCNState`; see `init_bcn_state`.
    mask: True for real tokens, broadcastable to `x.shape[:-1]`.
    use_running_average: evaluation mode.
    axis_name: mesh axis name(s) to sum the batch statistics over under
      `shard_map`/`pmap`.

  Returns:
    `(y, new_state)`. A batch without real tokens, or whose real tokens
    hold a NaN or an infinity, leaves the state unchanged (the former is
    normalised with the running statistics).
  """


def _group_stage(b, params, options, dtype):
  """Per-token GroupNorm of `b` with the per-group affine."""
  g = options['num_groups']
  centered, var = gn_lib.grouped_centered_var(b, g)  # [..., G, C/G], [..G,1]
  u = centered * jax.lax.rsqrt(var + options['group_eps'])
  for name, combine in (('group_scale', jnp.multiply),
                        ('group_bias', jnp.add)):
    if name in params:
      p = params[name].astype(dtype).reshape((1,) * (u.ndim - 2) + (g, 1))
      u = combine(u, p)
  return u.reshape(b.shape)


def _channel_params(params):
  return {k: v for k, v in params.items() if k in ('scale', 'bias')}


def _train(x, mask, state, params, options, axis_name):
  dtype = common.stats_dtype(x)
  xf = x.astype(dtype)
  mu, var, update = common.batch_moments(xf, mask, axis_name, state.var,
                                         state.mean)
  b = (xf - common.feat(mu, xf.ndim)) * common.feat(
      jax.lax.rsqrt(var + options['eps']), xf.ndim)
  b = common.affine(b, _channel_params(params), dtype)
  y = _group_stage(b, params, options, dtype)
  mu, var = jax.lax.stop_gradient((mu, var))
  m = options['momentum']
  new = BCNState(mean=m * state.mean + (1 - m) * mu,
                 var=m * state.var + (1 - m) * var)
  return y, common.keep_if(update, new, state)


def _evaluate(x, mask, state, params, options):
  del mask  # both stages are per token in evaluation
  dtype = common.stats_dtype(x)
  xf = x.astype(dtype)
  b = (xf - common.feat(state.mean.astype(dtype), xf.ndim)) * common.feat(
      jax.lax.rsqrt(state.var.astype(dtype) + options['eps']), xf.ndim)
  b = common.affine(b, _channel_params(params), dtype)
  return _group_stage(b, params, options, dtype)


def _check(options, features, fn):
  gn_lib.check_group_count(options['num_groups'], features, fn)


BCN = nd.register(nd.NormDefinition(
    kind='bcn', name='bcn', module='BCN',
    options=(
        nd.Option('num_groups', 32, 'G of the group stage, must divide the '
                  'features (official 32).', check=rules.COUNT),
        nd.Option('momentum', 0.9, 'decay of the running averages (flax '
                  'convention; PyTorch momentum 0.1); 1 freezes them.',
                  check=rules.DECAY),
        nd.Option('eps', 1e-5, 'added to the batch variance.',
                  field='epsilon', check=rules.EPS),
        nd.Option('group_eps', 1e-5, 'added to the group variance of each '
                  'token.', field='group_epsilon', check=rules.EPS),
        nd.Option('num_batch_groups', 1,
                  'split the batch axis into this many groups with their own '
                  'statistics and running state (a virtual per-device '
                  'batch).', check=rules.COUNT),
    ),
    doc=DOC, train=_train, evaluate=_evaluate, check=_check,
    init_state=lambda features, dtype, o: init_bcn_state(
        features, dtype, o['num_batch_groups']),
    extra_params=(nd.ParamSpec('group_scale', 'group_scale_init', 1.0,
                               shape='groups'),
                  nd.ParamSpec('group_bias', 'group_bias_init', 0.0,
                               shape='groups')),
    probe=lambda x, state, options: (x, {'mean': state.mean,
                                         'var': state.var}),
    state_maker='init_bcn_state',
))
bcn = BCN.function
