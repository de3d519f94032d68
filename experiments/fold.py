"""Folding for the experiments' Transformer and LanguageModel.

The math is the library's (`normjax.folding`, model-agnostic); this file
holds what is particular to `experiments.models`: which module reads each
norm (`norm_modules`), which parameters write the residual streams
(`_writers`), the config fields a folded model needs (`untie_output`,
`center_positions`, `compressed_stream`), checkpoint I/O and the command
line. Each transform takes a `TransformerConfig` and the variables of a
`Transformer` (encoder-decoder) or `LanguageModel` (told apart by the tree:
a Transformer has 'encoder' params) and returns `(new_config,
new_variables)` of a model with the same evaluation-mode logits:

* `fold_affine`: the offline norms (BatchNorm, PN-V, PowerNorm, UN; with
  `kinds=` also LayerNorm / RMSNorm's own affine) move their evaluation
  affine into the linear layers that read them; the sites become 'none',
  'group_scaling' (PowerNorm, PN-V) or their kind without affine.
* `to_pre_rmsnorm`, `to_pre_crmsnorm`: the exact Pre-LN -> Pre-RMSNorm ->
  Pre-CRMSNorm conversion (zoo spec §4) of all-LayerNorm models; the
  sinusoidal position table is recentred where the model builds it
  (`center_positions=True`), CRMSNorm stores d - 1 coordinates of the
  stream (`compressed_stream=True`).
* `freeze_layernorm`: LN freezing (zoo spec §9), an approximation: FakeLN
  with a calibrated sigma, folded.

Readers of each norm in a pre-norm model: attention norms -> that
attention's query/key/value (a cross-attention norm -> its query only), FFN
norms -> fc1, the encoder's final norm -> every decoder layer's
cross-attention key/value, the decoder's final norm -> the output layer
(untied first: the table is copied into an output kernel with a bias).
Only `placement='pre'` models fold: elsewhere a norm's output is (part of)
the residual stream.

CLI (restores a run's checkpoint, writes the transformed variables as an
orbax checkpoint under OUT/checkpoints/<step> and the model config as
OUT/model_config.json; `load` reads both back):

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
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax.core import unfreeze
from ml_collections import config_flags

from experiments import checkpointing
from experiments import cli
from experiments import configs
from experiments import models
from normjax import folding
from normjax._src import folding as fold_lib

Path = tuple[str, ...]

OFFLINE_KINDS = ('batchnorm', 'paper_batchnorm', 'pn_v', 'powernorm',
                 'unified')
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
  variables = fold_lib.plain(variables)
  if config.untie_output:
    return config, variables
  params = variables['params']
  transformer = is_transformer(variables)
  tied = config.share_embeddings
  if config.adaptive_softmax_cutoffs:
    if tied:  # its own kernel; it has a bias already
      table = params['embedding']['embedding']
      fold_lib.put(params, ('adaptive_softmax', 'kernel', 'kernel'),
           np.asarray(table).T.copy())
  elif tied:
    table = fold_lib.get(params, _table_path(transformer, config, params))
    kernel = np.asarray(table).T.copy()
    fold_lib.put(params, ('output_projection', 'kernel'), kernel)
    fold_lib.put(params, ('output_projection', 'bias'),
         np.zeros(kernel.shape[-1], kernel.dtype))
  else:
    kernel = params['output_projection']['kernel']
    params['output_projection']['bias'] = np.zeros(
        np.shape(kernel)[-1], np.asarray(kernel).dtype)
  return dataclasses.replace(config, untie_output=True), variables


# ---------------------------------------------------------------------------
# The model's norm sites for the library.


def _norm_site(config: models.TransformerConfig, params: Mapping,
               module: NormModule) -> folding.NormSite:
  """The library's view of one norm module: kind, options, readers."""
  readers = (tuple(folding.Reader(*r) for r in _output_readers(config, params))
             if module.output else module.readers)
  return folding.NormSite.from_module_kwargs(
      module.path, config.norms[module.site], readers)


