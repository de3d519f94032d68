"""Fused training steps of the exact-gradient batch norms for XLA:CPU.

BatchNorm, the PowerNorm paper's BN baseline and PN-V normalise by column
statistics of the batch and take the exact gradient through them. Under
XLA:CPU their masked column reductions run far below memory speed (the
jitted forward+backward of a (4096, 1024) f32 BatchNorm took 1.5x flax's).
Here, with the column-statistics kernels of `power_kernel.cc`, the forward
is two passes over memory (the statistics, then the normalisation) and the
backward two (the column sums the gradient needs, then dx): eight arrays of
x in all, the least a separate forward and backward can move.

With a = x (or GroupScaling / LayerScaling of x), w the rows of the
statistics (real tokens), n = sum(w), keep the rows that are normalised
(the paper's BN: real tokens; pads give y = bias, dx = 0):

    mu  = sum_i w_i a_i / n                     (centred; else 0)
    var = sum_i w_i (a_i - mu)^2 / n_var        (n_var: n, or every row)
    z   = keep * (a - mu) * r,  r = 1 / sqrt(var + eps),  y = z * scale + bias
    da_i = r (keep_i g_i - w_i (sum_k keep_k g_k / n + zh_i sum_k g_k z_k / n_var))

with g = dy * scale and zh = (a - mu) * r: the derivative through mu and
var, written once for all three (`power_kernel.cc`'s PowerBackward with
e and corr). The sums are accumulated about a shift k, one real row of a,
so that the variance keeps its precision when the mean is large next to
the spread. A batch without real rows uses the running statistics, which
carry no gradient.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from normjax._src import common, power_kernel

Array = jax.Array


class BatchOptions(NamedTuple):
  eps: float
  center: bool             # subtract the batch mean (BatchNorm) or not (PN-V)
  num_groups: int          # GroupScaling groups before the statistics; 0 none
  group_scaling_eps: float
  per_row_keep: bool       # rows with keep 0 give bias and no gradient
  var_over_every_row: bool  # n_var counts every row (the paper's BN)


def _statistics(x, w, running_mean, running_var, opts):
  """(rs, mu, var, count): the batch statistics, or the running ones."""
  if opts.center:
    rs, sq, s1, shift = power_kernel.centered_stats(
        x, w, opts.num_groups, opts.group_scaling_eps)
  else:
    rs, sq = power_kernel.stats(x, w, opts.num_groups, opts.group_scaling_eps)
  count = jnp.sum(w)
  n = jnp.maximum(count, 1)
  n_var = (jnp.asarray(x.size // x.shape[-1], x.dtype)
           if opts.var_over_every_row else n)
  if opts.center:
    m1 = s1 / n
    mu, var = shift + m1, jnp.maximum(sq - s1 * m1, 0) / jnp.maximum(n_var, 1)
  else:
    mu, var = jnp.zeros_like(sq), sq / n
  has_data = count > 0
  mu = jnp.where(has_data, mu, running_mean)
  var = jnp.where(has_data, var, running_var)
  return rs, mu, var, count, n_var


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def batch_norm_train(x, scale, bias, w, keep, running_mean, running_var,
                     opts):
  """(y, mu, var) of the training step; mu and var carry no gradient.

  x [..., C] float32; w [...] 1 for the rows of the statistics; keep [...]
  the normalised rows (used with `opts.per_row_keep`); running_mean and
  running_var [C] replace the statistics of a batch without real rows.
  """
  return _forward(x, scale, bias, w, keep, running_mean, running_var,
                  opts)[0]


def _forward(x, scale, bias, w, keep, running_mean, running_var, opts):
  rs, mu, var, count, n_var = _statistics(x, w, running_mean, running_var,
                                          opts)
  inv = jax.lax.rsqrt(var + opts.eps)
  keep_rows = keep if opts.per_row_keep else None
  y = power_kernel.apply(x, rs, inv, scale, bias,
                         mu=mu if opts.center else None, keep=keep_rows)
  residuals = (x, rs, mu, inv, scale, w, keep, count, n_var)
  return (y, mu, var), residuals


def _backward(opts, res, cotangents):
  x, rs, mu, inv, scale, w, keep, count, n_var = res
  dy = cotangents[0]  # mu and var are statistics: no gradient through them
  keep_rows = keep if opts.per_row_keep else None
  mu_k = mu if opts.center else None
  _, dscale, dbias, dkeep = power_kernel.columns(
      x, inv, scale, w, dy, rs=rs, mu=mu_k, keep=keep_rows, with_du=False)
  has_data = count > 0
  a1 = scale * (dkeep if opts.per_row_keep else dbias)
  e = (jnp.where(has_data, a1 / jnp.maximum(count, 1), 0) if opts.center
       else jnp.zeros_like(a1))
  corr = jnp.where(has_data, scale * dscale / jnp.maximum(n_var, 1), 0)
  dx = power_kernel.backward(x, rs, inv, inv, scale, corr, w, dy,
                             opts.num_groups > 0, mu=mu_k, keep=keep_rows,
                             e=e, sums=False)[0]
  return dx, dscale, dbias, None, None, None, None


batch_norm_train.defvjp(_forward, _backward)


def train(xf: Array, mask: Array | None, params, running_mean: Array,
          running_var: Array, opts: BatchOptions, norm: str, axis_name,
          xla) -> tuple[Array, Array, Array, Array]:
  """(y, mu, var, update) of one training step: the fused kernels on CPU
  where usable (`power_kernel.usable(xf, norm)`, no `axis_name`), else (and
  on other platforms) `xla(xf)`, which returns the same four.

  `update`: the batch had real rows and finite statistics.
  """
  if axis_name is not None or not power_kernel.usable(xf, norm):
    return xla(xf)
  dtype = xf.dtype
  p = common.filled_params(params, xf.shape[-1], dtype)
  rows = xf.shape[:-1]
  w = (jnp.ones(rows, dtype) if mask is None
       else jnp.broadcast_to(mask, rows).astype(dtype))
  # The paper's BN drops pad rows; with no real row it normalises them all.
  # The other norms read no keep (w stands in).
  keep = jnp.where(jnp.sum(w) > 0, w, 1) if opts.per_row_keep else w

  def fused(xf, scale, bias, w, keep, running_mean, running_var):
    y, mu, var = batch_norm_train(xf, scale, bias, w, keep, running_mean,
                                  running_var, opts)
    return y, mu, var, (jnp.sum(w) > 0) & common.all_finite(mu, var)
  return power_kernel.on_cpu(
      fused, lambda xf, *_: xla(xf), xf, p['scale'], p['bias'], w, keep,
      running_mean.astype(dtype), running_var.astype(dtype))
