"""Inference-time surgery on pre-norm models: fold norms into their readers.

Pure functions on variable trees. Each takes a `TransformerConfig` and the
variables of a `Transformer` (encoder-decoder) or `LanguageModel` (told
apart by the tree: a Transformer has 'encoder' params) and returns
`(new_config, new_variables)` of a model with the same evaluation-mode
logits:

* `fold_affine`: the offline norms (BatchNorm, PN-V, PowerNorm, UN) are in
  evaluation mode a per-channel affine map y = a * core(x) + c, with
  core = identity (BatchNorm, UN, PN-V/PowerNorm without GroupScaling) or
  GroupScaling (PowerNorm, PN-V: a per-token division, which does not fold,
  powernorm_un_spec §1.5). The affine goes into the linear layers that read
  the norm (W' = diag(a) W, b' = b + c W; §2.6), the site becomes 'none' or
  'group_scaling' (same groups and eps). `kinds=` adds 'layernorm' /
  'rmsnorm', whose own scale and bias fold the same way (the site keeps
  its kind without affine).
* `to_pre_rmsnorm`, `to_pre_crmsnorm`: the exact Pre-LN -> Pre-RMSNorm ->
  Pre-CRMSNorm conversion of zoo spec §4 for models with LayerNorm at every
  site: fold the LN affines, recentre every writer of the residual stream
  (token embeddings, attention out-projections, fc2; the sinusoidal position
  table, which is not a parameter, through `center_positions=True`, which
  recentres the table where the model builds it), LN -> RMSNorm without
  affine and the same eps; CRMSNorm keeps d - 1 coordinates of the stream
  (`compressed_stream=True`) and readers become W[:d-1] - W[d-1].
* `freeze_layernorm`: zoo spec §9's LN freezing, an *approximation*: each
  LayerNorm module's per-token sigma is replaced by the fixed scalar
  s = mean over the real tokens of calibration batches of sqrt(var + eps)
  (§9's sigma_avg, a plain mean instead of its EMA), so that
  FakeLN(x) = scale * (x - mean(x)) / s + bias, which is affine and folds:
  W' = P diag(scale) W / s, b' = b + bias W, P = I - 11^T / d. The result
  equals (to rounding) the model whose LayerNorms divide by s
  (`frozen_layernorm_interceptor`), not the original model.

Readers of each norm in a pre-norm model: attention norms -> that
attention's query/key/value (a cross-attention norm -> its query only), FFN
norms -> fc1, the encoder's final norm -> every decoder layer's
cross-attention key/value, the decoder's final norm -> the output layer.
A tied output layer is untied first (`untie_output=True`: the table is
copied into an output kernel and gets a bias). Only `placement='pre'`
models fold: elsewhere a norm's output is (part of) the residual stream.

Where the numbers live: folded weights are computed in float64 from the
stored values and cast back to each leaf's dtype.

CLI (restores a translation or LM run's checkpoint, writes the transformed
variables as an orbax checkpoint under OUTDIR/checkpoints/<step> and the new
model config as OUTDIR/model_config.json; `load` reads both back):

    python -m experiments.fold --workdir=runs/wmt_pn --config=wmt:powernorm \\
        --transform=fold_affine --out=runs/wmt_pn_folded

`--config` is `<experiment>:<preset>` (experiments/configs/<experiment>.py)
or `path/to/config.py:<preset>`, with dotted overrides as in training.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import unfreeze

from experiments import models
from normjax import linen as nnorm

Path = tuple[str, ...]

OFFLINE_KINDS = ('batchnorm', 'pn_v', 'powernorm', 'unified')
TRANSFORMS = ('fold_affine', 'rmsnorm', 'crmsnorm', 'freeze_ln')

_NOT_FOLDABLE = {
    'post': "in post-norm (x <- N(x + F(x))) the norm's output is the "
            'residual stream itself, which every later layer reads and '
            'adds to, so its affine map cannot be moved into the readers',
    'peri': "in Peri-LN the output norm's result is added to the residual "
            'stream (x + N_out(F(N_in(x)))), so it cannot be folded',
    'mix': 'Mix-LN has post-norm layers, whose norm output is the residual '
           'stream itself and cannot be folded',
    'lns': 'LayerNorm Scaling (x + F(N(x) / sqrt(l))) is not supported by '
           'these transforms (fold the 1/sqrt(l) factor too and switch to '
           "'pre'); only plain pre-norm is",
}


# ---------------------------------------------------------------------------
# Trees.


def _get(tree: Mapping, path: Path) -> Any:
  for k in path:
    tree = tree[k]
  return tree


def _has(tree: Mapping, path: Path) -> bool:
  for k in path:
    if not isinstance(tree, Mapping) or k not in tree:
      return False
    tree = tree[k]
  return True


def _set(tree: dict, path: Path, value: Any) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def _pop(tree: dict, path: Path) -> Any:
  if not _has(tree, path):
    return None
  return _get(tree, path[:-1]).pop(path[-1])


def _prune(tree: Any) -> Any:
  """Drops empty sub-dicts (a folded norm's variables leave them behind)."""
  if not isinstance(tree, Mapping):
    return tree
  out = {}
  for k, v in tree.items():
    v = _prune(v)
    if not (isinstance(v, Mapping) and not v):
      out[k] = v
  return out


def _plain(variables: Mapping) -> dict:
  """Unboxed, unfrozen nested dicts (the arrays are not copied)."""
  tree = unfreeze(nn.unbox(variables))
  return jax.tree.map(lambda x: x, tree)  # fresh containers


def _f64(x: Any) -> np.ndarray:
  return np.asarray(x, np.float64)


def _like(value: np.ndarray, ref: Any) -> np.ndarray:
  return np.asarray(value, dtype=np.asarray(ref).dtype)


# ---------------------------------------------------------------------------
# The norm sites of a pre-norm model and who reads them.


@dataclasses.dataclass(frozen=True)
class NormModule:
  """One norm module: its site (config key), path and readers' paths."""
  site: str
  path: Path
  readers: tuple[Path, ...]   # Dense-like modules {kernel [in, ...], bias}
  output: bool = False        # the decoder's final norm: the output layer


def is_transformer(variables: Mapping) -> bool:
  """An encoder-decoder `Transformer`'s tree (else a `LanguageModel`'s)."""
  return 'encoder' in variables['params']


def model_for(config: models.TransformerConfig, transformer: bool):
  return (models.Transformer if transformer else models.LanguageModel)(config)


def norm_modules(config: models.TransformerConfig,
                 transformer: bool) -> list[NormModule]:
  """Every norm module of the model with the modules that read it."""
  qkv = ('query', 'key', 'value')
  out = []
  if transformer:
    for i in range(config.num_encoder_layers):
      layer = ('encoder', f'layer_{i}')
      out.append(NormModule('encoder_attention', layer + ('attention_norm',),
                            tuple(layer + ('self_attention', p) for p in qkv)))
      out.append(NormModule('encoder_ffn', layer + ('ffn_norm',),
                            (layer + ('fc1',),)))
    out.append(NormModule('encoder_final', ('encoder', 'final_norm'), tuple(
        ('decoder', f'layer_{j}', 'cross_attention', p)
        for j in range(config.num_decoder_layers) for p in ('key', 'value'))))
  for i in range(config.num_decoder_layers):
    layer = ('decoder', f'layer_{i}')
    out.append(NormModule('decoder_attention', layer + ('attention_norm',),
                          tuple(layer + ('self_attention', p) for p in qkv)))
    if transformer:
      out.append(NormModule('decoder_attention',
                            layer + ('cross_attention_norm',),
                            (layer + ('cross_attention', 'query'),)))
    out.append(NormModule('decoder_ffn', layer + ('ffn_norm',),
                          (layer + ('fc1',),)))
  out.append(NormModule('decoder_final', ('decoder', 'final_norm'), (),
                        output=True))
  return out


def used_sites(config: models.TransformerConfig, transformer: bool
               ) -> list[str]:
  sites = {m.site for m in norm_modules(config, transformer)}
  return [s for s in models.SITES if s in sites]


def check_foldable(config: models.TransformerConfig) -> None:
  """ValueError unless the model is plain pre-norm."""
  if config.placement != 'pre':
    reason = _NOT_FOLDABLE.get(
        config.placement, 'only pre-norm models have norms whose output '
        'feeds linear layers only')
    raise ValueError(f"fold: placement={config.placement!r} cannot be "
                     f"folded: {reason}. Only placement='pre' models fold.")
  if config.embed_norm:
    raise ValueError('fold: embed_norm=True puts a norm on the embeddings '
                     'whose output is the residual stream; it cannot be '
                     'folded.')


def _module(norm_cfg: Mapping) -> nn.Module:
  """An unbound module of the site, to read its (default) options."""
  return nnorm.make_norm(**norm_cfg)()


def _output_readers(config: models.TransformerConfig, params: Mapping
                    ) -> list[tuple[Path, Path]]:
  """[(kernel path, bias path)] of the output layer (after untying)."""
  if config.adaptive_softmax_cutoffs:
    return [(('adaptive_softmax', 'kernel', 'kernel'),
             ('adaptive_softmax', 'bias')),
            (('adaptive_softmax', 'cluster', 'kernel'),
             ('adaptive_softmax', 'cluster', 'bias'))]
  return [(('output_projection', 'kernel'), ('output_projection', 'bias'))]


def _table_path(transformer: bool, config, params) -> Path:
  if not transformer:
    return ('embedding', 'embedding')
  if config.share_embeddings:
    return ('shared_embedding', 'embedding')
  return ('target_embedding', 'embedding')


def untie_output(config: models.TransformerConfig, variables: Mapping
                 ) -> tuple[models.TransformerConfig, dict]:
  """An output layer of its own (kernel = the tied table^T, bias 0).

  The logits are unchanged; the input embeddings stay shared.
  """
  variables = _plain(variables)
  if config.untie_output:
    return config, variables
  params = variables['params']
  transformer = is_transformer(variables)
  tied = config.share_embeddings
  if config.adaptive_softmax_cutoffs:
    if tied:  # its own kernel; it has a bias already
      table = params['embedding']['embedding']
      _set(params, ('adaptive_softmax', 'kernel', 'kernel'),
           np.asarray(table).T.copy())
  elif tied:
    table = _get(params, _table_path(transformer, config, params))
    kernel = np.asarray(table).T.copy()
    _set(params, ('output_projection', 'kernel'), kernel)
    _set(params, ('output_projection', 'bias'),
         np.zeros(kernel.shape[-1], kernel.dtype))
  else:
    kernel = params['output_projection']['kernel']
    params['output_projection']['bias'] = np.zeros(
        np.shape(kernel)[-1], np.asarray(kernel).dtype)
  return dataclasses.replace(config, untie_output=True), variables


# ---------------------------------------------------------------------------
# Folding an affine map into the readers.


def _fold_reader(params: dict, kernel_path: Path, bias_path: Path,
                 a: np.ndarray, c: np.ndarray, center: bool) -> None:
  """Reader y @ W + b of y = x A + c with A = diag(a) (P diag(a) if center).

  W' = A W (over the input axis 0 of W), b' = b + c W.
  """
  w = _get(params, kernel_path)
  w64 = _f64(w)
  extra = (1,) * (w64.ndim - 1)
  new_w = a.reshape((-1,) + extra) * w64
  if center:
    new_w = new_w - new_w.mean(axis=0, keepdims=True)
  _set(params, kernel_path, _like(new_w, w))
  b = _get(params, bias_path)
  _set(params, bias_path,
       _like(_f64(b) + np.tensordot(c, w64, axes=(0, 0)), b))


def _fold_module(params: dict, config, module: NormModule, a: np.ndarray,
                 c: np.ndarray, center: bool = False) -> None:
  readers = [(r + ('kernel',), r + ('bias',)) for r in module.readers]
  if module.output:
    readers = _output_readers(config, params)
  for kernel_path, bias_path in readers:
    _fold_reader(params, kernel_path, bias_path, a, c, center)


def _drop_norm_variables(variables: dict, path: Path) -> None:
  for collection in list(variables):
    if isinstance(variables[collection], Mapping):
      _pop(variables[collection], path)


def _first_group(v: Any, features: int) -> np.ndarray:
  """Group 0 of a state leaf [groups, C] (what evaluation uses), or [C]."""
  v = _f64(v)
  return v[0] if v.ndim == 2 and v.shape[-1] == features else v


def _eval_affine(norm_cfg: Mapping, variables: Mapping, path: Path
                 ) -> tuple[np.ndarray, np.ndarray, dict]:
  """(a, c, new site config) with norm(x) = a * core(x) + c in evaluation."""
  kind = norm_cfg['kind']
  mod = _module(norm_cfg)
  params = _get(variables['params'], path) if _has(
      variables['params'], path) else {}
  stats = (_get(variables['batch_stats'], path)
           if 'batch_stats' in variables and _has(variables['batch_stats'],
                                                  path) else {})
  ref = next(iter(params.values()), None)
  if ref is None:
    ref = next(iter(stats.values()))
  features = np.shape(ref)[-1]
  scale = _f64(params['scale']) if 'scale' in params else np.ones(features)
  bias = _f64(params['bias']) if 'bias' in params else np.zeros(features)
  keep = {k: norm_cfg[k] for k in ('dtype',) if k in norm_cfg}
  if kind == 'batchnorm':
    inv = 1.0 / np.sqrt(_first_group(stats['var'], features) + mod.epsilon)
    a = scale * inv
    c = bias - _first_group(stats['mean'], features) * a
    return a, c, {'kind': 'none'}
  if kind in ('powernorm', 'pn_v'):
    phi = _first_group(stats['running_phi'], features)
    a = scale / np.sqrt(phi + mod.epsilon)
    if mod.use_group_scaling:
      new = {'kind': 'group_scaling', 'num_groups': mod.num_groups,
             'epsilon': mod.group_scaling_eps, **keep}
    else:
      new = {'kind': 'none'}
    return a, bias, new
  if kind == 'unified':
    r = _first_group(stats['running_var'], features)
    return scale / np.sqrt(r + mod.epsilon), bias, {'kind': 'none'}
  if kind in ('layernorm', 'rmsnorm'):
    if getattr(mod, 'reduction_axes', -1) not in (-1, (-1,)):
      raise ValueError(f'fold: a {kind} over reduction_axes='
                       f'{mod.reduction_axes} is not per token; cannot fold.')
    new = dict(norm_cfg, use_scale=False, use_bias=False)
    return scale, bias, new
  raise ValueError(f'fold: no evaluation-mode affine form for norm kind '
                   f'{kind!r}.')


def _fold_sites(config: models.TransformerConfig, variables: Mapping,
                sites: Iterable[str]) -> tuple[models.TransformerConfig, dict]:
  """Folds the eval affine of every module of `sites` into its readers."""
  check_foldable(config)
  variables = _plain(variables)
  sites = set(sites)
  transformer = is_transformer(variables)
  modules = [m for m in norm_modules(config, transformer) if m.site in sites]
  if any(m.output for m in modules):
    config, variables = untie_output(config, variables)
  norms = {s: dict(config.norms[s]) for s in models.SITES}
  new_cfgs = {}
  for m in modules:
    a, c, new = _eval_affine(config.norms[m.site], variables, m.path)
    _fold_module(variables['params'], config, m, a, c)
    _drop_norm_variables(variables, m.path)
    new_cfgs[m.site] = new
  norms.update(new_cfgs)
  return (dataclasses.replace(config, norms=norms), _finish(variables))


def _finish(variables: dict) -> dict:
  out = {k: _prune(v) for k, v in variables.items()}
  return {k: v for k, v in out.items() if k == 'params' or v}


def _kinds(config, transformer) -> dict[str, str]:
  return {s: config.norms[s]['kind'] for s in used_sites(config, transformer)}


def fold_affine(config: models.TransformerConfig, variables: Mapping, *,
                kinds: Sequence[str] = OFFLINE_KINDS
                ) -> tuple[models.TransformerConfig, dict]:
  """Folds the evaluation-mode affine of the `kinds` sites into readers.

  BatchNorm (a = scale / sqrt(var + eps), c = bias - mean * a), PN-V and
  PowerNorm (a = scale / sqrt(running_phi + eps), c = bias, after
  GroupScaling), UN (a = scale / sqrt(running_var + eps), c = bias); with
  'layernorm' / 'rmsnorm' in `kinds` their scale and bias. The sites
  become 'none', 'group_scaling' (PowerNorm / PN-V with GroupScaling, same
  groups and eps) or their kind without affine (LayerNorm, RMSNorm).
  Stateful norms use group 0 of their statistics, as in evaluation.
  Raises ValueError for a non-pre-norm model or when no site has a kind
  of `kinds`.
  """
  transformer = is_transformer(variables)
  present = _kinds(config, transformer)
  sites = [s for s, k in present.items() if k in kinds]
  check_foldable(config)
  if not sites:
    raise ValueError(
        f"fold_affine applies to {'/'.join(kinds)} sites; this model's "
        f'norms are {present}.')
  return _fold_sites(config, variables, sites)


# ---------------------------------------------------------------------------
# Pre-LN -> Pre-RMSNorm -> Pre-CRMSNorm.


def _writers(config, transformer: bool, params: Mapping) -> list[Path]:
  """Every parameter that writes to a residual stream (output axis -1)."""
  paths = []
  if transformer:
    if config.share_embeddings:
      paths.append(('shared_embedding', 'embedding'))
    else:
      paths += [('source_embedding', 'embedding'),
                ('target_embedding', 'embedding')]
    stacks = [('encoder', config.num_encoder_layers, ('self_attention',)),
              ('decoder', config.num_decoder_layers,
               ('self_attention', 'cross_attention'))]
  else:
    paths.append(('embedding', 'embedding'))
    stacks = [('decoder', config.num_decoder_layers, ('self_attention',))]
  for stack, n, attentions in stacks:
    for i in range(n):
      layer = (stack, f'layer_{i}')
      for att in attentions:
        paths += [layer + (att, 'out', 'kernel'), layer + (att, 'out', 'bias')]
      paths += [layer + ('fc2', 'kernel'), layer + ('fc2', 'bias')]
  return paths


def _require_layernorm(config, variables, what: str) -> bool:
  check_foldable(config)
  transformer = is_transformer(variables)
  present = _kinds(config, transformer)
  if set(present.values()) != {'layernorm'}:
    raise ValueError(f'{what} needs LayerNorm at every site (zoo spec §4: '
                     f"every reader of the residual stream is a LayerNorm); "
                     f"this model's norms are {present}.")
  return transformer


def to_pre_rmsnorm(config: models.TransformerConfig, variables: Mapping
                   ) -> tuple[models.TransformerConfig, dict]:
  """Pre-LN -> Pre-RMSNorm, exactly (zoo spec §4.1-4.3).

  Folds every LN's scale/bias into its readers (untying a tied output
  layer), recentres every writer of the residual streams along its output
  axis (token embeddings, attention out-projections and fc2, kernels and
  biases; the position table through `center_positions=True`), and makes
  every site an RMSNorm without affine and the LN's eps. The streams are
  then exactly zero-mean, where LN(x) = RMSNorm(x).
  """
  transformer = _require_layernorm(config, variables, 'to_pre_rmsnorm')
  sites = used_sites(config, transformer)
  config, variables = _fold_sites(config, variables, sites)
  params = variables['params']
  for path in _writers(config, transformer, params):
    w = _get(params, path)
    w64 = _f64(w)
    _set(params, path, _like(w64 - w64.mean(axis=-1, keepdims=True), w))
  norms = dict(config.norms)
  for s in sites:
    norms[s] = _rms_site(norms[s], 'rmsnorm')
  return (dataclasses.replace(config, norms=norms, center_positions=True),
          variables)


def _rms_site(norm_cfg: Mapping, kind: str) -> dict:
  mod = _module(norm_cfg)
  new = {'kind': kind, 'epsilon': mod.epsilon}
  if 'dtype' in norm_cfg:
    new['dtype'] = norm_cfg['dtype']
  if kind == 'rmsnorm':
    new.update(use_scale=False, use_bias=False)
  return new


def to_pre_crmsnorm(config: models.TransformerConfig, variables: Mapping
                    ) -> tuple[models.TransformerConfig, dict]:
  """Pre-LN -> Pre-CRMSNorm, exactly (zoo spec §4.5).

  `to_pre_rmsnorm`, then the zero-mean streams are stored compressed as
  their first d - 1 coordinates (`compressed_stream=True`): writers keep
  their first d - 1 output columns, every reader of a norm becomes
  W[:d-1] - W[d-1] (biases unchanged), and the sites are 'crmsnorm' with
  the same eps (normjax's `crms_norm`).
  """
  _require_layernorm(config, variables, 'to_pre_crmsnorm')
  config, variables = to_pre_rmsnorm(config, variables)
  transformer = is_transformer(variables)
  params = variables['params']
  for path in _writers(config, transformer, params):
    w = _get(params, path)
    _set(params, path, np.asarray(w)[..., :-1].copy())
  for m in norm_modules(config, transformer):
    readers = ([r + ('kernel',) for r in m.readers] if not m.output else
               [k for k, _ in _output_readers(config, params)])
    for path in readers:
      w = _get(params, path)
      w64 = _f64(w)
      _set(params, path, _like(w64[:-1] - w64[-1:], w))
  norms = dict(config.norms)
  for s in used_sites(config, transformer):
    norms[s] = _rms_site(norms[s], 'crmsnorm')
  return (dataclasses.replace(config, norms=norms, compressed_stream=True),
          variables)


# ---------------------------------------------------------------------------
# LayerNorm freezing (zoo spec §9).


def _as_args(batch: Any, transformer: bool) -> tuple:
  """A calibration batch -> the model's positional arguments."""
  if isinstance(batch, Mapping):
    keys = ('inputs', 'targets') if transformer else ('inputs',)
    return tuple(batch[k] for k in keys)
  return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


def calibrate_layernorm(config: models.TransformerConfig, variables: Mapping,
                        calibration_batches: Iterable[Any]
                        ) -> dict[Path, float]:
  """{LayerNorm module path: s}, s = mean over real tokens of sqrt(var+eps).

  Evaluation-mode forward passes (running statistics, no dropout) over
  `calibration_batches`: (inputs, targets) pairs or dicts with those keys
  for a Transformer, inputs [B, L] (or {'inputs': ...}) for a
  LanguageModel. Real tokens are those the norm's mask marks.
  """
  variables = _plain(variables)
  transformer = is_transformer(variables)
  model = model_for(dataclasses.replace(config, deterministic=True),
                    transformer)

  @jax.jit
  def stats(variables, args):
    found = {}

    def interceptor(next_fun, fargs, kwargs, context):
      mod = context.module
      if isinstance(mod, nnorm.LayerNorm) and context.method_name == '__call__':
        x = fargs[0]
        xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        centred = xf - jnp.mean(xf, axis=-1, keepdims=True)
        sigma = jnp.sqrt(jnp.mean(jnp.square(centred), axis=-1) + mod.epsilon)
        mask = kwargs.get('mask')
        mask = (jnp.ones(sigma.shape, sigma.dtype) if mask is None else
                jnp.broadcast_to(mask, sigma.shape).astype(sigma.dtype))
        found['/'.join(mod.path)] = (jnp.sum(sigma * mask), jnp.sum(mask))
      return next_fun(*fargs, **kwargs)

    with nn.intercept_methods(interceptor):
      model.apply(variables, *args, train=False)
    return found

  totals: dict[str, list[float]] = {}
  for batch in calibration_batches:
    for name, (s, n) in stats(variables, _as_args(batch, transformer)).items():
      t = totals.setdefault(name, [0.0, 0.0])
      t[0] += float(s)
      t[1] += float(n)
  if not totals:
    raise ValueError('calibrate_layernorm: no calibration batch, or no '
                     'LayerNorm in the model.')
  empty = [k for k, (_, n) in totals.items() if n == 0]
  if empty:
    raise ValueError(f'calibrate_layernorm: no real token reached {empty}.')
  return {tuple(k.split('/')): s / n for k, (s, n) in totals.items()}


def frozen_layernorm_interceptor(scales: Mapping[Path, float]):
  """For `nn.intercept_methods`: LayerNorms at `scales`' paths compute
  scale * (x - mean(x)) / s + bias (FakeLN, zoo spec §9), the model that
  `freeze_layernorm` folds."""
  def interceptor(next_fun, args, kwargs, context):
    mod = context.module
    path = tuple(mod.path)
    if (not isinstance(mod, nnorm.LayerNorm) or context.method_name !=
        '__call__' or path not in scales):
      return next_fun(*args, **kwargs)
    x = args[0]
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    xf = x.astype(dtype)
    y = (xf - jnp.mean(xf, axis=-1, keepdims=True)) / jnp.asarray(
        scales[path], dtype)
    params = mod.variables.get('params', {})
    if 'scale' in params:
      y = y * params['scale'].astype(dtype).reshape((1,) * (y.ndim - 1) + (-1,))
    if 'bias' in params:
      y = y + params['bias'].astype(dtype).reshape((1,) * (y.ndim - 1) + (-1,))
    return y.astype(x.dtype if mod.dtype is None else mod.dtype)
  return interceptor


def freeze_layernorm(config: models.TransformerConfig, variables: Mapping,
                     calibration_batches: Iterable[Any], *,
                     scales: Mapping[Path, float] | None = None
                     ) -> tuple[models.TransformerConfig, dict]:
  """Replaces every LayerNorm by FakeLN with a calibrated s and folds it.

  An approximation: the logits change (by how much depends on how much
  sigma varies over tokens). Exact (to rounding) is the equality with the
  model whose LayerNorms divide by the fixed s (`frozen_layernorm_
  interceptor(scales)`). `scales` (from `calibrate_layernorm`) skips the
  calibration. LayerNorm sites become 'none'; other sites are untouched.
  """
  check_foldable(config)
  transformer = is_transformer(variables)
  present = _kinds(config, transformer)
  sites = [s for s, k in present.items() if k == 'layernorm']
  if not sites:
    raise ValueError(f"freeze_layernorm applies to LayerNorm sites; this "
                     f"model's norms are {present}.")
  if scales is None:
    scales = calibrate_layernorm(config, variables, calibration_batches)
  modules = [m for m in norm_modules(config, transformer) if m.site in sites]
  variables = _plain(variables)
  if any(m.output for m in modules):
    config, variables = untie_output(config, variables)
  for m in modules:
    a, c, _ = _eval_affine(config.norms[m.site], variables, m.path)
    _fold_module(variables['params'], config, m, a / scales[m.path], c,
                 center=True)
    _drop_norm_variables(variables, m.path)
  norms = dict(config.norms)
  norms.update({s: {'kind': 'none'} for s in sites})
  return dataclasses.replace(config, norms=norms), _finish(variables)


# ---------------------------------------------------------------------------
# Checking, saving and loading.


def _dummy_args(transformer: bool) -> tuple:
  tokens = jnp.ones((1, 4), jnp.int32)
  return (tokens, tokens) if transformer else (tokens,)


def check_variables(config: models.TransformerConfig, variables: Mapping
                    ) -> None:
  """ValueError unless `variables` has exactly the tree and shapes that
  the model of `config` initialises (shapes only, nothing is computed)."""
  transformer = is_transformer(variables)
  model = model_for(config, transformer)
  expected = nn.unbox(jax.eval_shape(
      functools.partial(model.init, train=False), jax.random.key(0),
      *_dummy_args(transformer)))
  expected = {k: v for k, v in unfreeze(expected).items() if v}
  want = {jax.tree_util.keystr(p): tuple(l.shape) for p, l in
          jax.tree_util.tree_leaves_with_path(expected)}
  got = {jax.tree_util.keystr(p): tuple(np.shape(l)) for p, l in
         jax.tree_util.tree_leaves_with_path(_finish(_plain(variables)))}
  if want != got:
    missing = sorted(set(want) - set(got))[:3]
    extra = sorted(set(got) - set(want))[:3]
    shapes = sorted(k for k in set(want) & set(got) if want[k] != got[k])[:3]
    raise ValueError(f'variables do not fit the model config: missing '
                     f'{missing}, unexpected {extra}, other shapes {shapes}.')


def config_to_json(config: models.TransformerConfig) -> dict:
  out = {}
  for f in dataclasses.fields(config):
    v = getattr(config, f.name)
    if f.name == 'norms':
      v = {s: dict(n) for s, n in v.items()}
    elif f.name == 'dtype':
      v = jnp.dtype(v).name
    elif isinstance(v, tuple):
      v = list(v)
    out[f.name] = v
  return out


def config_from_json(data: Mapping) -> models.TransformerConfig:
  data = dict(data)
  data['dtype'] = jnp.dtype(data['dtype'])
  data['adaptive_softmax_cutoffs'] = tuple(data['adaptive_softmax_cutoffs'])
  return models.TransformerConfig(**data)


def apply_transform(transform: str, config: models.TransformerConfig,
                    variables: Mapping, calibration_batches=()
                    ) -> tuple[models.TransformerConfig, dict]:
  if transform == 'fold_affine':
    return fold_affine(config, variables)
  if transform == 'rmsnorm':
    return to_pre_rmsnorm(config, variables)
  if transform == 'crmsnorm':
    return to_pre_crmsnorm(config, variables)
  if transform == 'freeze_ln':
    return freeze_layernorm(config, variables, calibration_batches)
  raise ValueError(f'--transform={transform!r}: choose from {TRANSFORMS}.')


CONFIG_FILE = 'model_config.json'


def save(out: str, step: int, config: models.TransformerConfig,
         variables: Mapping, meta: Mapping) -> str:
  """OUT/checkpoints/<step> (Composite(state=variables, meta)) and
  OUT/model_config.json; returns the checkpoint directory."""
  from experiments import checkpointing  # orbax: only when saving
  os.makedirs(out, exist_ok=True)
  model_json = config_to_json(config)
  with open(os.path.join(out, CONFIG_FILE), 'w') as f:
    json.dump(model_json, f, indent=2)
  mngr = checkpointing.manager(os.path.join(out, 'checkpoints'), keep=1,
                               async_save=False)
  checkpointing.save(mngr, step, variables,
                     dict(meta, model_config=model_json))
  mngr.wait_until_finished()
  mngr.close()
  return os.path.join(os.path.abspath(out), 'checkpoints', str(step))


def _restore_raw(directory: str, step: int | None) -> tuple[Any, dict, int]:
  import orbax.checkpoint as ocp
  with ocp.CheckpointManager(os.path.abspath(directory)) as mngr:
    steps = mngr.all_steps()
    if not steps:
      raise FileNotFoundError(f'{directory} holds no complete checkpoint.')
    if step is None:
      step = max(steps)
    elif step not in steps:
      raise FileNotFoundError(f'{directory} has no step {step}; it has '
                              f'{sorted(steps)}.')
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
  return restored['state'], dict(restored['meta'] or {}), step


def load(out: str, step: int | None = None
         ) -> tuple[models.TransformerConfig, dict, dict]:
  """(config, variables, meta) of a directory written by `save`."""
  with open(os.path.join(out, CONFIG_FILE)) as f:
    config = config_from_json(json.load(f))
  state, meta, _ = _restore_raw(os.path.join(out, 'checkpoints'), step)
  return config, _finish(_plain(state)), meta


# ---------------------------------------------------------------------------
# CLI.


def _load_run_config(spec: str, overrides: Sequence[str]):
  """`experiment:preset` or `path.py:preset`, then `--config.a.b=v`."""
  import ast
  import importlib.util
  name, _, preset = spec.partition(':')
  path = name if name.endswith('.py') else os.path.join(
      os.path.dirname(__file__), 'configs', f'{name}.py')
  if not os.path.isfile(path):
    raise ValueError(f'--config={spec}: no experiment {name!r} (expected '
                     'e.g. wmt:powernorm or lm:ptb_layernorm,small).')
  module_spec = importlib.util.spec_from_file_location('_fold_run_config',
                                                       path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(preset) if preset else module.get_config()
  config.unlock()
  for item in overrides:
    key, _, text = item[len('--config.'):].partition('=')
    *parents, leaf = key.split('.')
    node = config
    for k in parents:
      node = node[k]
    old = node[leaf]
    if isinstance(old, bool):
      value = text.lower() in ('1', 'true', 'yes')
    elif isinstance(old, (int, float)):
      value = type(old)(text)
    elif isinstance(old, str):
      value = text
    else:
      value = ast.literal_eval(text)
    node[leaf] = value
  config.lock()
  return config


def _calibration_batches(run_config, workdir: str, transformer: bool,
                         count: int) -> list:
  """The first `count` evaluation batches of the run's valid split."""
  if transformer:
    from experiments.data import TokenBatcher, load_translation
    data = load_translation(run_config.data,
                            cache_dir=os.path.join(workdir, 'vocab'))
    batches = TokenBatcher(data.valid, max_tokens=run_config.data.max_tokens,
                           shuffle=False).eval_batches()
  else:
    from experiments.data import lm as lm_data
    data = lm_data.load_lm(run_config.data,
                           cache_dir=os.path.join(workdir, 'vocab'))
    batches = lm_data.eval_batches(
        data.valid, batch_size=run_config.data.eval_batch_size,
        seq_len=run_config.data.eval_seq_len)
  return [_as_args(b, transformer) for b in list(batches)[:count]]


def run(workdir: str, config_spec: str, transform: str, out: str,
        step: int | None = None, overrides: Sequence[str] = (),
        calibration_batches: int = 8, run_config=None) -> dict:
  """The CLI's work: restore, transform, check, save. Returns a summary."""
  if transform not in TRANSFORMS:
    raise ValueError(f'--transform={transform!r}: choose from '
                     f'{", ".join(TRANSFORMS)}.')
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'--workdir={workdir}: no checkpoints/ '
                            'directory; train the run first.')
  if run_config is None:
    run_config = _load_run_config(config_spec, overrides)
  state, meta, step = _restore_raw(directory, step)
  variables = _finish(_plain({k: state[k] for k in
                              ('params', 'batch_stats', 'grad_stats')
                              if k in state}))
  transformer = is_transformer(variables)
  table = (variables['params'].get('shared_embedding')
           or variables['params'].get('target_embedding')
           or variables['params'].get('embedding'))['embedding']
  config = models.TransformerConfig.from_config(
      run_config.model, int(np.shape(table)[0]), deterministic=True)
  check_foldable(config)
  check_variables(config, variables)
  batches = ()
  if transform == 'freeze_ln':
    batches = _calibration_batches(run_config, workdir, transformer,
                                   calibration_batches)
  new_config, new_variables = apply_transform(transform, config, variables,
                                              batches)
  check_variables(new_config, new_variables)
  path = save(out, step, new_config, new_variables, dict(
      meta, source_workdir=os.path.abspath(workdir), source_step=step,
      transform=transform,
      model='transformer' if transformer else 'language_model'))
  return dict(step=step, checkpoint=path, norms={
      s: new_config.norms[s]['kind'] for s in used_sites(new_config,
                                                         transformer)})


def main(argv: Sequence[str] | None = None) -> None:
  import argparse
  ap = argparse.ArgumentParser(
      prog='python -m experiments.fold',
      description='Fold the norms of a pre-norm run into its linear layers.')
  ap.add_argument('--workdir', required=True, help='the run directory')
  ap.add_argument('--config', required=True,
                  help='the run\'s config: experiment:preset (wmt:powernorm)'
                  ' or path.py:preset')
  ap.add_argument('--transform', required=True, choices=TRANSFORMS)
  ap.add_argument('--out', required=True, help='output directory')
  ap.add_argument('--step', type=int, default=None,
                  help='checkpoint step (default: the latest)')
  ap.add_argument('--calibration_batches', type=int, default=8,
                  help='freeze_ln: valid batches to calibrate sigma on')
  args, overrides = ap.parse_known_args(argv)
  bad = [o for o in overrides if not o.startswith('--config.')]
  if bad:
    ap.error(f'unrecognized arguments: {" ".join(bad)}')
  try:
    summary = run(args.workdir, args.config, args.transform, args.out,
                  args.step, overrides, args.calibration_batches)
  except (ValueError, FileNotFoundError, KeyError, AttributeError) as e:
    if os.environ.get('NORMJAX_TRACEBACK'):
      raise
    message = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
    print(f'error: {message}', file=sys.stderr)
    sys.exit(2)
  print(f"{args.transform}: step {summary['step']} -> "
        f"{summary['checkpoint']}; norms {summary['norms']}")


if __name__ == '__main__':
  main()
