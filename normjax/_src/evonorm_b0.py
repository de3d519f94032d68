"""EvoNorm-B0 (Liu, Brock, Simonyan, Le, NeurIPS 2020), for sequences.

The batch-dependent sibling of EvoNorm-S0 (`group_norm.py`); zoo spec
section 6, official tensorflow/tpu@0325bfff
`models/official/resnet/resnet_model.py` (`evonorm`, `_batch_std`,
`_instance_std`; MOVING_AVERAGE_DECAY 0.9, EPSILON 1e-5).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from normjax._src import common, rules
from normjax._src import definition as nd

Array = jax.Array


class EvoNormB0State(NamedTuple):
  """The moving variance of EvoNorm-B0 (official `moving_variance`)."""
  var: Array  # [features] EMA of the biased batch variance, init 1.


def init_evonorm_b0_state(features: int, dtype=jnp.float32,
                          num_batch_groups: int = 1) -> EvoNormB0State:
  """The fresh state of `evonorm_b0`: running variance 1 per feature."""
  return common.group_state(EvoNormB0State(var=jnp.ones((features,), dtype)),
                            num_batch_groups)


DOC = """EvoNorm-B0 for [batch, tokens, features], masked.

  Liu, Brock, Simonyan, Le, "Evolving Normalization-Activation Layers",
  NeurIPS 2020, https://arxiv.org/abs/2004.02967 (zoo spec section 6):

      y = x / max(sqrt(s2_batch + eps), v * x + sqrt(s2_inst(x) + eps))
          * scale + bias

  with per-feature v (init 1), scale (init 1) and bias (init 0); max is
  elementwise. Transformer mapping (the spec's, a design choice): the
  CNN's spatial axes are the token axes, so
    * s2_batch: the biased variance of each feature over the real tokens of
      the whole batch (training; gradients flow through it, as through
      tf.nn.moments), the moving variance in evaluation, updated as
      var <- decay * var + (1 - decay) * s2_batch (decay 0.9; the official
      mv - (mv - s2) (1 - decay));
    * s2_inst: the biased variance of each feature of each sequence over
      its real tokens, in training and evaluation alike. The token axis is
      the one before the features (axis -2), every axis before it indexes
      sequences: [batch, tokens, C] takes one statistic per example, and a
      rank-2 [tokens, C] is one sequence (as each member sees it under
      `vmap` over the batch with `axis_name`). A sequence without real
      tokens uses all of its tokens.
  Pads never enter a statistic of real tokens and are normalised too.
  Training needs the whole batch (encoder-only: not causal); evaluation is
  per example but still reads all tokens of the example. The denominator
  depends on x through v * x + s_inst, so evaluation is not an affine map:
  EvoNorm-B0 does not fold. Scale-invariant in training as eps -> 0.

  Args:
    x: [..., tokens, features], at least rank 2.
    params: optional `{'v', 'scale', 'bias'}` of shape [features]; without
      `v` the norm uses v = 1 (its init).
    state: an `EvoNormB0State`; see `init_evonorm_b0_state`.
    mask: True for real tokens, broadcastable to `x.shape[:-1]`.
    use_running_average: evaluation mode.
    axis_name: mesh axis name(s) to sum the batch statistics over under
      `shard_map`/`pmap`/`vmap` (the instance statistics are per
      sequence).

  Returns:
    `(y, new_state)`. A batch without real tokens, or whose real tokens
    hold a NaN or an infinity, leaves the state unchanged (the former is
    normalised with the moving variance).
  """


def instance_var(x: Array, mask: Array | None) -> Array:
  """Biased variance of every (sequence, feature) over the sequence's real
  tokens (axis -2), [..., 1, C]; all tokens for a sequence without real
  ones."""
  axes = (x.ndim - 2,)
  if mask is None:
    w = jnp.ones(x.shape[:-1] + (1,), x.dtype)
  else:
    m = mask.astype(bool)
    any_real = jnp.any(m, axis=axes, keepdims=True)
    w = jnp.where(any_real, m, True)[..., None]
  count = jnp.maximum(jnp.sum(w.astype(x.dtype), axis=axes, keepdims=True),
                      1)
  mean = jnp.sum(jnp.where(w, x, 0), axis=axes, keepdims=True) / count
  return jnp.sum(jnp.where(w, jnp.square(x - mean), 0), axis=axes,
                 keepdims=True) / count


def _normalize(xf, mask, batch_var, params, eps, dtype):
  v = params.get('v')
  vx = xf if v is None else xf * common.feat(v.astype(dtype), xf.ndim)
  left = common.feat(jnp.sqrt(batch_var + eps), xf.ndim)
  right = vx + jnp.sqrt(instance_var(xf, mask) + eps)
  z = xf / jnp.maximum(left, right)
  return common.affine(z, {k: p for k, p in params.items() if k != 'v'},
                       dtype)


def _train(x, mask, state, params, options, axis_name):
  dtype = common.stats_dtype(x)
  xf = x.astype(dtype)
  _, var, update = common.batch_moments(xf, mask, axis_name, state.var)
  y = _normalize(xf, mask, var, params, options['eps'], dtype)
  d = options['decay']
  new = EvoNormB0State(var=d * state.var + (1 - d) * jax.lax.stop_gradient(
      var))
  return y, common.keep_if(update, new, state)


def _evaluate(x, mask, state, params, options):
  dtype = common.stats_dtype(x)
  return _normalize(x.astype(dtype), mask, state.var.astype(dtype), params,
                    options['eps'], dtype)


EVONORM_B0 = nd.register(nd.NormDefinition(
    kind='evonorm_b0', name='evonorm_b0', module='EvoNormB0',
    options=(
        nd.Option('decay', 0.9, 'decay of the moving variance (official '
                  'MOVING_AVERAGE_DECAY 0.9, flax convention); 1 freezes '
                  'it.', check=rules.DECAY),
        nd.Option('eps', 1e-5, 'added to both variances (official 1e-5).',
                  field='epsilon', check=rules.EPS),
        nd.Option('num_batch_groups', 1,
                  'split the batch axis into this many groups with their own '
                  'statistics and moving variance (a virtual per-device '
                  'batch).', check=rules.COUNT),
    ),
    doc=DOC, train=_train, evaluate=_evaluate,
    init_state=lambda features, dtype, o: init_evonorm_b0_state(
        features, dtype, o['num_batch_groups']),
    extra_params=(nd.ParamSpec('v', 'v_init', 1.0),),
    probe=lambda x, state, options: (x, {'var': state.var}),
    state_maker='init_evonorm_b0_state',
))
evonorm_b0 = EVONORM_B0.function
