"""Inference-time folding of norms into the linear layers that read them.

Model-agnostic: every function works on a variable tree (`{'params': ...,
'batch_stats': ..., 'grad_stats': ...}`, as flax.linen keeps them) and a
list of `NormSite`s that say where each norm's variables are, what it is
and which Dense-like layers (`{kernel [in, ...], bias}`) read its output.
The models are yours; normjax needs only that map.

* `fold_norms`: a norm whose evaluation is y = a * (core(x) - m) + b (its
  definition's `eval_affine`: BatchNorm, PN-V, PowerNorm, UN, and the own
  affine of LayerNorm/RMSNorm/...) moves a and b - m a into its readers:
  W' = diag(a) W, b' = bias_W + (b - m a) W (PowerNorm spec §2.6). What
  stays is `core`: nothing, GroupScaling, or the norm without affine.
* `layernorm_to_rmsnorm`, `layernorm_to_crmsnorm`: the exact Pre-LN ->
  Pre-RMSNorm -> Pre-CRMSNorm conversion (zoo spec §4) once every writer of
  the residual stream is recentred (`recenter_writers`).
* `freeze_layernorm`: LN freezing (zoo spec §9), an approximation: each
  LayerNorm divides by a calibrated constant s instead of its per-token
  sigma, FakeLN(x) = scale (x - mean x) / s + bias, which then folds with
  the centring matrix P = I - 11^T/d: W' = P diag(scale) W / s.

All folded weights are computed in float64 from the stored values and cast
back to each leaf's dtype. Only norms whose output feeds linear layers and
nothing else (pre-norm placements) can fold; the caller's map says which.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import numpy as np
from flax.core import unfreeze

from normjax._src import common
from normjax._src import definition as nd
from normjax._src import registry  # noqa: F401  # pylint: disable=unused-import

Path = tuple[str, ...]
COLLECTIONS = ('batch_stats', 'grad_stats')


class Reader(NamedTuple):
  """A linear layer reading a norm: kernel [in, ...] and bias paths."""
  kernel: Path
  bias: Path


@dataclasses.dataclass(frozen=True)
class NormSite:
  """One norm module of a model.

  Attributes:
    path: the module's path in every collection (e.g. ('block_0', 'norm')).
    kind: its registry kind ('powernorm').
    options: its options as the pure function names them (`eps`,
      `num_groups`, ...); missing ones take the definition's defaults.
    readers: the Dense-like modules that read its output, as module paths
      (with `kernel` and `bias` inside) or `Reader`s.
  """
  path: Path
  kind: str
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  readers: tuple[Path | Reader, ...] = ()

  @classmethod
  def from_module_kwargs(cls, path: Path, kwargs: Mapping[str, Any],
                         readers: tuple[Path | Reader, ...] = ()
                         ) -> NormSite:
    """A site from `make_norm` keyword arguments ({'kind': ..., fields})."""
    kwargs = dict(kwargs)
    kind = kwargs.pop('kind')
    definition = nd.lookup(kind, 'NormSite')
    by_field = {o.module_field: o.name for o in definition.options}
    options = {by_field[k]: v for k, v in kwargs.items() if k in by_field}
    return cls(tuple(path), kind, options, tuple(readers))

  def reader_paths(self) -> list[Reader]:
    return [r if isinstance(r, Reader) else
            Reader(tuple(r) + ('kernel',), tuple(r) + ('bias',))
            for r in self.readers]


class Replacement(NamedTuple):
  """What a folded norm site becomes: `kind` with `options`, no affine."""
  kind: str
  options: dict[str, Any]

  def module_kwargs(self) -> dict[str, Any]:
    """`make_norm` keyword arguments (flax field names) for this site."""
    if self.kind == 'none':
      return {'kind': 'none'}
    definition = nd.lookup(self.kind, 'Replacement')
    fields = {o.name: o.module_field for o in definition.options}
    out = {'kind': self.kind, 'use_scale': False, 'use_bias': False}
    out.update({fields[k]: v for k, v in self.options.items()})
    return out


# ---------------------------------------------------------------------------
# Trees.


def get(tree: Mapping, path: Path) -> Any:
  for k in path:
    tree = tree[k]
  return tree


def has(tree: Any, path: Path) -> bool:
  for k in path:
    if not isinstance(tree, Mapping) or k not in tree:
      return False
    tree = tree[k]
  return True


def put(tree: dict, path: Path, value: Any) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def plain(variables: Mapping) -> dict:
  """Unboxed, unfrozen nested dicts (fresh containers; arrays not copied)."""
  return jax.tree.map(lambda x: x, unfreeze(nn.unbox(variables)))


def prune(tree: Any) -> Any:
  """Drops empty sub-dicts."""
  if not isinstance(tree, Mapping):
    return tree
  out = {k: prune(v) for k, v in tree.items()}
  return {k: v for k, v in out.items()
          if not (isinstance(v, Mapping) and not v)}


def f64(x: Any) -> np.ndarray:
  return np.asarray(x, np.float64)


def like(value: np.ndarray, ref: Any) -> np.ndarray:
  """`value` in the dtype of `ref`."""
  return np.asarray(value).astype(np.asarray(ref).dtype)


# ---------------------------------------------------------------------------
# The evaluation affine of a norm site, from its definition.


def _state(definition: nd.NormDefinition, variables: Mapping, path: Path,
           features: int, options: dict[str, Any]) -> Any:
  """The site's evaluation state (group 0) in float64, or None."""
  if not definition.stateful:
    return None
  leaves = {}
  for collection in COLLECTIONS:
    if collection in variables and has(variables[collection], path):
      leaves.update(get(variables[collection], path))
  fresh = definition.new_state(features, **options)
  missing = sorted(set(fresh._fields) - set(leaves))
  if missing:
    raise ValueError(f'fold: the {definition.kind} at {"/".join(path)} has '
                     f'no state leaves {missing} in the variables.')
  state = type(fresh)(**{k: np.asarray(leaves[k]) for k in fresh._fields})
  state = common.first_group(state, options.get('num_batch_groups', 1))
  return type(state)(*[f64(v) for v in state])


