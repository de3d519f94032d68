"""Masked BatchNorm with flax.linen-compatible running averages."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from normjax._src import batch_kernel, common, rules
from normjax._src import definition as nd
from normjax._src.layer_norm import group_scale

Array = jax.Array


class BatchNormState(NamedTuple):
  """Running statistics of BatchNorm (names and init as flax.linen.BatchNorm)."""
  mean: Array  # [features] EMA of the batch mean, init 0.
  var: Array   # [features] EMA of the biased batch variance, init 1.


def init_batch_norm_state(features: int, dtype=jnp.float32,
                          num_batch_groups: int = 1) -> BatchNormState:
  """The fresh state of `batch_norm`: running mean 0 and variance 1 per
  feature (`num_batch_groups` > 1: one copy per group, leading axis)."""
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

  def xla(xf):
    mu, var, update = common.batch_moments(xf, mask, axis_name, state.var,
                                           state.mean)
    z = (xf - common.feat(mu, xf.ndim)) * common.feat(
        jax.lax.rsqrt(var + options['eps']), xf.ndim)
    return common.affine(z, params, dtype), mu, var, update

  opts = batch_kernel.BatchOptions(
      eps=options['eps'], center=True, num_groups=0, group_scaling_eps=0.0,
      per_row_keep=False, var_over_every_row=False)
  y, mu, var, update = batch_kernel.train(
      x.astype(dtype), mask, params, state.mean, state.var, opts,
      'batch_norm', axis_name, xla)
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


# ---------------------------------------------------------------------------
# The PowerNorm paper's "BN" baseline: the official MaskSyncBatchNorm.


class PaperBatchNormState(NamedTuple):
  """Running statistics of `paper_batch_norm` (torch names and init)."""
  running_mean: Array  # [features] EMA of the batch mean, init 0.
  running_var: Array   # [features] EMA of the UNBIASED batch variance, init 1.


def init_paper_batch_norm_state(features: int, dtype=jnp.float32,
                                num_batch_groups: int = 1
                                ) -> PaperBatchNormState:
  """The fresh state of `paper_batch_norm` (the official
  MaskSyncBatchNorm): running mean 0 and variance 1 per feature."""
  state = PaperBatchNormState(running_mean=jnp.zeros((features,), dtype),
                              running_var=jnp.ones((features,), dtype))
  return common.group_state(state, num_batch_groups)


PAPER_DOC = """The PowerNorm paper's BatchNorm baseline (its official `MaskSyncBatchNorm`).

  Shen, Yao, Gholami, Mahoney, Keutzer, "PowerNorm: Rethinking Batch
  Normalization in Transformers", ICML 2020, https://arxiv.org/abs/2003.07845:
  the "BN" row of its Table 1 was trained with `MaskSyncBatchNorm`
  (sIncerass/powernorm, `fairseq/modules/norms/mask_syncbatchnorm.py`, the
  module `NormSelect('batch', ...)` builds). With V the real tokens and N the
  number of rows of the padded batch (every token, pads included):

      a  = x / sqrt(mean_C(x^2) + layer_scaling_eps)   per token (LayerScaling)
      mu = mean_V(a)
      var = sum_V (a - mu)^2 / N                       pads count in N
      y  = (a - mu) / sqrt(var + eps) * scale + bias   at real tokens
      y  = bias                                        at pads
      running_mean <- momentum * running_mean + (1 - momentum) * mu
      running_var  <- momentum * running_var
                      + (1 - momentum) * var * N / (N - 1)   (unbiased)

  The official module overwrites each pad row with mu and runs torch's batch
  norm over all N rows: the mean is unchanged, the variance shrinks by
  |V| / N, the pads normalise to 0 (so y = bias there) and the running
  variance is torch's unbiased one. Autodiff of the formula above is exactly
  the official gradient (the path through the overwritten pads cancels);
  dbias sums the cotangent over every row, pads included. Differences from
  `batch_norm` (flax-style): the LayerScaling, the variance over N rather
  than |V|, the unbiased running variance, pad outputs. `momentum` is flax's
  decay: 0.95 is the official torch momentum 0.05.

  In evaluation mode (`use_running_average=True`) every token gives
  y = (a - running_mean) / sqrt(running_var + eps) * scale + bias: LayerScaling
  then a per-channel affine map, which folds like PowerNorm's GroupScaling.
  (The official module also overwrites pads in evaluation, which changes only
  the pads' outputs.)

  Args:
    x: [batch, ..., features].
    params: optional `{'scale', 'bias'}` of shape [features].
    state: a `PaperBatchNormState`; see `init_paper_batch_norm_state`.
    mask: True for real tokens, broadcastable to `x.shape[:-1]`; None: every
      token is real.
    use_running_average: evaluation mode.
    axis_name: mesh axis name(s) to sum the statistics (sums of a, squared
      deviations, real and total row counts) over under `shard_map`/`pmap`/
      `vmap`: one global batch. The official code hard-codes
      `need_sync = False`, i.e. per-GPU statistics: reproduce that with
      `num_batch_groups` or by leaving `axis_name` out.

  Returns:
    `(y, new_state)`. A batch without real tokens is normalised with the
    running statistics and leaves the state unchanged (torch gives NaN). So
    does a batch whose real tokens hold a NaN or an infinity. A batch of a
    single row (where torch raises) updates the running variance with 0.
  """


def _layer_scaling_core(options) -> tuple[str, dict[str, Any]]:
  return ('group_scaling', {'num_groups': 1,
                            'eps': options['layer_scaling_eps']})


def _paper_train(x, mask, state, params, options, axis_name):
  """One batch group's training step of the official MaskSyncBatchNorm."""
  dtype = common.stats_dtype(x)
  opts = batch_kernel.BatchOptions(
      eps=options['eps'], center=True, num_groups=1,
      group_scaling_eps=options['layer_scaling_eps'],
      per_row_keep=mask is not None, var_over_every_row=True)
  y, mu, var, update = batch_kernel.train(
      x.astype(dtype), mask, params, state.running_mean, state.running_var,
      opts, 'paper_batch_norm', axis_name,
      lambda xf: _paper_xla(xf, mask, state, params, options, axis_name))
  rows = jnp.asarray(x.size // x.shape[-1], dtype)
  if axis_name is not None:
    rows = jax.lax.psum(rows, axis_name)
  mu, var = jax.lax.stop_gradient((mu, var))
  unbiased = var * rows / jnp.maximum(rows - 1, 1)
  m = options['momentum']
  new = PaperBatchNormState(
      running_mean=m * state.running_mean + (1 - m) * mu,
      running_var=m * state.running_var + (1 - m) * unbiased)
  return y, common.keep_if(update, new, state)


def _paper_xla(xf, mask, state, params, options, axis_name):
  """(y, mu, var, update) of the official MaskSyncBatchNorm, in jnp."""
  dtype = xf.dtype
  rows = jnp.asarray(xf.size // xf.shape[-1], dtype)
  if axis_name is not None:
    rows = jax.lax.psum(rows, axis_name)
  if mask is None:
    count, keep = rows, None
  else:
    count = jnp.sum(mask, dtype=dtype)
    if axis_name is not None:
      count = jax.lax.psum(count, axis_name)
    # Pads never reach the statistics (nor, as in torch, get a gradient); a
    # batch without real tokens is normalised with the running statistics.
    keep = (mask | (count == 0))[..., None]
    xf = jnp.where(keep, xf, 0)
  a = group_scale(xf, 1, options['layer_scaling_eps'])
  has_data = count > 0
  def deviation(mu):  # a - mu at real tokens, 0 at pads
    dev = a - common.feat(mu, a.ndim)
    return dev if keep is None else jnp.where(keep, dev, 0)

  mu, _ = common.masked_row_mean(a, mask, axis_name)
  # sum over real tokens / N: the pads (overwritten with mu) count in N.
  var, _ = common.masked_row_mean(jnp.square(deviation(mu)), None, axis_name)
  update = has_data & common.all_finite(mu, var)
  mu = jnp.where(has_data, mu, state.running_mean.astype(dtype))
  var = jnp.where(has_data, var, state.running_var.astype(dtype))
  z = deviation(mu) * common.feat(jax.lax.rsqrt(var + options['eps']), a.ndim)
  return common.affine(z, params, dtype), mu, var, update


def _paper_eval_affine(params, state, options, xp):
  """LayerScaling, then (a - running_mean) * scale / sqrt(var + eps) + bias."""
  return nd.EvalAffine(
      scale=params['scale'] / xp.sqrt(state.running_var + options['eps']),
      center=state.running_mean, bias=params['bias'],
      core=_layer_scaling_core(options))


def _paper_probe(x, state, options):
  """The LayerScaled input and the running mean and (unbiased) variance."""
  return (group_scale(x.astype(jnp.float32), 1, options['layer_scaling_eps']),
          {'mean': state.running_mean, 'var': state.running_var})


PAPER_BATCH_NORM = nd.register(nd.NormDefinition(
    kind='paper_batchnorm', name='paper_batch_norm', module='PaperBatchNorm',
    options=(
        nd.Option('momentum', 0.95, 'decay of the running averages (flax '
                  'convention): 0.95 is the official torch momentum 0.05 '
                  '(MaskSyncBatchNorm default); 1 freezes them.',
                  check=rules.DECAY),
        nd.Option('eps', 1e-5, 'added to the variance (official 1e-5).',
                  field='epsilon', check=rules.EPS),
        nd.Option('layer_scaling_eps', 1e-5, "LayerScaling's eps (hard-wired "
                  'to 1e-5 officially).', check=rules.EPS),
        nd.Option('num_batch_groups', 1,
                  'split the batch axis into this many groups with their own '
                  'statistics and running state (the official per-GPU '
                  "statistics); evaluation uses group 0's state.",
                  check=rules.COUNT),
    ),
    doc=PAPER_DOC,
    train=_paper_train,
    init_state=lambda features, dtype, o: init_paper_batch_norm_state(
        features, dtype, o['num_batch_groups']),
    eval_affine=_paper_eval_affine,
    probe=_paper_probe,
    state_maker='init_paper_batch_norm_state',
))
paper_batch_norm = PAPER_BATCH_NORM.function