def _sites(config, variables, site_names: Iterable[str]
           ) -> list[folding.NormSite]:
  names = set(site_names)
  return [_norm_site(config, variables['params'], m)
          for m in norm_modules(config, is_transformer(variables))
          if m.site in names]


def _prepare(config, variables, site_names: Iterable[str]):
  """(config, plain variables with the output untied if needed, sites)."""
  check_foldable(config)
  variables = fold_lib.plain(variables)
  names = set(site_names)
  if any(m.output and m.site in names
         for m in norm_modules(config, is_transformer(variables))):
    config, variables = untie_output(config, variables)
  return config, variables, _sites(config, variables, names)


def _replaced(config, replacements: Mapping[Path, folding.Replacement]
              ) -> models.TransformerConfig:
  """`config` with each folded site's norm replaced (dtype kept)."""
  transformer = 'encoder' in {p[0] for p in replacements}
  norms = {s: dict(config.norms[s]) for s in models.SITES}
  for m in norm_modules(config, transformer):
    if m.path in replacements:
      new = replacements[m.path].module_kwargs()
      if 'dtype' in norms[m.site] and new['kind'] != 'none':
        new['dtype'] = norms[m.site]['dtype']
      norms[m.site] = new
  return dataclasses.replace(config, norms=norms)


def _kinds(config, transformer) -> dict[str, str]:
  return {s: config.norms[s]['kind'] for s in used_sites(config, transformer)}


# ---------------------------------------------------------------------------
# The transforms.


def fold_affine(config: models.TransformerConfig, variables: Mapping, *,
                kinds: Sequence[str] = OFFLINE_KINDS
                ) -> tuple[models.TransformerConfig, dict]:
  """Folds the evaluation-mode affine of the `kinds` sites into readers.

  BatchNorm (a = scale / sqrt(var + eps), c = bias - mean * a), the
  paper's BN (the same with running_mean / running_var, after
  LayerScaling), PN-V and PowerNorm (a = scale / sqrt(running_phi + eps),
  c = bias, after GroupScaling), UN (a = scale / sqrt(running_var + eps),
  c = bias); with 'layernorm' / 'rmsnorm' in `kinds` their scale and bias.
  The sites become 'none', 'group_scaling' (PowerNorm / PN-V with
  GroupScaling, same groups and eps; the paper's BN with one group, its
  LayerScaling) or their kind without affine (LayerNorm, RMSNorm).
  Stateful norms use group 0 of their statistics, as in evaluation.
  Raises ValueError for a non-pre-norm model or when no site has a kind
  of `kinds`.
  """
  present = _kinds(config, is_transformer(variables))
  check_foldable(config)
  names = [s for s, k in present.items() if k in kinds]
  if not names:
    raise ValueError(
        f"fold_affine applies to {'/'.join(kinds)} sites; this model's "
        f'norms are {present}.')
  config, variables, sites = _prepare(config, variables, names)
  variables, replacements = folding.fold_norms(variables, sites)
  return _replaced(config, replacements), variables


def _require_layernorm(config, variables, what: str) -> list[str]:
  check_foldable(config)
  present = _kinds(config, is_transformer(variables))
  if set(present.values()) != {'layernorm'}:
    raise ValueError(f'{what} needs LayerNorm at every site (zoo spec §4: '
                     f"every reader of the residual stream is a LayerNorm); "
                     f"this model's norms are {present}.")
  return list(present)


def _writers(config, transformer: bool) -> list[Path]:
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


def _convert(config, variables, what: str, convert) -> tuple[Any, dict]:
  names = _require_layernorm(config, variables, what)
  config, variables, sites = _prepare(config, variables, names)
  writers = _writers(config, is_transformer(variables))
  variables, replacements = convert(variables, sites, writers)
  return _replaced(config, replacements), variables


