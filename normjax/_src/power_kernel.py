"""Fused PowerNorm and UN training steps for XLA:CPU (`power_kernel.cc`).

PowerNorm's training step under XLA:CPU costs about three LayerNorms: its
masked column reductions over tokens (psi2, dscale, dbias, the gradient
statistic u) run at a fraction of memory speed. Here the forward is two
passes over memory during the warmup (the statistics, then the
normalisation: `d` is only known once every row is seen) and one after it
(`d` comes from phi_{t-1}; psi2 is summed while y is written), and the
approximate backward is one, with
GroupScaling and its VJP fused in and x_s recomputed from x and one float
per row and group. UN's backward needs its gradient statistic before dx, so
it takes two passes.

Each kernel shards over the leading (row) axes under `jax.jit`
(custom_partitioning; column sums are psum'd over the row axes), runs once
per member under `vmap` (the statistics are per member), and the callers
fall back to the jnp math on GPU/TPU, under Explicit meshes and in
`shard_map` bodies (see `cpu_kernel.per_token_norm`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

from normjax._src import cpu_kernel

Array = jax.Array

# Operand / result kinds: 'x' [..., C] and 'r' [..., k] sharded by rows with
# the last axis whole, 'w' [...] sharded by rows, 'c' [C] replicated, 's' [C]
# a column sum (computed per shard, then psum'd over the row axes), 'k' [1]
# a replicated flag.
_RULE = {'x': '... c', 'r': '... g', 'w': '...', 'c': 'c', 's': 'c',
         'k': 'k'}


def _sequential_vmap(f: Callable) -> Callable:
  """`f` under vmap: one call per member (column statistics do not batch)."""
  f = jax.custom_batching.custom_vmap(f)

  @f.def_vmap
  def rule(axis_size, in_batched, *args):
    args = cpu_kernel._batched(args, in_batched, axis_size)
    outs = jax.lax.map(lambda a: f(*a), tuple(args))
    return outs, (True,) * len(outs)
  return f


def _shift(x, w, groups, gs_eps, axes):
  """k [C]: a = x (GroupScaled with `groups`) at the first row with w > 0,
  averaged over the shards of `axes` that have one (0 without any)."""
  rows, real = x.reshape(-1, x.shape[-1]), w.reshape(-1) > 0
  row = rows[jnp.argmax(real)]
  if groups:
    g = row.reshape(groups, -1)
    row = (g * jax.lax.rsqrt(jnp.mean(g * g, -1, keepdims=True) + gs_eps)
           ).reshape(-1)
  has = jnp.any(real)
  row = jnp.where(has, row, 0)
  if axes:
    row = jax.lax.psum(row, axes) / jnp.maximum(
        jax.lax.psum(has.astype(x.dtype), axes), 1)
  return jax.lax.stop_gradient(row)


@functools.cache
def _op(target: str, arg_kinds: str, result_kinds: str, attrs: tuple,
        centered: bool = False, sharded: Callable | None = None
        ) -> Callable:
  """The FFI call `target` as a row-sharded, vmappable JAX function.

  Results take the shape of x ('x'), of rs ('r': x's rows and
  `attrs['rs_width']` columns), [C] ('s', a column sum) or a replicated [C]
  ('c'). `centered` (the statistics): the FFI call gets one more operand,
  the shift: on one device the kernel finds it itself (`find_shift`); on
  row shards `_shift(x, w)` of the whole batch, one psum of [C]. The shift
  used is returned last. `sharded(axes, *args)`, if given, replaces the
  call on row shards (for a kernel whose statistics need a psum midway).
  """
  attrs = dict(attrs)
  rs_width = attrs.pop('rs_width', 1)

  def call_on(axes, *args):
    x = args[0]
    shapes = {'x': x.shape, 'r': x.shape[:-1] + (rs_width,),
              's': x.shape[-1:], 'c': x.shape[-1:]}
    outs = tuple(jax.ShapeDtypeStruct(shapes[k], x.dtype)
                 for k in all_results)
    if centered:  # one device: the kernel finds the shift itself
      k = (_shift(x, args[1], attrs['groups'], attrs['gs_eps'], axes) if axes
           else jnp.zeros(x.shape[-1:], x.dtype))
      return jax.ffi.ffi_call(target, outs, vmap_method='sequential')(
          *args, k, find_shift=not axes, **attrs)
    return jax.ffi.ffi_call(target, outs, vmap_method='sequential')(
        *args, **attrs)

  def shardings(mesh, arg_shapes, kinds):
    rows = cpu_kernel._row_spec(arg_shapes[0])
    spec = {'x': (*rows, None), 'r': (*rows, None), 'w': rows, 'c': (),
            's': (), 'k': ()}
    return tuple(NamedSharding(mesh, PartitionSpec(*spec[k])) for k in kinds)

  def partition(mesh, arg_shapes, result_shape):
    del result_shape
    axes = cpu_kernel._mesh_axes(cpu_kernel._row_spec(arg_shapes[0]))

    def lower(*args):
      if axes and sharded is not None:
        return sharded(axes, *args)
      outs = call_on(axes, *args)
      if axes:  # each shard summed its own rows
        outs = tuple(jax.lax.psum(o, axes) if k == 's' else o
                     for o, k in zip(outs, all_results))
      return outs
    return (mesh, lower, shardings(mesh, arg_shapes, all_results),
            shardings(mesh, arg_shapes, arg_kinds))

  all_results = result_kinds + ('c' if centered else '')
  op = custom_partitioning(lambda *args: call_on((), *args))
  op.def_partition(
      partition=partition,
      infer_sharding_from_operands=lambda mesh, args, res: shardings(
          mesh, args, all_results),
      sharding_rule=(', '.join(_RULE[k] for k in arg_kinds) + ' -> '
                     + ', '.join(_RULE[k] for k in all_results)))
  return _sequential_vmap(op)


def stats(x, w, groups, gs_eps):
  """(rs [..., max(G, 1)], sum_rows(w a^2) [C]) with a = x * rs."""
  zeros = jnp.zeros(x.shape[-1:], x.dtype)
  return _op('normjax_power_stats', 'xwc', 'rssc',
             (('groups', np.int64(groups)), ('gs_eps', np.float32(gs_eps)),
              ('center', False), ('find_shift', False),
              ('rs_width', max(groups, 1))))(x, w, zeros)[:2]


def centered_stats(x, w, groups, gs_eps):
  """(rs, sum_rows(w (a - k)^2), sum_rows(w (a - k)), k): the sums about a
  shift k [C], a = x * rs at one real row (`_shift`), so that the variance
  sq / n - (s1 / n)^2 keeps its precision when the mean is large."""
  return _op('normjax_power_stats', 'xw', 'rss',
             (('groups', np.int64(groups)), ('gs_eps', np.float32(gs_eps)),
              ('center', True), ('rs_width', max(groups, 1))), True)(x, w)


def forward(x, w, phi_prev, scale, bias, in_warmup, groups, gs_eps, eps):
  """PowerNorm's training forward (power_kernel.cc's PowerForward):
  (rs, sum_rows(w a^2), y, inv_d), two passes in the warmup (`in_warmup`
  [1], 1.0 or 0.0) and one after it. No lax.cond: XLA:CPU copies the
  results of a conditional, which cost as much as the pass it saved."""
  attrs = (('groups', np.int64(groups)), ('gs_eps', np.float32(gs_eps)),
           ('eps', np.float32(eps)), ('rs_width', max(groups, 1)))
  sharded = functools.partial(_forward_on_shards, groups, gs_eps, eps)
  return _op('normjax_power_forward', 'xwccck', 'rcxc', attrs,
             sharded=sharded)(x, w, phi_prev, scale, bias, in_warmup)


def _forward_on_shards(groups, gs_eps, eps, axes, x, w, phi_prev, scale,
                       bias, in_warmup):
  """`forward` on row shards: the statistics psum'd before y."""
  rs, sq = stats(x, w, groups, gs_eps)  # this shard's rows
  sq = jax.lax.psum(sq, axes)
  count = jax.lax.psum(jnp.sum(w), axes)
  psi2 = jnp.where(count > 0, sq / jnp.maximum(count, 1), phi_prev)
  inv_d = jnp.where(in_warmup[0] != 0, 1 / jnp.sqrt(psi2 + eps),
                    1 / jnp.sqrt(phi_prev + eps))
  return rs, sq, apply(x, rs, inv_d, scale, bias), inv_d


