"""Per-token norms without state: LayerNorm, RMSNorm, GroupScaling, CRMSNorm
and LayerNorm Scaling."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from normjax._src import common
from normjax._src import cpu_kernel
from normjax._src import definition as nd
from normjax._src import rules

Array = jax.Array


LAYER_NORM_DOC = """LayerNorm (Ba et al., 2016, https://arxiv.org/abs/1607.06450).

      y = (x - mean(x)) / sqrt(var(x) + eps) * scale + bias

  with the mean and the biased variance over `axis` (default: the features).
  The variance is computed in two passes over pivot-shifted values, so inputs
  with a large mean keep their precision: for 1e4 + 0.01 N(0, 1) in float32
  the output is within 5e-7 of float64, where flax's one-pass variance is
  off by about 30.

  Args:
    x: [..., features] activations.
    params: optional `{'scale': [features], 'bias': [features]}`.
    state: ignored and returned unchanged (stateless norms share the
      signature of the stateful ones).
    mask: True for real tokens, shape broadcastable to `x.shape[:-1]`. It only
      matters when `axis` spans token axes: a per-token reduction has nothing
      to mask, and pad tokens are normalised like any other.
    use_running_average: ignored.
    axis_name: mesh axis name(s) to reduce over when a reduced token axis is
      split by `shard_map`/`pmap`; ignored for per-token reductions and not
      needed under `jax.jit`.

  Returns:
    `(y, state)` with `y` in the dtype of `x`.
  """

RMS_NORM_DOC = """RMSNorm (Zhang & Sennrich, 2019, https://arxiv.org/abs/1910.07467).

      y = x / sqrt(mean(x^2) + eps) * scale (+ bias)

  Arguments as in `layer_norm`; `params` usually holds only `scale`.
  """

GROUP_SCALING_DOC = """GroupScaling of PowerNorm (Shen et al., 2020, https://arxiv.org/abs/2003.07845).

  Splits the features of every token into `num_groups` equal groups and
  divides each group by its root mean square (a per-token, per-group RMSNorm
  without affine):

      y[n, k] = x[n, k] / sqrt(mean_{j in group k} x[n, j]^2 + eps)

  With `num_groups=1` this is RMSNorm without scale. The official PowerNorm
  applies it first, to every token (pads included), with eps = 1e-5.
  `mask`, `use_running_average` and `axis_name` are accepted for a uniform
  signature and ignored; `params` may add an affine map.
  """

CRMS_NORM_DOC = """Compressed RMSNorm (CRMSNorm).

  Jiang et al., "Pre-RMSNorm and Pre-CRMSNorm Transformers", NeurIPS 2023,
  https://arxiv.org/abs/2305.14858.

  A zero-mean vector x in R^d is stored losslessly as its first d - 1
  coordinates x~ = x[:d-1], because x[d-1] = -sum(x~). CRMSNorm is RMSNorm of
  the full vector computed from the compressed one (zoo spec section 4.5):

      y = x~ / sqrt((sum_i x~_i^2 + (sum_i x~_i)^2) / d + eps),  d = dim(x~) + 1

  so `crms_norm(x[..., :-1]) == rms_norm(x)[..., :-1]` for zero-mean x, and
  `== layer_norm(x)[..., :-1]` for any x after recentring (LN(x) is
  RMSNorm(x - mean x) with the same eps). The official code
  (ZixuanJiang/pre-rmsnorm-transformer, `jax/model.py::CRMSNorm`) has no
  affine; `params` may still add `scale`/`bias` of shape [d - 1].

  Args:
    x: [..., d - 1] the compressed activations (features on the last axis).
    params: optional `{'scale', 'bias'}` of shape [d - 1].
    state: returned unchanged.
    mask: validated only: the norm is per token, pads are normalised like any
      other token.
    use_running_average, axis_name: ignored (uniform signature).

  Returns:
    `(y, state)` with `y` in the dtype of `x`.
  """

LAYER_NORM_SCALING_DOC = """LayerNorm Scaling (LNS).

  Sun et al. 2025, "The Curse of Depth in Large Language Models",
  https://arxiv.org/abs/2502.05795:

      y = N(x) / sqrt(l),   N = LayerNorm or RMSNorm with its affine,

  for the pre-attention and pre-MLP norms of block l = 1 ... L (1-based; zoo
  spec section 3). The final norm before the head is *not* scaled: use the
  plain norm there. The forward equals the base norm with scale and bias
  divided by sqrt(l), but the gradients of the affine parameters differ from
  that reparameterisation by the same factor, so this is not an init trick.

  Args:
    x, params, state, axis, mask, eps, axis_name: as in `layer_norm`.
    use_running_average: ignored.
  """


def _canonical_axes(axis: common.Axes, ndim: int, fn: str) -> tuple[int, ...]:
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  out = []
  for a in axes:
    if not -ndim <= a < ndim:
      raise ValueError(f'{fn}: `axis`={axis!r} is out of range for `x` of rank '
                       f'{ndim}.')
    out.append(a % ndim)
  if ndim - 1 not in out:
    raise ValueError(
        f'{fn}: `axis`={axis!r} must include the feature axis -1 (features '
        'are on the last axis; `axis` lists the reduction axes).')
  return tuple(sorted(set(out)))


def _centered_and_var(x: Array, axes: tuple[int, ...], mask: Array | None,
                      axis_name: Any, center: bool) -> tuple[Array, Array]:
  """(x - mean, var) over `axes`; without centring (x, mean(x^2)).

  Two passes over values shifted by a per-token pivot (the token's first
  feature): the variance keeps full precision when the mean is large next to
  the spread (flax's one-pass variance does not), at the memory cost of one
  pass.
  """
  token_axes = tuple(a for a in axes if a != x.ndim - 1)
  where = None
  if mask is not None and token_axes:  # a per-token reduction ignores mask
    where = jnp.broadcast_to(mask[..., None], x.shape)

  def mean(v):
    if where is None:
      s = jnp.sum(v, axis=axes, keepdims=True)
      n = jnp.asarray(math.prod(x.shape[a] for a in axes), v.dtype)
    else:
      s = jnp.sum(jnp.where(where, v, 0), axis=axes, keepdims=True)
      n = jnp.sum(where, axis=axes, keepdims=True, dtype=v.dtype)
    if axis_name is not None and token_axes:  # per-token: nothing to share
      s, n = jax.lax.psum((s, n), axis_name)
    return s / jnp.maximum(n, 1)

  if not center:
    return x, mean(jnp.square(x))
  if not token_axes:
    x = x - jax.lax.stop_gradient(x[..., :1])
  centered = x - mean(x)
  return centered, mean(jnp.square(centered))


def _per_token_norm(fn, center, x, params, state, axis, mask, eps,
                    axis_name):
  """LayerNorm (center=True) or RMSNorm: checks, statistics, affine."""
  x = common.check_input(x, fn)
  params = common.check_params(params, x.shape[-1], fn)
  mask = common.check_mask(mask, x, fn)
  axes = _canonical_axes(axis, x.ndim, fn)
  dtype = common.stats_dtype(x)

  def xla_math(v, params):
    values, second_moment = _centered_and_var(v, axes, mask, axis_name,
                                              center)
    return common.affine(values * jax.lax.rsqrt(second_moment + eps), params,
                         dtype)

  if axes == (x.ndim - 1,) and dtype == jnp.float32 and x.size:
    y = _fused(x.astype(dtype), params, eps, center, xla_math)
  else:
    y = xla_math(x.astype(dtype), params)
  return y.astype(x.dtype), state


def _fused(x: Array, params: dict[str, Array], eps: float, center: bool,
           xla_math) -> Array:
  """A per-token norm over the last axis through the fused CPU kernel."""
  if not cpu_kernel.available():
    return xla_math(x, params)
  c = x.shape[-1]
  scale = params.get('scale', jnp.ones((c,), x.dtype)).astype(x.dtype)
  bias = params.get('bias', jnp.zeros((c,), x.dtype)).astype(x.dtype)
  return cpu_kernel.per_token_norm(
      x, scale, bias, eps=eps, center=center,
      fallback=lambda v, s, b: xla_math(v, {'scale': s, 'bias': b}))


def _layer_norm(x, params, state, *, mask, use_running_average, axis_name,
                axis, eps):
  del use_running_average
  return _per_token_norm('layer_norm', True, x, params, state, axis, mask,
                         eps, axis_name)


def _rms_norm(x, params, state, *, mask, use_running_average, axis_name,
              axis, eps):
  del use_running_average
  return _per_token_norm('rms_norm', False, x, params, state, axis, mask,
                         eps, axis_name)


def _own_affine(kind: str):
  """The evaluation affine of a per-token norm: its own scale and bias."""
  def eval_affine(params, state, options, xp):
    del state, xp
    if options.get('axis', -1) not in (-1, (-1,)):
      raise ValueError(
          f"fold: a {kind} over axis={options['axis']} is not per token; "
          'its affine map cannot be folded.')
    return nd.EvalAffine(scale=params['scale'], center=None,
                         bias=params['bias'], core=(kind, dict(options)))
  return eval_affine


_AXIS = nd.Option('axis', -1, 'reduction axes; must include -1.',
                  field='reduction_axes')
_PER_TOKEN_EPS = nd.Option('eps', 1e-6, 'added to the variance (flax 1e-6; '
                           'fairseq uses 1e-5).', field='epsilon',
                           check=rules.EPS)

LAYER_NORM = nd.register(nd.NormDefinition(
    kind='layernorm', name='layer_norm', module='LayerNorm',
    options=(_AXIS, _PER_TOKEN_EPS), doc=LAYER_NORM_DOC, apply=_layer_norm,
    eval_affine=_own_affine('layernorm')))
layer_norm = LAYER_NORM.function

RMS_NORM = nd.register(nd.NormDefinition(
    kind='rmsnorm', name='rms_norm', module='RMSNorm',
    options=(_AXIS, _PER_TOKEN_EPS._replace(
        doc='added to the mean square (flax 1e-6).')),
    doc=RMS_NORM_DOC, apply=_rms_norm, use_bias=False,
    eval_affine=_own_affine('rmsnorm')))
rms_norm = RMS_NORM.function


def group_scale(x: Array, num_groups: int, eps: float = 1e-5) -> Array:
  """Array form of `group_scaling`, in the dtype of `x`, without checks."""
  c = x.shape[-1]
  xg = x.reshape(x.shape[:-1] + (num_groups, c // num_groups))

  def xla_math(v, params):
    del params
    return v * jax.lax.rsqrt(jnp.mean(jnp.square(v), -1, keepdims=True) + eps)

  if x.dtype == jnp.float32 and x.size:
    return _fused(xg, {}, eps, False, xla_math).reshape(x.shape)
  return xla_math(xg, {}).reshape(x.shape)


def check_num_groups(num_groups: Any, features: int, fn: str) -> None:
  if not rules.COUNT.accepts(num_groups):
    raise ValueError(f'{fn}: `num_groups` must be a positive int, got '
                     f'{num_groups!r}.')
  if features % num_groups:
    raise ValueError(
        f'{fn}: `num_groups`={num_groups} must divide the number of features '
        f'{features} (the official code sets it to the number of attention '
        'heads).')


def _group_scaling(x, params, state, *, mask, use_running_average,
                   axis_name, num_groups, eps):
  del use_running_average, axis_name
  fn = 'group_scaling'
  x = common.check_input(x, fn)
  common.check_mask(mask, x, fn)
  params = common.check_params(params, x.shape[-1], fn)
  check_num_groups(num_groups, x.shape[-1], fn)
  dtype = common.stats_dtype(x)
  y = common.affine(group_scale(x.astype(dtype), num_groups, eps), params,
                    dtype)
  return y.astype(x.dtype), state


GROUP_SCALING = nd.register(nd.NormDefinition(
    kind='group_scaling', name='group_scaling', module='GroupScaling',
    options=(nd.Option('num_groups', 1, 'groups of features, each divided '
                       'by its root mean square.', check=rules.COUNT),
             nd.Option('eps', 1e-5, 'added to the mean square (PowerNorm '
                       '1e-5).', field='epsilon', check=rules.EPS)),
    doc=GROUP_SCALING_DOC, apply=_group_scaling, use_scale=False,
    use_bias=False, eval_affine=_own_affine('group_scaling')))
group_scaling = GROUP_SCALING.function


# ---------------------------------------------------------------------------
# Shared by the norm zoo (DyT, GroupNorm/EvoNorm, TD-LN, QK-norm): parameter
# dicts with names beyond `scale`/`bias`.


# ---------------------------------------------------------------------------
# CRMSNorm and LayerNorm Scaling.


def _crms_norm(x, params, state, *, mask, use_running_average, axis_name,
               eps):
  del use_running_average, axis_name
  fn = 'crms_norm'
  x = common.check_input(x, fn)
  params = common.check_params(params, x.shape[-1], fn)
  common.check_mask(mask, x, fn)
  dtype = common.stats_dtype(x)
  xs = x.astype(dtype)
  d = x.shape[-1] + 1
  missing = jnp.sum(xs, axis=-1, keepdims=True)  # = -x[d-1]
  ms = (jnp.sum(jnp.square(xs), axis=-1, keepdims=True)
        + jnp.square(missing)) / d
  y = common.affine(xs * jax.lax.rsqrt(ms + eps), params, dtype)
  return y.astype(x.dtype), state


CRMS_NORM = nd.register(nd.NormDefinition(
    kind='crmsnorm', name='crms_norm', module='CRMSNorm',
    options=(_PER_TOKEN_EPS._replace(
        doc='added to the mean square (flax RMSNorm 1e-6).'),),
    doc=CRMS_NORM_DOC, apply=_crms_norm, use_scale=False, use_bias=False,
    eval_affine=_own_affine('crmsnorm')))
crms_norm = CRMS_NORM.function


def layer_norm_scaling_factor(layer_index: Any) -> Any:
  """1 / sqrt(l) for block l = 1, 2, ... (LayerNorm Scaling, zoo spec 3).

  The official code computes `1 / sqrt(layer_index + 1)` with a 0-based
  index; here the index is 1-based, so block 1 is unscaled. A Python int
  gives a Python float (checked to be >= 1); an array (e.g. the index of a
  `nn.scan` over layers) gives an array.
  """
  if isinstance(layer_index, bool):
    raise TypeError('layer_norm_scaling: `layer_index` must be an int >= 1 '
                    '(blocks are counted from 1), got a bool.')
  if isinstance(layer_index, (int, np.integer)):
    if layer_index < 1:
      raise ValueError(
          f'layer_norm_scaling: `layer_index` must be >= 1 (blocks are '
          f'counted from 1; the official code uses 1/sqrt(i + 1) for a '
          f'0-based i), got {layer_index}.')
    return 1.0 / math.sqrt(int(layer_index))
  if isinstance(layer_index, float):
    raise TypeError(
        f'layer_norm_scaling: `layer_index` must be an int >= 1, got the '
        f'float {layer_index!r}.')
  layer_index = jnp.asarray(layer_index)
  if layer_index.ndim:
    raise ValueError(
        'layer_norm_scaling: `layer_index` must be a scalar (one index per '
        f'block), got shape {tuple(layer_index.shape)}.')
  return jax.lax.rsqrt(layer_index.astype(float))  # default float dtype


def _layer_norm_scaling(x, params, state, *, mask, use_running_average,
                        axis_name, layer_index, base, axis, eps):
  del use_running_average
  fn = 'layer_norm_scaling'
  if layer_index is None:
    raise ValueError(
        f'{fn}: set `layer_index`, the 1-based index of the block (e.g. '
        'make_norm("layernorm_scaling", layer_index=l)).')
  common.check_choice(base, 'base', ('layernorm', 'rmsnorm'), fn)
  factor = layer_norm_scaling_factor(layer_index)
  x = common.check_input(x, fn)
  params = common.check_params(params, x.shape[-1], fn)
  mask = common.check_mask(mask, x, fn)
  axes = _canonical_axes(axis, x.ndim, fn)
  dtype = common.stats_dtype(x)
  values, second_moment = _centered_and_var(x.astype(dtype), axes, mask,
                                            axis_name, base == 'layernorm')
  y = common.affine(values * jax.lax.rsqrt(second_moment + eps), params,
                    dtype)
  return (y * jnp.asarray(factor, dtype)).astype(x.dtype), state


LAYER_NORM_SCALING = nd.register(nd.NormDefinition(
    kind='layernorm_scaling', name='layer_norm_scaling',
    module='LayerNormScaling',
    options=(
        nd.Option('layer_index', None, 'l >= 1, a Python int or a scalar '
                  'array; required (block 1 is the unscaled one).'),
        nd.Option('base', 'layernorm', "'layernorm' or 'rmsnorm' (the "
                  "official code scales LLaMA's RMSNorm).",
                  check=rules.one_of('layernorm', 'rmsnorm')),
        _AXIS, _PER_TOKEN_EPS),
    doc=LAYER_NORM_SCALING_DOC, apply=_layer_norm_scaling))
layer_norm_scaling = LAYER_NORM_SCALING.function
