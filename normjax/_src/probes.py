"""Training-dynamics probes: what a norm sees, recorded only when asked.

A norm module records its probes when the `'probes'` collection is mutable
(`model.apply(..., mutable=['batch_stats', 'probes'])`) in training mode;
otherwise nothing is computed. Every probe is a float32 scalar:

  act_var    variance of the norm's input over every real entry
             (tokens x features): how large the residual stream has grown.
  act_max    max |x| over real entries: outliers.
  mean_dist  (1/C) sum_c |mu_B,c - mu_c|         BatchNorm
  var_dist   (1/C) sum_c |sigma2_B,c - sigma2_c| BatchNorm
  qm_dist    (1/C) sum_c |psi2_B,c - phi_c|      PowerNorm, PN-V, UN

The distances compare the statistics of the current batch (over its real
tokens) with the running statistics the norm held *before* this batch, as in
Fig. 2 of Shen et al. (ICML 2020), "PowerNorm: Rethinking Batch
Normalization in Transformers". For PowerNorm and PN-V the input is taken
after GroupScaling, as their statistics are. With several batch groups the
running statistics are averaged over the groups.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from normjax._src import common

Array = jax.Array

PROBES = 'probes'

# Which batch statistic each running statistic is compared with.
_BATCH_STATISTIC = {'mean': 'mean_dist', 'var': 'var_dist',
                    'quad_mean': 'qm_dist'}


def activation_probes(x: Array, mask: Array | None = None) -> dict[str, Array]:
  """`act_var` and `act_max` of `x` [..., C] over the rows where mask holds."""
  xf = jax.lax.stop_gradient(x).astype(jnp.float32)
  mean, _ = common.masked_row_mean(xf, mask)
  sq, count = common.masked_row_mean(jnp.square(xf), mask)
  overall = jnp.mean(mean)
  var = jnp.mean(sq) - jnp.square(overall)
  absx = jnp.abs(xf)
  if mask is not None:
    absx = jnp.where(jnp.broadcast_to(mask, xf.shape[:-1])[..., None], absx, 0)
  big = jnp.max(absx)
  has = count > 0
  return dict(act_var=jnp.where(has, jnp.maximum(var, 0.0), 0.0),
              act_max=jnp.where(has, big, 0.0))


def nonfinite_probes(x: Array, mask: Array | None = None
                     ) -> dict[str, Array]:
  """`nonfinite_frac`: the fraction of real entries of `x` [..., C] (rows
  where mask holds) that are NaN or infinite; 0 without real entries.

  Such a batch leaves the running statistics of the stateful norms
  unchanged; this says how much of the input was bad.
  """
  bad = ~jnp.isfinite(jax.lax.stop_gradient(x))
  frac, count = common.masked_row_mean(bad.astype(jnp.float32), mask)
  return dict(nonfinite_frac=jnp.where(count > 0, jnp.mean(frac), 0.0))


def statistic_distances(x: Array, mask: Array | None,
                        running: Mapping[str, Array]) -> dict[str, Array]:
  """Mean |batch statistic - running statistic| over features.

  `running` maps 'mean', 'var' or 'quad_mean' to the running value ([C], or
  [groups, C]); returns the matching 'mean_dist', 'var_dist', 'qm_dist'.
  """
  xf = jax.lax.stop_gradient(x).astype(jnp.float32)
  mean, count = common.masked_row_mean(xf, mask)
  batch = {'mean': mean}
  if 'var' in running:
    batch['var'], _ = common.masked_row_mean(
        jnp.square(xf - common.feat(mean, xf.ndim)), mask)
  if 'quad_mean' in running:
    batch['quad_mean'], _ = common.masked_row_mean(jnp.square(xf), mask)
  out = {}
  for name, value in running.items():
    if name not in _BATCH_STATISTIC:
      raise ValueError(f'statistic_distances: unknown running statistic '
                       f'{name!r}; use one of {sorted(_BATCH_STATISTIC)}.')
    value = jnp.asarray(value, jnp.float32)
    if value.ndim > 1:
      value = jnp.mean(value, axis=tuple(range(value.ndim - 1)))
    dist = jnp.mean(jnp.abs(batch[name] - value))
    out[_BATCH_STATISTIC[name]] = jnp.where(count > 0, dist, 0.0)
  return out


def record(module: nn.Module, x: Array, mask: Array | None = None,
           running: Mapping[str, Array] | None = None,
           statistics_input: Array | None = None) -> None:
  """Sows `module`'s probes into 'probes' when that collection is mutable.

  Call it from a norm's `__call__` in training mode with its input `x`
  (features last) and, for a norm with running statistics, `running` and
  the tensor its statistics are taken of (`statistics_input`, default `x`).
  Every norm records `act_var`, `act_max` and `nonfinite_frac`.
  """
  if module.is_initializing() or not module.is_mutable_collection(PROBES):
    return
  values = {**activation_probes(x, mask), **nonfinite_probes(x, mask)}
  if running:
    seen = x if statistics_input is None else statistics_input
    values.update(statistic_distances(seen, mask, running))
  for name, value in values.items():
    module.sow(PROBES, name, value, init_fn=lambda: 0.0,
               reduce_fn=lambda _, new: new)


def flatten(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  """{'a': {'b': {'act_var': v}}} -> {'a/b/act_var': v}."""
  out = {}
  for key, value in tree.items():
    path = f'{prefix}/{key}' if prefix else str(key)
    if isinstance(value, Mapping):
      out.update(flatten(value, path))
    else:
      out[path] = value
  return out