def to_pre_rmsnorm(config: models.TransformerConfig, variables: Mapping
                   ) -> tuple[models.TransformerConfig, dict]:
  """Pre-LN -> Pre-RMSNorm, exactly (`normjax.folding.layernorm_to_rmsnorm`
  with this model's readers and writers; the position table is recentred
  by the model: `center_positions=True`)."""
  config, variables = _convert(config, variables, 'to_pre_rmsnorm',
                               folding.layernorm_to_rmsnorm)
  return dataclasses.replace(config, center_positions=True), variables


def to_pre_crmsnorm(config: models.TransformerConfig, variables: Mapping
                    ) -> tuple[models.TransformerConfig, dict]:
  """Pre-LN -> Pre-CRMSNorm, exactly (`normjax.folding.
  layernorm_to_crmsnorm`; the model keeps d - 1 coordinates of the stream,
  `compressed_stream=True`)."""
  config, variables = _convert(config, variables, 'to_pre_crmsnorm',
                               folding.layernorm_to_crmsnorm)
  return dataclasses.replace(config, center_positions=True,
                             compressed_stream=True), variables


def _as_args(batch: Any, transformer: bool) -> tuple:
  """A calibration batch -> the model's positional arguments."""
  if isinstance(batch, Mapping):
    keys = ('inputs', 'targets') if transformer else ('inputs',)
    return tuple(batch[k] for k in keys)
  return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


def calibrate_layernorm(config: models.TransformerConfig, variables: Mapping,
                        calibration_batches: Iterable[Any]
                        ) -> dict[Path, float]:
  """{LayerNorm module path: s} (`normjax.folding.calibrate_layernorm`) over
  evaluation-mode forward passes: (inputs, targets) pairs or dicts with
  those keys for a Transformer, inputs [B, L] (or {'inputs': ...}) for a
  LanguageModel."""
  variables = fold_lib.plain(variables)
  transformer = is_transformer(variables)
  model = model_for(dataclasses.replace(config, deterministic=True),
                    transformer)
  return folding.calibrate_layernorm(
      lambda v, *args: model.apply(v, *args, train=False), variables,
      [_as_args(b, transformer) for b in calibration_batches])


frozen_layernorm_interceptor = folding.frozen_layernorm_interceptor


def freeze_layernorm(config: models.TransformerConfig, variables: Mapping,
                     calibration_batches: Iterable[Any], *,
                     scales: Mapping[Path, float] | None = None
                     ) -> tuple[models.TransformerConfig, dict]:
  """Replaces every LayerNorm by FakeLN with a calibrated s and folds it
  (`normjax.folding.freeze_layernorm`). An approximation; exact (to
  rounding) is the equality with the model whose LayerNorms divide by s
  (`frozen_layernorm_interceptor(scales)`). `scales` (from
  `calibrate_layernorm`) skips the calibration. LayerNorm sites become
  'none'; other sites are untouched."""
  check_foldable(config)
  present = _kinds(config, is_transformer(variables))
  names = [s for s, k in present.items() if k == 'layernorm']
  if not names:
    raise ValueError(f"freeze_layernorm applies to LayerNorm sites; this "
                     f"model's norms are {present}.")
  if scales is None:
    scales = calibrate_layernorm(config, variables, calibration_batches)
  config, variables, sites = _prepare(config, variables, names)
  variables, replacements = folding.freeze_layernorm(variables, sites, scales)
  return _replaced(config, replacements), variables


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
         jax.tree_util.tree_leaves_with_path(
             fold_lib.finish(fold_lib.plain(variables)))}
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


def load(out: str, step: int | None = None
         ) -> tuple[models.TransformerConfig, dict, dict]:
  """(config, variables, meta) of a directory written by `save`."""
  with open(os.path.join(out, CONFIG_FILE)) as f:
    config = config_from_json(json.load(f))
  state, meta, _ = checkpointing.read(os.path.join(out, 'checkpoints'), step)
  return config, fold_lib.finish(fold_lib.plain(state)), meta


# ---------------------------------------------------------------------------
# CLI.