def _features(variables: Mapping, path: Path) -> int:
  for collection in ('params', *COLLECTIONS):
    if collection in variables and has(variables[collection], path):
      leaves = get(variables[collection], path)
      for v in leaves.values():
        if np.ndim(v):
          return np.shape(v)[-1]
  raise ValueError(f'fold: no variables at {"/".join(path)}; cannot tell '
                   'its width.')


def eval_affine(site: NormSite, variables: Mapping) -> nd.EvalAffine:
  """The site's evaluation map y = scale * (core(x) - center) + bias (f64)."""
  definition = nd.lookup(site.kind, 'fold')
  if definition.eval_affine is None:
    raise ValueError(f'fold: the norm kind {site.kind!r} has no '
                     'evaluation-mode affine form; it cannot be folded.')
  options = definition.resolve(site.options, 'fold')
  # A zero-centred scale is stored as gamma - 1: fold the applied gamma.
  zero_centered = options.pop(nd.ZERO_CENTERED_SCALE.name)
  features = _features(variables, site.path)
  params = (get(variables['params'], site.path)
            if has(variables.get('params', {}), site.path) else {})
  filled = {'scale': f64(params.get('scale', np.ones(features))),
            'bias': f64(params.get('bias', np.zeros(features)))}
  if zero_centered and 'scale' in params:
    filled['scale'] = filled['scale'] + 1
  state = _state(definition, variables, site.path, features, options)
  return definition.eval_affine(filled, state, options, np)


# ---------------------------------------------------------------------------
# Folding into readers.


def fold_into_reader(params: dict, reader: Reader, scale: np.ndarray,
                     shift: np.ndarray, center: bool = False) -> None:
  """Reader y @ W + b of y = x A + shift, A = diag(scale) (P diag if center).

  In place: W' = A W over W's input axis 0, b' = b + shift W.
  """
  w = get(params, reader.kernel)
  w64 = f64(w)
  new_w = scale.reshape((-1,) + (1,) * (w64.ndim - 1)) * w64
  if center:
    new_w = new_w - new_w.mean(axis=0, keepdims=True)
  put(params, reader.kernel, like(new_w, w))
  if not has(params, reader.bias):
    raise ValueError(f'fold: the reader {"/".join(reader.kernel)} has no '
                     f'bias at {"/".join(reader.bias)}; folding a shift '
                     'needs one (give the layer a bias, initialised to 0).')
  b = get(params, reader.bias)
  put(params, reader.bias, like(f64(b) + np.tensordot(shift, w64, (0, 0)), b))


def drop_norm_variables(variables: dict, path: Path) -> None:
  """Removes a norm module's variables from every collection."""
  for collection in variables.values():
    if isinstance(collection, dict) and has(collection, path[:-1]):
      get(collection, path[:-1]).pop(path[-1], None)


def fold_norms(variables: Mapping, sites: Sequence[NormSite]
               ) -> tuple[dict, dict[Path, Replacement]]:
  """Folds every site's evaluation affine into its readers.

  Returns the new variables (the sites' variables removed) and, per site
  path, what the norm becomes (`Replacement`: 'none', GroupScaling, or the
  norm without affine). Sites need at least one reader.
  """
  variables = plain(variables)
  replacements = {}
  for site in sites:
    aff = eval_affine(site, variables)
    _check_readers(site)
    shift = f64(aff.bias) - (0 if aff.center is None
                             else f64(aff.center) * f64(aff.scale))
    for reader in site.reader_paths():
      fold_into_reader(variables['params'], reader, f64(aff.scale), shift)
    drop_norm_variables(variables, site.path)
    replacements[site.path] = Replacement(*aff.core)
  return finish(variables), replacements


