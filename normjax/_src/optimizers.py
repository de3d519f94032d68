"""Optimizers for scale-invariant weights (zoo spec §12), as optax transforms.

* `adamp`: AdamP (Heo et al., ICLR 2021; clovaai/AdamP `adamp/adamp.py`):
  Adam whose update of a weight detected as scale-invariant (the gradient
  nearly orthogonal to the weight) loses its radial component, and whose
  decoupled weight decay is then scaled by `wd_ratio`.
* `nap_project`: the *Project* half of Normalize-and-Project (Lyle et al.
  2024, arXiv 2407.01800): after each step every masked weight goes back to
  its initial Frobenius norm, W <- W ||W_0|| / ||W||. Chain it after any
  optimizer: `optax.chain(optax.adam(lr), nap_project(mask))`.

Per tensor p (gradient g, step t = count + 1, lr = learning_rate(count)),
AdamP is

    m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2
    u  = m / (sqrt(v) / sqrt(1 - b2^t) + eps)        (nesterov: the numerator
                                                      is b1 m + (1 - b1) g)
    for view in (channel, layer), only if p.ndim >= 2:
      rows of the view: channel = one row per output unit (flax's last axis,
      PyTorch's dim 0), layer = one row of every entry
      if max_rows |cos(g_row, p_row)| < delta / sqrt(row length):
        u_row <- u_row - p^_row <p^_row, u_row>,  p^_row = p_row / (|p_row| + eps)
        wd_factor = wd_ratio; stop
    p <- p (1 - lr weight_decay wd_factor) - lr / (1 - b1^t) u

with cos(x, y) = <x, y> / (max(|x|, eps) max(|y|, eps)) (torch's
`F.cosine_similarity` with `eps`). Without a projection (1-D params, or no
view below the threshold) this is `optax.adamw` with `nesterov=False`.
The view test depends on values, so both projections are computed and
selected with `jnp.where`: jit-compatible, no Python branch on data.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

ScalarOrSchedule = float | jax.Array | optax.Schedule
Mask = Any  # a pytree of bools like the params, or params -> that pytree


class AdamPState(NamedTuple):
  """count: updates so far (int32); mu, nu: Adam's first and second moments."""
  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates


def _rows(x: jax.Array, view: str) -> jax.Array:
  """The rows of a view: 'channel' [out, rest] (out = flax's last axis),
  'layer' [1, everything]."""
  if view == 'channel':
    return jnp.moveaxis(x, -1, 0).reshape(x.shape[-1], -1)
  return x.reshape(1, -1)


def _unrows(rows: jax.Array, like: jax.Array, view: str) -> jax.Array:
  if view == 'channel':
    moved = rows.reshape((like.shape[-1],) + like.shape[:-1])
    return jnp.moveaxis(moved, 0, -1)
  return rows.reshape(like.shape)


def _cosine(x: jax.Array, y: jax.Array, eps: float) -> jax.Array:
  """|cos| per row, torch's F.cosine_similarity(x, y, dim=1, eps).abs()."""
  nx = jnp.maximum(jnp.linalg.norm(x, axis=1), eps)
  ny = jnp.maximum(jnp.linalg.norm(y, axis=1), eps)
  return jnp.abs(jnp.sum(x * y, axis=1) / (nx * ny))


def _project(p: jax.Array, u: jax.Array, view: str, eps: float
             ) -> jax.Array:
  """u with each row's component along p^ = p / (|p| + eps) removed."""
  pr, ur = _rows(p, view), _rows(u, view)
  unit = pr / (jnp.linalg.norm(pr, axis=1, keepdims=True) + eps)
  ur = ur - unit * jnp.sum(unit * ur, axis=1, keepdims=True)
  return _unrows(ur, u, view)


def adamp_projection(p: jax.Array, g: jax.Array, u: jax.Array, *,
                     delta: float, wd_ratio: float, eps: float
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(projected u, weight-decay factor, view) for one tensor: view 0 none,
  1 channel, 2 layer (AdamP's `_projection`, traced values only)."""
  if p.ndim < 2:
    return u, jnp.ones((), u.dtype), jnp.zeros((), jnp.int32)
  out, factor = u, jnp.ones((), u.dtype)
  view_used = jnp.zeros((), jnp.int32)
  # Reverse order: a passing channel view overrides the layer view.
  for code, view in ((2, 'layer'), (1, 'channel')):
    rows_p = _rows(p, view)
    threshold = delta / jnp.sqrt(jnp.asarray(rows_p.shape[1], u.dtype))
    passes = jnp.max(_cosine(_rows(g, view), rows_p, eps)) < threshold
    out = jnp.where(passes, _project(p, u, view, eps), out)
    factor = jnp.where(passes, jnp.asarray(wd_ratio, u.dtype), factor)
    view_used = jnp.where(passes, code, view_used)
  return out, factor, view_used


def adamp(learning_rate: ScalarOrSchedule = 1e-3, b1: float = 0.9,
          b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
          delta: float = 0.1, wd_ratio: float = 0.1, nesterov: bool = False
          ) -> optax.GradientTransformation:
  """AdamP as an optax transform; `update` needs `params`.

  Defaults are the official ones (clovaai/AdamP: lr 1e-3, betas (0.9,
  0.999), eps 1e-8, weight_decay 0, delta 0.1, wd_ratio 0.1, nesterov
  False). The output is the final update (learning rate and decay
  included): `optax.apply_updates(params, updates)`. See the module
  docstring for the rule; the channel view takes a flax kernel's last axis
  as its output units.
  """
  def lr_at(count):
    return learning_rate(count) if callable(learning_rate) else learning_rate

  def init_fn(params):
    zeros = lambda: jax.tree.map(jnp.zeros_like, params)
    return AdamPState(count=jnp.zeros((), jnp.int32), mu=zeros(), nu=zeros())

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError('adamp: update needs params (tx.update(grads, state, '
                       'params)).')
    count = state.count + 1
    mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
    nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu,
                      updates)
    lr = lr_at(state.count)

    def leaf(g, m, v, p):
      t = count.astype(g.dtype)
      bc1 = 1 - jnp.asarray(b1, g.dtype) ** t
      bc2 = 1 - jnp.asarray(b2, g.dtype) ** t
      numerator = b1 * m + (1 - b1) * g if nesterov else m
      u = numerator / (jnp.sqrt(v) / jnp.sqrt(bc2) + eps)
      u, factor, _ = adamp_projection(p, g, u, delta=delta,
                                      wd_ratio=wd_ratio, eps=eps)
      step = jnp.asarray(lr, g.dtype) / bc1
      decay = jnp.asarray(lr, g.dtype) * weight_decay * factor
      return -(decay * p) - step * u

    new = jax.tree.map(leaf, updates, mu, nu, params)
    return new, AdamPState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)