_WORKDIR = cli.workdir_flag('Run directory: checkpoints, vocabulary.')
_CONFIG = config_flags.DEFINE_config_file(
    'config', None, "The run's config: <experiment>:<preset> (wmt:powernorm) "
    'or path.py:<preset>, with dotted overrides as in training.',
    lock_config=True)
_TRANSFORM = flags.DEFINE_enum('transform', None, TRANSFORMS,
                               'The transform to apply.')
_OUT = flags.DEFINE_string('out', None, 'Output directory.')
_STEP = flags.DEFINE_integer('step', None,
                             'Checkpoint step (default: the latest).')
_CALIBRATION = flags.DEFINE_integer(
    'calibration_batches', 8, 'freeze_ln: valid batches to calibrate on.')


def _calibration_batches(run_config, workdir: str, transformer: bool,
                         count: int) -> list:
  """The first `count` evaluation batches of the run's valid split."""
  if transformer:
    from experiments.data import TokenBatcher, load_translation
    data = load_translation(run_config.data,
                            cache_dir=os.path.join(workdir, 'vocab'))
    batches = TokenBatcher(data.valid, max_tokens=run_config.data.max_tokens,
                           max_buckets=run_config.data.max_buckets,
                           shuffle=False).eval_batches()
  else:
    from experiments.data import lm as lm_data
    data = lm_data.load_lm(run_config.data,
                           cache_dir=os.path.join(workdir, 'vocab'))
    batches = lm_data.eval_batches(
        data.valid, batch_size=run_config.data.eval_batch_size,
        seq_len=run_config.data.eval_seq_len)
  return [_as_args(b, transformer) for b in list(batches)[:count]]


def _restored_model(workdir: str, run_config, step: int | None):
  """(config, variables, meta, step) of the run's checkpoint."""
  state, meta, step = checkpointing.read(os.path.join(workdir, 'checkpoints'),
                                         step)
  variables = fold_lib.finish(fold_lib.plain(
      {k: state[k] for k in ('params', 'batch_stats', 'grad_stats')
       if k in state}))
  table = (variables['params'].get('shared_embedding')
           or variables['params'].get('target_embedding')
           or variables['params'].get('embedding'))['embedding']
  config = models.TransformerConfig.from_config(
      run_config.model, int(np.shape(table)[0]), deterministic=True)
  check_foldable(config)
  check_variables(config, variables)
  return config, variables, meta, step


def run(workdir: str, run_config: Any, transform: str, out: str,
        step: int | None = None, calibration_batches: int = 8) -> dict:
  """Restores, transforms, checks and saves; returns a summary.

  `run_config` is the run's config or its spec (`wmt:powernorm,smoke`).
  """
  if transform not in TRANSFORMS:
    raise ValueError(f'--transform={transform!r}: choose from '
                     f'{", ".join(TRANSFORMS)}.')
  if not os.path.isdir(os.path.join(workdir, 'checkpoints')):
    raise FileNotFoundError(f'--workdir={workdir}: no checkpoints/ '
                            'directory; train the run first.')
  if isinstance(run_config, str):
    run_config = configs.from_spec(run_config)
  config, variables, meta, step = _restored_model(workdir, run_config, step)
  transformer = is_transformer(variables)
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


def main() -> None:
  for name, holder in (('workdir', _WORKDIR), ('config', _CONFIG),
                       ('transform', _TRANSFORM), ('out', _OUT)):
    if holder.value is None:
      raise ValueError(f'--{name} is required (python -m experiments.fold '
                       '--workdir=RUN --config=wmt:powernorm '
                       '--transform=fold_affine --out=OUT).')
  summary = run(_WORKDIR.value, _CONFIG.value, _TRANSFORM.value, _OUT.value,
                _STEP.value, _CALIBRATION.value)
  print(f"{_TRANSFORM.value}: step {summary['step']} -> "
        f"{summary['checkpoint']}; norms {summary['norms']}")


if __name__ == '__main__':
  cli.run(main)