def _column(v, x):
  return jnp.zeros(x.shape[-1:], x.dtype) if v is None else v


def _row(v, x):
  return jnp.ones(x.shape[:-1], x.dtype) if v is None else v


def _rs(rs, x):
  return jnp.ones(x.shape[:-1] + (1,), x.dtype) if rs is None else rs


def apply(x, rs, inv_d, scale, bias, mu=None, keep=None):
  """y = keep * (x * rs - mu) * inv_d * scale + bias (rs None: 1; mu None:
  0; keep [...] None: 1)."""
  return _op('normjax_power_apply', 'xrcwccc', 'x', ())(
      x, _rs(rs, x), _column(mu, x), _row(keep, x), inv_d, scale, bias)[0]


def backward(x, rs, inv_d, inv_bd, scale, corr, cw, dy, group_scaled,
             mu=None, keep=None, e=None, sums=True):
  """(dx, sum cw g_hat zh, sum dy z, sum dy, sum keep dy); see
  power_kernel.cc (the last is 0 without a per-row `keep`; all four are 0
  without `sums`, a pass that only needs dx)."""
  return _op('normjax_power_bwd', 'xrcwcccccwx', 'xssss',
             (('group_scaled', bool(group_scaled)),
              ('per_row_keep', keep is not None), ('center', mu is not None),
              ('sums', bool(sums))))(
                  x, _rs(rs, x), _column(mu, x), _row(keep, x), inv_d,
                  inv_bd, scale, _column(e, x), corr, cw, dy)