def _check_readers(site: NormSite) -> None:
  if not site.readers:
    raise ValueError(f'fold: the norm at {"/".join(site.path)} lists no '
                     'readers; its affine has nowhere to go.')


def finish(variables: dict) -> dict:
  """Empty sub-trees and collections (but params) dropped."""
  out = {k: prune(v) for k, v in variables.items()}
  return {k: v for k, v in out.items() if k == 'params' or v}


# ---------------------------------------------------------------------------
# Pre-LN -> Pre-RMSNorm -> Pre-CRMSNorm, and LN freezing.


def _require(sites: Sequence[NormSite], kind: str, what: str) -> None:
  kinds = {'/'.join(s.path): s.kind for s in sites}
  if not sites or set(kinds.values()) != {kind}:
    raise ValueError(f'{what} needs {kind} at every norm site (zoo spec §4: '
                     'every reader of the residual stream is one); the '
                     f'sites are {kinds}.')


def recenter_writers(params: dict, writers: Sequence[Path]) -> None:
  """In place: every writer of the residual stream loses its mean over the
  output axis -1 (kernels, biases, embedding tables)."""
  for path in writers:
    w = get(params, path)
    w64 = f64(w)
    put(params, path, like(w64 - w64.mean(axis=-1, keepdims=True), w))


def layernorm_to_rmsnorm(variables: Mapping, sites: Sequence[NormSite],
                         writers: Sequence[Path]
                         ) -> tuple[dict, dict[Path, Replacement]]:
  """Pre-LN -> Pre-RMSNorm, exactly (zoo spec §4.1-4.3).

  Folds every LayerNorm's scale/bias into its readers, recentres every
  writer of the residual stream (`writers`: parameter paths whose last axis
  is the stream, e.g. embedding tables, attention out-projections, fc2
  kernels and biases), and makes every site an RMSNorm without affine and
  the LayerNorm's eps. The stream is then exactly zero-mean, where
  LN(x) = RMSNorm(x). Inputs to the stream that are not parameters (a
  sinusoidal position table) must be recentred by the model itself.
  """
  _require(sites, 'layernorm', 'layernorm_to_rmsnorm')
  variables, replacements = fold_norms(variables, sites)
  recenter_writers(variables['params'], writers)
  return variables, {p: Replacement('rmsnorm', {'eps': r.options['eps']})
                     for p, r in replacements.items()}


def layernorm_to_crmsnorm(variables: Mapping, sites: Sequence[NormSite],
                          writers: Sequence[Path]
                          ) -> tuple[dict, dict[Path, Replacement]]:
  """Pre-LN -> Pre-CRMSNorm, exactly (zoo spec §4.5).

  `layernorm_to_rmsnorm`, then the zero-mean stream is stored as its first
  d - 1 coordinates: writers keep their first d - 1 output columns and
  every reader kernel becomes W[:d-1] - W[d-1] (biases unchanged); the
  sites are CRMSNorm with the same eps.
  """
  variables, replacements = layernorm_to_rmsnorm(variables, sites, writers)
  params = variables['params']
  for path in writers:
    put(params, path, np.asarray(get(params, path))[..., :-1].copy())
  for site in sites:
    for reader in site.reader_paths():
      w = get(params, reader.kernel)
      w64 = f64(w)
      put(params, reader.kernel, like(w64[:-1] - w64[-1:], w))
  return variables, {p: Replacement('crmsnorm', r.options)
                     for p, r in replacements.items()}


def freeze_layernorm(variables: Mapping, sites: Sequence[NormSite],
                     sigmas: Mapping[Path, float]
                     ) -> tuple[dict, dict[Path, Replacement]]:
  """LN freezing (zoo spec §9): FakeLN with s = `sigmas[path]`, folded.

  FakeLN(x) = scale * (x - mean(x)) / s + bias, affine in x, folds into the
  readers as W' = P diag(scale) W / s, b' = b + bias W. Every site becomes
  'none'. An approximation of the LayerNorm model, exact (to rounding) for
  the model whose LayerNorms divide by s (`frozen_layernorm_interceptor`).
  `sigmas` comes from `calibrate_layernorm`.
  """
  _require(sites, 'layernorm', 'freeze_layernorm')
  variables = plain(variables)
  for site in sites:
    if site.path not in sigmas:
      raise ValueError(f'freeze_layernorm: no calibrated sigma for '
                       f'{"/".join(site.path)}.')
    _check_readers(site)
    aff = eval_affine(site, variables)
    for reader in site.reader_paths():
      fold_into_reader(variables['params'], reader,
                       f64(aff.scale) / sigmas[site.path], f64(aff.bias),
                       center=True)
    drop_norm_variables(variables, site.path)
  return finish(variables), {s.path: Replacement('none', {}) for s in sites}