# ---------------------------------------------------------------------------
# NaP.


class NaPState(NamedTuple):
  """norms: per param leaf (in `jax.tree.leaves` order, flax boxes taken as
  leaves), the Frobenius norm each masked weight is kept at (its norm at
  `init`); unmasked leaves hold an empty placeholder. A flat tuple, so
  flax's partitioning metadata on the params never reaches it."""
  norms: tuple


def _is_box(x: Any) -> bool:
  """A flax metadata box (nn.Partitioned, ...): one param leaf."""
  return hasattr(x, 'unbox') and hasattr(x, 'replace_boxed')


def _value(x: Any) -> Any:
  return x.unbox() if _is_box(x) else x


def _flags(mask: Mask | None, params) -> list[bool]:
  """One Python bool per param leaf."""
  leaves = jax.tree.leaves(params, is_leaf=_is_box)
  if mask is None:
    return [jnp.ndim(_value(p)) >= 2 for p in leaves]
  tree = mask(params) if callable(mask) else mask
  flags = jax.tree.leaves(tree, is_leaf=_is_box)
  if len(flags) != len(leaves):
    raise ValueError(f'nap_project: the mask has {len(flags)} leaves, the '
                     f'params {len(leaves)}.')
  return [bool(_value(f)) for f in flags]


def _leaf_norm(x: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.sum(jnp.square(x)))


def nap_project(mask: Mask | None = None) -> optax.GradientTransformation:
  """NaP's projection: every masked weight keeps its initial norm.

  `mask` is a pytree of bools with the params' structure (True: project
  this leaf), or a callable params -> that pytree (as in `optax.masked`;
  `mask_by_path` builds one from a regex). None projects every leaf of 2 or
  more dimensions; choose the weights whose output is normalised (scale-
  invariant) yourself: projecting any other weight changes the function.
  Chain it last, after the optimizer: given the final `updates` u it
  returns u' = (p + u) r0 / ||p + u|| - p, so `apply_updates` yields
  p + u rescaled to r0 = ||p_0||. A leaf whose initial norm is 0, or whose
  updated norm is 0, is left unprojected. NaP's own advice: no weight decay
  on projected weights (it has no effect on a sphere).
  """
  def init_fn(params):
    leaves = [_value(p) for p in jax.tree.leaves(params, is_leaf=_is_box)]
    return NaPState(tuple(
        _leaf_norm(p) if m else jnp.zeros((0,), p.dtype)
        for p, m in zip(leaves, _flags(mask, params))))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError('nap_project: update needs params (tx.update(grads, '
                       'state, params)).')
    flat, treedef = jax.tree.flatten(updates, is_leaf=_is_box)
    values = [_value(p) for p in jax.tree.leaves(params, is_leaf=_is_box)]

    def leaf(u, p, r0, m):
      if not m:
        return u
      new = p + u
      norm = _leaf_norm(new)
      ok = (r0 > 0) & (norm > 0)
      scale = jnp.where(ok, r0 / jnp.where(ok, norm, 1), 1)
      return jnp.where(ok, new * scale - p, u)

    out = [leaf(_value(u), p, r0, m) for u, p, r0, m in
           zip(flat, values, state.norms, _flags(mask, params))]
    return jax.tree.unflatten(treedef, out), state

  return optax.GradientTransformation(init_fn, update_fn)


def mask_by_path(pattern: str) -> Callable[[Any], Any]:
  """A mask callable: True for leaves whose '/'-joined key path (e.g.
  'decoder/layer_0/self_attention/query/kernel') matches `pattern`
  (`re.search`)."""
  regex = re.compile(pattern)

  def mask(params):
    def flag(path, _):
      keys = '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k)))
                      for k in path)
      return bool(regex.search(keys))
    return jax.tree_util.tree_map_with_path(flag, params, is_leaf=_is_box)
  return mask