def columns(x, inv_d, scale, cw, dy, rs=None, mu=None, keep=None,
            with_du=True):
  """(sum cw dy scale zh, sum dy z, sum dy, sum keep dy) with
  zh = (x * rs - mu) * inv_d and z = keep * zh (the last is 0 without a
  per-row `keep`, the first without `with_du`)."""
  return _op('normjax_power_columns', 'xrcwccwx', 'ssss',
             (('per_row_keep', keep is not None), ('center', mu is not None),
              ('with_du', bool(with_du))))(
                 x, _rs(rs, x), _column(mu, x), _row(keep, x), inv_d, scale,
                 cw, dy)


# The smallest x (elements) for which each norm takes the fused kernels.
# Measured on the project's 2-core CPU (fwd+bwd of [B, L, C] f32, C 128-256):
# PowerNorm's fused step is level with the jnp path (within 10%) at 2^17
# elements and 2.5x faster from 2^19; UN's, whose jnp path fuses well, is up
# to 1.5x slower below 2^19, level there and faster at 2^22 (the README's
# benchmark). Tests set these to 0 to exercise the kernels on small inputs.
MIN_ELEMENTS = {'power_norm': 0, 'unified_norm': 1 << 19, 'batch_norm': 0,
                'paper_batch_norm': 0, 'pn_v': 0}


def usable(x: Array, norm: str) -> bool:
  """Whether the fused kernels serve `norm` for this `x`: float32, large
  enough (`MIN_ELEMENTS`), the kernel available and x auto-sharded."""
  return (x.dtype == jnp.float32 and x.size > 0
          and x.size >= MIN_ELEMENTS[norm] and cpu_kernel.available()
          and not cpu_kernel._sharded_type(x))


def on_cpu(fused: Callable, fallback: Callable, *args):
  """`fused(*args)` on CPU, `fallback(*args)` on other platforms."""
  return jax.lax.platform_dependent(*args, cpu=fused, default=fallback)


