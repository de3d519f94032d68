"""Shared pieces of the functional norms: validation, masked statistics, grouping.

Conventions (one meaning per word, used by every norm in normjax):
  * features live on the last axis of `x`;
  * `axis` names *reduction* axes (per-token norms only);
  * `mask` is True for real tokens and has one entry per token: its shape
    broadcasts to `x.shape[:-1]` (a trailing singleton axis is accepted too);
  * statistics are computed in `stats_dtype(x)` (at least float32) and the
    output has the dtype of `x`;
  * parameters are `params['scale']` and `params['bias']`, as in flax.linen.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from normjax._src import power_kernel

Array = jax.Array
Params = Mapping[str, Array] | None
Axes = int | Sequence[int]


class EmptyState(NamedTuple):
  """State of a stateless norm, so that every norm has the same signature."""


def stats_dtype(x: Array) -> jnp.dtype:
  """The dtype statistics are computed in: float32, or float64 for f64 input."""
  return jnp.promote_types(x.dtype, jnp.float32)


def check_input(x: Any, fn: str, *, min_rank: int = 1) -> Array:
  """Checks `x` at trace time and returns it as an array."""
  if not hasattr(x, 'dtype') or not hasattr(x, 'shape'):
    x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(
        f'{fn}: `x` must be a floating-point array, got dtype {x.dtype}. '
        'Cast it first, e.g. x.astype(jnp.float32).')
  if x.ndim < min_rank:
    need = ('[batch, ..., features]' if min_rank > 1 else '[..., features]')
    raise ValueError(
        f'{fn}: `x` must have rank >= {min_rank} with shape {need} '
        f'(features on the last axis), got shape {tuple(x.shape)}.')
  if x.shape[-1] == 0:
    raise ValueError(f'{fn}: `x` has no features (shape {tuple(x.shape)}).')
  return x


def check_params(params: Params, features: int, fn: str) -> dict[str, Array]:
  """Checks that `params` holds only `scale`/`bias` of shape [features]."""
  return check_named_params(params, fn, {'scale': (features,),
                                         'bias': (features,)}, features)


def check_named_params(params: Any, fn: str,
                       expected: dict[str, Any], features: int | None = None,
                       path: str = 'params') -> dict[str, Array]:
  """Checks a parameter dict against `expected` = {name: shape or shapes}.

  A shape is a tuple; a tuple of tuples lists alternatives. Every key is
  optional. Errors name the key and the expected shape, as
  `check_params` does for `scale`/`bias`.
  """
  if params is None:
    return {}
  names = list(expected)
  listed = (', '.join(repr(n) for n in names[:-1]) + f' and {names[-1]!r}'
            if len(names) > 1 else repr(names[0]))
  if not isinstance(params, Mapping):
    raise TypeError(
        f'{fn}: `{path}` must be a mapping with optional keys {listed} (or '
        f'None), got {type(params).__name__}.')
  unknown = set(params) - set(expected)
  if unknown:
    raise ValueError(
        f'{fn}: `{path}` has unknown keys {sorted(unknown)}; expected only '
        f'{listed}.')
  for name, value in params.items():
    want = expected[name]
    options = want if want and isinstance(want[0], tuple) else (want,)
    got = tuple(jnp.shape(value))
    if got not in options:
      shown = ' or '.join(str(o) for o in options)
      why = (f' but `x` has {features} features'
             if features is not None and (features,) in options else '')
      raise ValueError(
          f"{fn}: `{path}['{name}']` has shape {got}{why}; expected shape "
          f'{shown}.')
  return dict(params)


def check_mask(mask: Any, x: Array, fn: str) -> Array | None:
  """Returns the mask broadcast to `x.shape[:-1]` as bool, or None."""
  if mask is None:
    return None
  if not hasattr(mask, 'shape'):
    mask = jnp.asarray(mask)
  if mask.dtype != jnp.bool_:
    raise TypeError(
        f'{fn}: `mask` must be boolean (True for real tokens), got dtype '
        f'{mask.dtype}. Use mask.astype(bool); if you hold a padding mask '
        '(True = pad), pass ~pad_mask.')
  shape = tuple(mask.shape)
  token_shape = tuple(x.shape[:-1])
  if len(shape) == x.ndim and shape[-1] == 1:
    shape = shape[:-1]
    mask = mask.reshape(shape)
  try:
    if len(shape) > len(token_shape):
      raise ValueError
    jnp.broadcast_shapes(shape, token_shape)
    if jnp.broadcast_shapes(shape, token_shape) != token_shape:
      raise ValueError
  except ValueError:
    raise ValueError(
        f'{fn}: `mask` has shape {tuple(mask.shape)}, which does not '
        f'broadcast to the token shape x.shape[:-1] = {token_shape} '
        f'(x has shape {tuple(x.shape)}). The mask has one entry per token, '
        'True for real tokens.') from None
  return jnp.broadcast_to(mask, token_shape)


def check_choice(value: Any, name: str, choices: Sequence[Any], fn: str):
  if value not in choices:
    raise ValueError(
        f'{fn}: `{name}` must be one of {list(choices)}, got {value!r}.')


def check_state(state: NamedTuple, expected: NamedTuple, fn: str,
                init_name: str):
  """Checks that every leaf of `state` has the shape of a fresh state."""
  if not isinstance(state, type(expected)):
    raise TypeError(
        f'{fn}: `state` must be a {type(expected).__name__}, got '
        f'{type(state).__name__}. Create one with {init_name}(...).')
  for name in expected._fields:
    got = tuple(jnp.shape(getattr(state, name)))
    want = tuple(jnp.shape(getattr(expected, name)))
    if got != want:
      raise ValueError(
          f'{fn}: `state.{name}` has shape {got}, expected {want} for this '
          f'input and these options. Create the state with {init_name}(...) '
          'using the same features, window sizes and num_batch_groups.')


def feat(v: Array, ndim: int) -> Array:
  """A per-feature vector [C] shaped [1, ..., 1, C] to broadcast explicitly.

  Explicit ranks keep the norms usable under
  `jax_numpy_rank_promotion='raise'`.
  """
  return jnp.reshape(v, (1,) * (ndim - 1) + jnp.shape(v)[-1:])


def affine(z: Array, params: Mapping[str, Array], dtype) -> Array:
  """y = z * scale + bias (each optional), in the statistics dtype."""
  if 'scale' in params:
    z = z * feat(params['scale'].astype(dtype), z.ndim)
  if 'bias' in params:
    z = z + feat(params['bias'].astype(dtype), z.ndim)
  return z


def batch_axes(x: Array) -> tuple[int, ...]:
  """Every axis of `x` except the feature axis."""
  return tuple(range(x.ndim - 1))


def masked_row_mean(v: Array, mask: Array | None, axis_name: Any = None
                    ) -> tuple[Array, Array]:
  """Per-feature mean of `v` [..., C] over rows where `mask` is True.

  `mask` may be boolean or 0/1 (the custom backward rules carry it as a
  float residual). Returns `(mean [C], count)`, where count is the number of
  rows taken (summed over `axis_name` when given). With no rows the mean is 0.
  """
  axes = batch_axes(v)
  if mask is not None:
    mask = mask.astype(bool)
  if mask is None:
    total = jnp.sum(v, axis=axes)
    count = jnp.asarray(v.size // v.shape[-1], v.dtype)
  else:
    total = jnp.sum(jnp.where(mask[..., None], v, 0), axis=axes)
    count = jnp.sum(mask, dtype=v.dtype)
  if axis_name is not None:
    total, count = jax.lax.psum((total, count), axis_name)
  return total / jnp.maximum(count, 1), count


def split_batch_groups(num_batch_groups: int, x: Array, mask: Array | None,
                       fn: str) -> tuple[Array, Array | None]:
  """[B, ...] -> [G, B // G, ...] for virtual per-group statistics."""
  if not isinstance(num_batch_groups, int) or num_batch_groups < 1:
    raise ValueError(
        f'{fn}: `num_batch_groups` must be a positive int, got '
        f'{num_batch_groups!r}.')
  if x.ndim < 2 or x.shape[0] % num_batch_groups:
    raise ValueError(
        f'{fn}: `num_batch_groups`={num_batch_groups} must divide the leading '
        f'(batch) axis of `x`, which has shape {tuple(x.shape)}.')
  g = num_batch_groups
  try:
    x = x.reshape((g, x.shape[0] // g) + x.shape[1:])
  except Exception as e:  # jax's ShardingTypeError is not public
    if type(e).__name__ != 'ShardingTypeError':
      raise
    raise ValueError(
        f'{fn}: `num_batch_groups`={g} cannot split a batch axis sharded '
        f'over Explicit mesh axes ({jax.typeof(x)}). Use a multiple of the '
        'number of devices on those axes, or a mesh with '
        'axis_types=(jax.sharding.AxisType.Auto, ...).') from None
  if mask is not None:
    mask = mask.reshape((g, mask.shape[0] // g) + mask.shape[1:])
  return x, mask


def apply_grouped(fn: Callable, num_batch_groups: int, x: Array,
                  mask: Array | None, state: NamedTuple, *args,
                  name: str) -> tuple[Array, NamedTuple]:
  """Runs `fn(x, mask, state, *args)` once per virtual batch group.

  With one group this is a plain call. With G groups the leading batch axis
  is split into G equal parts and every state leaf carries a leading axis of
  size G: each group keeps its own statistics, as each data-parallel replica
  did in the official PyTorch runs (buffers were not synchronised).
  """
  if num_batch_groups == 1:
    return fn(x, mask, state, *args)
  shape = x.shape
  xg, maskg = split_batch_groups(num_batch_groups, x, mask, name)
  state = _shard_like_groups(state, xg)
  in_axes = (0, None if mask is None else 0, 0) + (None,) * len(args)
  y, new_state = jax.vmap(fn, in_axes=in_axes)(xg, maskg, state, *args)
  return y.reshape(shape), new_state


def _shard_like_groups(state: NamedTuple, xg: Array) -> NamedTuple:
  """On Explicit meshes, shards the state's group axis like the groups of x."""
  sharding = getattr(jax.typeof(xg), 'sharding', None)
  spec = getattr(sharding, 'spec', None)
  if not spec or spec[0] is None or not getattr(sharding.mesh, 'axis_types',
                                                  None):
    return state
  explicit = jax.sharding.AxisType.Explicit
  if explicit not in sharding.mesh.axis_types:
    return state
  return jax.tree.map(
      lambda v: jax.sharding.reshard(
          v, jax.P(spec[0], *([None] * (v.ndim - 1)))), state)


def group_state(state: NamedTuple, num_batch_groups: int) -> NamedTuple:
  """Replicates a fresh state over `num_batch_groups` virtual groups."""
  if num_batch_groups == 1:
    return state
  return jax.tree.map(
      lambda v: jnp.broadcast_to(v, (num_batch_groups,) + jnp.shape(v)), state)


def first_group(state: NamedTuple, num_batch_groups: int) -> NamedTuple:
  """Group 0's state: what the official checkpoints held (rank 0's buffers)."""
  if num_batch_groups == 1:
    return state
  return jax.tree.map(lambda v: v[0], state)


def all_finite(*arrays: Array) -> Array:
  """One bool scalar: True when no entry of `arrays` is NaN or infinite.

  The stateful norms test their per-feature batch statistics with it (a [C]
  reduction, not one over x): a non-finite real token makes its feature's
  statistic non-finite, and statistics are already summed over `axis_name`,
  so every member of the axis sees the same answer.
  """
  return functools.reduce(
      jnp.logical_and, [jnp.all(jnp.isfinite(a)) for a in arrays])


def batch_moments(xf: Array, mask: Array | None, axis_name: Any,
                  running_var: Array, running_mean: Array | None = None
                  ) -> tuple[Array, Array, Array]:
  """`(mu, var, update)`: the per-feature mean and biased variance of `xf`
  over its real rows (summed over `axis_name`), the batch norms' statistics.

  With no real row they are the running values (`running_mean` None: `mu`
  as computed); `update` is False then, or when a statistic is not finite,
  and the caller keeps its state (`keep_if`).
  """
  mu, count = masked_row_mean(xf, mask, axis_name)
  var, _ = masked_row_mean(jnp.square(xf - feat(mu, xf.ndim)), mask,
                           axis_name)
  has_data = count > 0
  update = has_data & all_finite(mu, var)
  if running_mean is not None:
    mu = jnp.where(has_data, mu, running_mean.astype(xf.dtype))
  var = jnp.where(has_data, var, running_var.astype(xf.dtype))
  return mu, var, update


def keep_if(pred: Array, new: NamedTuple, old: NamedTuple) -> NamedTuple:
  """Leafwise `where(pred, new, old)`, keeping the old dtypes."""
  return jax.tree.map(
      lambda n, o: jnp.where(pred, n.astype(o.dtype), o), new, old)


# ---------------------------------------------------------------------------
# The skeleton of the stateful norms (BatchNorm, PN-V, PowerNorm, UN): each
# supplies its training step and its evaluation-mode affine map (see
# `normjax._src.definition.NormDefinition`); validation, evaluation and
# virtual batch groups are here, once.


def stateful_apply(definition: Any, x: Array, params: Params, state: Any, *,
                   mask: Array | None, use_running_average: bool,
                   axis_name: Any, num_batch_groups: int, **options: Any
                   ) -> tuple[Array, Any]:
  """`definition`'s norm: checks, then evaluation or grouped training."""
  fn = definition.name
  x = check_input(x, fn, min_rank=2)
  features = x.shape[-1]
  if definition.check is not None:
    definition.check(options, features, fn)
  params = check_named_params(
      params, fn, {'scale': (features,), 'bias': (features,),
                   **{s.name: s.layout(features, None, options)[0]
                      for s in definition.extra_params}}, features)
  mask = check_mask(mask, x, fn)
  fresh = definition.init_state(features, jnp.float32,
                                {**options, 'num_batch_groups': 1})
  if use_running_average:
    evaluation_state = first_group(state, num_batch_groups)
    check_state(evaluation_state, fresh, fn, definition.state_maker)
    if definition.evaluate is not None:  # not an affine map (EvoNorm-B0)
      y = definition.evaluate(x, mask, evaluation_state, params, options)
      return y.astype(x.dtype), state
    return evaluate(definition, x, params, evaluation_state, options), state
  check_state(state, group_state(fresh, num_batch_groups), fn,
              definition.state_maker)

  def train(xg, maskg, st):
    y, new_state = definition.train(xg, maskg, st, params, options, axis_name)
    return y.astype(x.dtype), new_state

  return apply_grouped(train, num_batch_groups, x, mask, state, name=fn)


def filled_params(params: Mapping[str, Array], features: int, dtype
                  ) -> dict[str, Array]:
  """`scale` and `bias` [C] in `dtype`: the given ones, else ones and zeros."""
  return {'scale': params.get('scale', jnp.ones((features,), dtype)
                              ).astype(dtype),
          'bias': params.get('bias', jnp.zeros((features,), dtype)
                             ).astype(dtype)}


def evaluate(definition: Any, x: Array, params: Mapping[str, Array],
             state: Any, options: Mapping[str, Any]) -> Array:
  """y = scale * (core(x) - center) + bias from `definition.eval_affine`."""
  dtype = stats_dtype(x)
  state = jax.tree.map(
      lambda v: v.astype(dtype) if jnp.issubdtype(v.dtype, jnp.floating)
      else v, state)
  aff = definition.eval_affine(filled_params(params, x.shape[-1], dtype),
                               state, options, jnp)
  kind, core_options = aff.core
  z = x.astype(dtype)
  core = definition.registered(kind) if kind != 'none' else None
  core_options = core.resolve(core_options) if core else {}

  def two_passes(z, scale, bias):
    if core:
      z, _ = core.apply(z, None, None, mask=None, use_running_average=False,
                        axis_name=None, **core_options)
    if aff.center is not None:
      z = z - feat(aff.center, z.ndim)
    return z * feat(scale, z.ndim) + feat(bias, z.ndim)

  if (kind == 'group_scaling' and aff.center is None
      and power_kernel.usable(z, 'power_norm')):  # PowerNorm, PN-V: one pass
    y = power_kernel.on_cpu(
        lambda *a: power_kernel.group_scaled_affine(
            *a, core_options['num_groups'], core_options['eps']),
        two_passes, z, aff.scale, aff.bias)
  else:
    y = two_passes(z, aff.scale, aff.bias)
  return y.astype(x.dtype)


# ---------------------------------------------------------------------------
# Backward-pass statistics must be differentiated, or frozen on purpose.


def _is_primal(v: Any) -> bool:
  return isinstance(v, jax.custom_derivatives.CustomVJPPrimal)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def require_backward_stats(inputs: Any, stats: Any, fn: str,
                           names: tuple[str, ...]) -> Any:
  """Returns `inputs`; differentiating them without `stats` is an error.

  PowerNorm's and UN's backward passes return the update of their backward
  statistics (`names`) as the cotangents of those state leaves. A train step
  that differentiates the loss with respect to the inputs or parameters but
  not the statistics would silently train another algorithm (the statistics
  never move), so this identity raises at trace time, from its forward rule,
  which JAX calls with each argument's `perturbed` bit (under jit, vmap,
  remat and sharding alike).
  """
  del stats, fn, names
  return inputs


def _require_fwd(inputs, stats, fn, names):
  leaves = functools.partial(jax.tree.leaves, is_leaf=_is_primal)
  used = any(p.perturbed for p in leaves(inputs))
  given = all(p.perturbed for p in leaves(stats))
  if used and not given:
    listed = ', '.join(f'state.{n}' for n in names)
    raise ValueError(
        f'{fn}: the loss is differentiated with respect to the input or the '
        f'parameters but not the backward statistics ({listed}), whose '
        'updates come back as their gradients: they would never move, and '
        'this would train a different algorithm. Differentiate with respect '
        'to them too and add the result to them (plain JAX, equinox and '
        'flax.linen: normjax.value_and_grad(loss_fn)(params, states), with '
        "the states or linen's 'grad_stats' collection beside the params; "
        'flax.nnx: normjax.nnx.value_and_grad), or pass '
        'freeze_backward_stats=True to keep them fixed on purpose.')
  return jax.tree.map(lambda p: p.value, inputs, is_leaf=_is_primal), None


def _require_bwd(fn, names, residuals, cotangents):
  del fn, names, residuals
  zero = jax.custom_derivatives.SymbolicZero
  cotangents = jax.tree.map(
      lambda c: jnp.zeros(c.shape, c.dtype) if isinstance(c, zero) else c,
      cotangents, is_leaf=lambda c: isinstance(c, zero))
  return cotangents, None


require_backward_stats.defvjp(_require_fwd, _require_bwd,
                              symbolic_zeros=True)


def guard_backward_stats(x: Array, params: Mapping[str, Array], state: Any,
                         options: Mapping[str, Any], fn: str,
                         names: tuple[str, ...]) -> tuple[Array, Any, Any]:
  """(x, params, state) with the backward statistics `names` checked.

  With `freeze_backward_stats` the statistics are constants (their
  cotangents are zero, so they stay as they are); otherwise differentiating
  x or params without them raises (`require_backward_stats`).
  """
  if options['freeze_backward_stats']:
    frozen = {n: jax.lax.stop_gradient(getattr(state, n)) for n in names}
    return x, params, state._replace(**frozen)
  stats = tuple(getattr(state, n) for n in names)
  x, params = require_backward_stats((x, params), stats, fn, names)
  return x, params, state


FREEZE_BACKWARD_STATS_DOC = (
    'True keeps the backward statistics fixed on purpose (they are used but '
    'never updated); False (default) makes differentiating the input or '
    'parameters without them an error, since they would silently stay put.')