class PowerNormOptions(NamedTuple):
  warmup_steps: int
  alpha_bkw: float
  eps: float
  num_groups: int            # 0: no GroupScaling
  group_scaling_eps: float
  running_backward: bool     # backward_denominator == 'running'


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def power_norm_train(x, scale, bias, stat_w, cw, phi_prev, u, t, opts):
  """PowerNorm's training forward with its approximate backward, fused.

  The math of `power_norm._pn_core` and its surroundings (see `power_norm`):
  x [..., C] float32; stat_w [...] 1 for the real tokens of psi2; cw [...]
  the rows that get the correction and count in u (1 everywhere in the
  official 'padded' mode); phi_prev, u [C]; t the step. Returns
  `(y, psi2)`; the cotangent of u is u_t - u_{t-1}, psi2 carries none.
  """
  return _pn_forward(x, scale, bias, stat_w, cw, phi_prev, u, t, opts)[0]


def _pn_forward(x, scale, bias, stat_w, cw, phi_prev, u, t, opts):
  count = jnp.sum(stat_w)
  has_data = count > 0
  in_warmup = (t <= opts.warmup_steps).astype(x.dtype).reshape(1)
  rs, sq, y, inv_d = forward(x, stat_w, phi_prev, scale, bias, in_warmup,
                             opts.num_groups, opts.group_scaling_eps,
                             opts.eps)
  psi2 = jnp.where(has_data, sq / jnp.maximum(count, 1), phi_prev)
  inv_bd = inv_d if opts.running_backward else 1 / jnp.sqrt(psi2 + opts.eps)
  corr = jnp.where(has_data, (1 - opts.alpha_bkw) * u, 0)
  return (y, psi2), (x, rs, inv_d, inv_bd, scale, corr, cw, has_data)


def _pn_backward(opts, res, cotangents):
  x, rs, inv_d, inv_bd, scale, corr, cw, has_data = res
  dy, _ = cotangents  # psi2 is a statistic: no gradient flows through it
  dx, du, dscale, dbias, _ = backward(x, rs, inv_d, inv_bd, scale, corr,
                                       cw, dy, opts.num_groups > 0)
  du = jnp.where(has_data & jnp.all(jnp.isfinite(du)),
                 du / jnp.maximum(jnp.sum(cw), 1), 0)
  return (dx, dscale, dbias, None, None, jnp.zeros_like(corr), du, None)


power_norm_train.defvjp(_pn_forward, _pn_backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def group_scaled_affine(x, scale, bias, groups, gs_eps):
  """y = a * scale + bias in one pass, a = x * rs: GroupScaling over
  `groups` groups (rs = 1 / sqrt(mean_g(x^2) + gs_eps); 0 groups: a = x).

  The evaluation form of PowerNorm and PN-V (`common.evaluate` with a
  GroupScaling core), which jnp computes in two passes (a, then the affine).
  It is `forward` after the warmup with no statistics rows (w = 0) and
  inv_d = 1 (phi 1, eps 0). Its gradient is `backward` without correction,
  the exact derivative: the kernel's GroupScaling VJP is that of rs.
  """
  return _gsa_forward(x, scale, bias, groups, gs_eps)[0]


def _gsa_forward(x, scale, bias, groups, gs_eps):
  no_rows = jnp.zeros(x.shape[:-1], x.dtype)
  rs, _, y, _ = forward(x, no_rows, jnp.ones_like(scale), scale, bias,
                        jnp.zeros((1,), x.dtype), groups, gs_eps, 0.0)
  return y, (x, rs, scale)


def _gsa_backward(groups, gs_eps, res, dy):
  del gs_eps
  x, rs, scale = res
  no_rows = jnp.zeros(x.shape[:-1], x.dtype)  # cw = 0: no correction, no du
  ones = jnp.ones_like(scale)
  dx, _, dscale, dbias, _ = backward(x, rs, ones, ones, scale,
                                     jnp.zeros_like(scale), no_rows, dy,
                                     groups > 0)
  return dx, dscale, dbias


group_scaled_affine.defvjp(_gsa_forward, _gsa_backward)
