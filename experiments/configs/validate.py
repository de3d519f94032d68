"""Start-up checks of a run's config, before any data is read or compiled.

    config = validate.checked(config)  # plain values, locked; or ConfigError

`RULES` is the whole table: a dotted path (`*` matches every key, e.g. every
norm site) and the rules its value must pass, in order; a path the config
does not have (the language model has no `decode`) is skipped. Each problem
names the flag to fix, `--config.train.checkpoint_every=0: must be >= 1`,
and all of them come together in one `ConfigError` (a ValueError: one
`error: ...` line from `experiments.cli`).

Norm sites: the kind must be a norm of the normjax registry that fills a
plain slot (`normjax.linen.MODULES`), `num_groups` must divide the width,
and the options go through normjax's own checks (`make_norm` for unknown
options, the norm definition's `resolve` and `check`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any, NamedTuple

import ml_collections

from experiments import configs
from experiments import models
from experiments.configs import common
from experiments.data import lm as lm_data
from experiments.data import pipeline
from experiments.data import sources
from normjax import linen as nnorm
from normjax._src import registry

# Compute dtypes of `model.dtype`: activations and matmuls; the parameters
# and the norms' statistics stay float32.
DTYPES = ('float32', 'bfloat16')
# experiments.train_lib.make_schedule and _nonfinite_step.
SCHEDULES = ('inverse_sqrt', 'cosine')
NONFINITE_POLICIES = ('stop', 'skip')
# experiments.train_lib.make_optimizer.
OPTIMIZERS = ('adam', 'adamp')


@dataclasses.dataclass(frozen=True)
class Context:
  """What a rule may look at besides its value: the config, the path, and
  the paths found wrong so far (`other` leaves them to their own rules)."""
  config: ml_collections.ConfigDict
  path: str
  wrong: Collection[str] = ()

  def other(self, path: str) -> Any:
    """The value at `path` for a cross-field rule; None if it is wrong."""
    return None if path in self.wrong else self.get(path)

  def get(self, path: str, default: Any = None) -> Any:
    node = self.config
    for key in path.split('.'):
      if not hasattr(node, 'keys') or key not in node:
        return default
      node = node[key]
    return node

  def sibling(self, key: str, default: Any = None) -> Any:
    return self.get(f'{self.path.rpartition(".")[0]}.{key}', default)


class At(NamedTuple):
  """A problem of the field `key` under the value a rule checked."""
  key: str
  text: str


# A rule: (value, context) -> what the value must be (At: what one of its
# fields must be), or None when it is.
Rule = Callable[[Any, Context], 'str | At | None']


def at_least(low: float) -> Rule:
  return lambda v, ctx: None if v >= low else f'must be >= {low}'


def above(low: float) -> Rule:
  return lambda v, ctx: None if v > low else f'must be > {low}'


def fraction() -> Rule:
  """In [0, 1): a dropout rate, a beta, a smoothing."""
  return lambda v, ctx: None if 0 <= v < 1 else 'must be in [0, 1)'


def zero_or_at_least(low: int, zero_means: str) -> Rule:
  return lambda v, ctx: (None if v == 0 or v >= low else
                         f'must be 0 ({zero_means}) or >= {low}')


def one_of(choices: Collection[Any] | Callable[[], Collection[Any]]) -> Rule:
  """`choices`, or a function giving them when checked (a live registry)."""
  def rule(v, ctx):
    options = sorted(choices() if callable(choices) else choices)
    return None if v in options else f'choose one of {", ".join(options)}'
  return rule


def at_most(path: str) -> Rule:
  def rule(v, ctx):
    other = ctx.other(path)
    return None if other is None or v <= other else (
        f'must be <= {path}={other}')
  return rule


def divides(path: str, unless: str | None = None) -> Rule:
  """Divides the positive int at `path` (not checked where `unless` is set
  or either number is out of its range, which its own rule reports)."""
  def rule(v, ctx):
    whole = ctx.other(path)
    if (unless and ctx.get(unless)) or not isinstance(whole, int) or (
        whole < 1 or v < 1):
      return None
    return None if whole % v == 0 else f'must divide {path}={whole}'
  return rule


def site_width(ctx) -> tuple[str, Any]:
  """(what, value) of the width the norm site at or above `ctx.path`
  normalises: model.d_model; the head width of a '<stack>_qkv' site
  (model.head_dim, or d_model // num_heads); model.ffn_dim of a
  '<stack>_ffn_mid' site (models.PLACEMENT_SITES)."""
  site = ctx.path.split('.')[2]
  if site.endswith('_qkv'):
    if ctx.get('model.head_dim'):
      return 'model.head_dim', ctx.get('model.head_dim')
    d, heads = ctx.get('model.d_model'), ctx.get('model.num_heads')
    return ('the head width model.d_model // model.num_heads',
            d // heads if isinstance(heads, int) and heads >= 1 else None)
  if site.endswith('_ffn_mid'):
    return 'model.ffn_dim', ctx.get('model.ffn_dim')
  return 'model.d_model', ctx.get('model.d_model')


_WIDTHS = ('model.d_model', 'model.num_heads', 'model.head_dim',
           'model.ffn_dim')


def groups_divide_width(v, ctx):
  """A grouped norm's `num_groups` divides the width it normalises
  (`site_width`; not checked where `use_group_scaling=False` turns the
  groups off, or where a width's own rule failed)."""
  if not ctx.sibling('use_group_scaling', True):
    return None
  what, width = site_width(ctx)
  if any(p in ctx.wrong for p in _WIDTHS) or not isinstance(width, int) or (
      width < 1 or v < 1):
    return None
  return None if width % v == 0 else f'must divide {what}={width}'


def model_options(model, ctx):
  """The model fields only some modifiers add (a preset without them
  passes): model.qk_norm, model.mix_alpha ('mix'), model.embed_norm,
  model.architecture ('ngpt'); the first problem, at its field."""
  checks = (
      ('qk_norm', one_of(('', 'rmsnorm', 'layernorm'))),
      ('mix_alpha', lambda v, c: None if isinstance(v, (int, float)) and (
          0 <= v <= 1) else 'must be in [0, 1]'),
      ('embed_norm', lambda v, c: None if v is None or isinstance(v, bool)
       else 'must be True or False'),
      ('architecture', one_of(models.ARCHITECTURES)),
  )
  for key, rule in checks:
    if key in model:
      problem = rule(model[key], ctx)
      if problem:
        return At(key, problem)
  return None


def increasing_positive(v, ctx):
  cutoffs = list(v)
  if cutoffs and (cutoffs != sorted(set(cutoffs)) or cutoffs[0] <= 0):
    return 'must be increasing positive ints (empty: a full softmax)'
  return None


def a_regex(v, ctx):
  if not isinstance(v, str) or not v:
    return 'must be a non-empty regular expression'
  try:
    re.compile(v)
  except re.error as e:
    return f'is not a regular expression ({e})'
  return None


def is_bool(v, ctx):
  return None if isinstance(v, bool) else 'must be True or False'


def nap_has_invariant_weights(v, ctx):
  """NaP's default weights (query/key kernels) are scale-invariant only
  behind a QK-norm (the placement's or model.qk_norm)."""
  if not v or ctx.other('optim.nap_params') != common.NAP_PARAMS:
    return None
  placement = models.PLACEMENTS.get(ctx.get('model.placement', 'pre'))
  qk = ctx.get('model.qk_norm') or any(
      getattr(placement, f, False) for f in ('qk_norm', 'qkv_norm'))
  return None if qk else (
      'the default optim.nap_params (query/key kernels) are scale-invariant '
      'only behind a QK-norm in the attention (a placement with one); '
      'projecting other weights changes the model: choose them with '
      '--config.optim.nap_params=<regex>')


def after_the_last_removal(v, ctx):
  """ln_removal.num_steps leaves at least one step after the final norm's
  removal (experiments.ln_removal.removal_schedule)."""
  keys = ('start', 'gap_ffn', 'gap_qk', 'gap_v')
  values = [ctx.other(f'ln_removal.{k}') for k in keys]
  layers = ctx.other('model.num_decoder_layers')
  if any(not isinstance(x, int) for x in values + [layers]):
    return None
  start, ffn, qk, v_gap = values
  last = start + layers * (ffn + qk + v_gap)
  return None if v > last else (
      f'must be > {last}, the step of the final norm\'s removal')


def mesh_axis(v, ctx):
  return None if v == -1 or v >= 1 else (
      'must be >= 1, or -1 for every remaining device')


def normjax_accepts(site, ctx):
  """The site's options, as normjax itself checks them: unknown options
  (`make_norm`), then the norm definition's `resolve` and `check` at the
  width `model.d_model`; the problem goes to the option it names."""
  options = dict(site)
  kind = options.pop('kind')
  fields = {}
  try:
    nnorm.make_norm(kind, **options)
    if kind in registry.FUNCTIONS:
      definition = registry.get_definition(kind)
      fields = {o.name: o.module_field for o in definition.options}
      given = definition.resolve({name: options[field] for name, field
                                  in fields.items() if field in options},
                                 kind)
      if definition.check is not None:
        definition.check(given, site_width(ctx)[1], kind)
  except (TypeError, ValueError) as e:
    named = [fields.get(n, n) for n in re.findall(r'`(\w+)`', str(e))]
    key = next((k for k in named if k in options), None)
    return str(e) if key is None else At(key, str(e))
  return None


def _norm_kinds() -> Collection[str]:
  return nnorm.MODULES.keys()


# The whole table. A value is checked by its rules in order up to the first
# that fails; `model.norms.*` (the site as a whole) only where its fields
# passed.
RULES: tuple[tuple[str, Rule, ...], ...] = (
    ('seed', at_least(0)),
    # model
    ('model.d_model', at_least(1)),
    ('model.num_heads', at_least(1),
     divides('model.d_model', unless='model.head_dim')),
    ('model.head_dim', at_least(0)),
    ('model.ffn_dim', at_least(1)),
    ('model.num_encoder_layers', at_least(1)),
    ('model.num_decoder_layers', at_least(1)),
    ('model.dropout', fraction()),
    ('model.attention_dropout', fraction()),
    ('model.activation_dropout', fraction()),
    ('model.placement', one_of(models.PLACEMENTS)),
    ('model', model_options),
    ('model.max_len', at_least(1)),
    ('model.adaptive_softmax_cutoffs', increasing_positive),
    ('model.dtype', one_of(DTYPES)),
    ('model.norms.*.kind', one_of(_norm_kinds)),
    ('model.norms.*.num_groups', at_least(1), groups_divide_width),
    ('model.norms.*', normjax_accepts),
    # data (translation and language model)
    ('data.source', one_of(sources.READERS.keys() | lm_data.READERS.keys())),
    ('data.vocab', one_of(pipeline.VOCABS)),
    ('data.vocab_size', at_least(0)),
    ('data.max_len', zero_or_at_least(2, 'no limit'), at_most('model.max_len')),
    ('data.max_tokens', at_least(1)),
    ('data.max_buckets', at_least(1)),
    ('data.max_train_examples', at_least(0)),
    ('data.synthetic_seed', at_least(0)),
    ('data.synthetic_train', at_least(1)),
    ('data.synthetic_valid', at_least(1)),
    ('data.synthetic_test', at_least(1)),
    ('data.synthetic_train_lines', at_least(1)),
    ('data.synthetic_valid_lines', at_least(1)),
    ('data.synthetic_test_lines', at_least(1)),
    ('data.batch_size', at_least(1)),
    ('data.eval_batch_size', at_least(1)),
    ('data.seq_len', at_least(1), at_most('model.max_len')),
    ('data.eval_seq_len', at_least(1), at_most('model.max_len')),
    # optimizer and schedule
    ('optim.b1', fraction()),
    ('optim.b2', fraction()),
    ('optim.eps', above(0)),
    ('optim.weight_decay', at_least(0)),
    ('optim.clip_norm', at_least(0)),
    ('optim.label_smoothing', fraction()),
    ('optim.kind', one_of(OPTIMIZERS)),
    ('optim.delta', above(0)),
    ('optim.wd_ratio', at_least(0)),
    ('optim.nesterov', is_bool),
    ('optim.nap_params', a_regex),
    ('optim.nap', is_bool, nap_has_invariant_weights),
    ('schedule.kind', one_of(SCHEDULES)),
    ('schedule.peak_lr', above(0)),
    ('schedule.warmup_steps', at_least(0)),
    ('schedule.warmup_init_lr', at_least(0)),
    ('schedule.min_lr', at_least(0), at_most('schedule.peak_lr')),
    ('schedule.decay_steps', at_least(1)),
    # LayerNorm removal (experiments.ln_removal)
    ('ln_removal.start', at_least(0)),
    ('ln_removal.gap_ffn', at_least(0)),
    ('ln_removal.gap_qk', at_least(0)),
    ('ln_removal.gap_v', at_least(0)),
    ('ln_removal.num_steps', at_least(1), after_the_last_removal),
    ('ln_removal.peak_lr', above(0)),
    ('ln_removal.min_lr', at_least(0), at_most('ln_removal.peak_lr')),
    ('ln_removal.warmup_steps', at_least(0)),
    ('ln_removal.weight_decay', at_least(0)),
    ('ln_removal.clip_norm', at_least(0)),
    ('ln_removal.calibration_batches', at_least(1)),
    ('ln_removal.log_every', at_least(1)),
    # training
    ('train.num_steps', at_least(1)),
    ('train.log_every', at_least(1)),
    ('train.eval_every', at_least(1)),
    ('train.checkpoint_every', at_least(1)),
    ('train.keep_checkpoints', at_least(1)),
    ('train.early_stop_patience', at_least(0)),
    ('train.eval_bleu_examples', at_least(0)),
    ('train.probe_every', at_least(0)),
    ('train.nonfinite', one_of(NONFINITE_POLICIES)),
    ('train.nonfinite_max_skips', at_least(0)),
    ('train.divergence_factor', at_least(0)),
    # decoding
    ('decode.beam_size', at_least(1)),
    ('decode.length_penalty', at_least(0)),
    ('decode.max_len_a', at_least(0)),
    ('decode.max_len_b', at_least(0)),
    ('decode.average_last', at_least(1)),
    ('decode.batch_tokens', at_least(1)),
    # mesh
    ('mesh.data', mesh_axis),
    ('mesh.fsdp', mesh_axis),
    ('mesh.tensor', mesh_axis),
)


def expand(config: Mapping[str, Any], pattern: str) -> Iterator[str]:
  """The paths of `config` that `pattern` names (`*`: every key)."""
  def walk(node, keys, prefix):
    if not keys:
      yield prefix
      return
    if not hasattr(node, 'keys'):
      return
    head, rest = keys[0], keys[1:]
    for key in (sorted(node.keys()) if head == '*' else [head]):
      if key in node:
        yield from walk(node[key], rest, f'{prefix}.{key}' if prefix else key)
  yield from walk(config, pattern.split('.'), '')


def _flag(path: str, value: Any) -> str:
  if hasattr(value, 'keys'):
    return f'--config.{path}'
  return f'--config.{path}={value}'


def problems(config: ml_collections.ConfigDict) -> list[str]:
  """Every problem of `config` (resolved values), in `RULES` order."""
  found: dict[str, str] = {}
  for pattern, *rules in RULES:
    for path in expand(config, pattern):
      if any(p == path or p.startswith(path + '.') for p in found):
        continue
      context = Context(config, path, found.keys())
      value = context.get(path)
      for rule in rules:
        problem = rule(value, context)
        if isinstance(problem, At):
          where = f'{path}.{problem.key}'
          found[where] = f'{_flag(where, value[problem.key])}: {problem.text}'
          break
        if problem:
          found[path] = f'{_flag(path, value)}: {problem}'
          break
  return list(found.values())


def checked(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with plain values (every default that follows another field,
  `common.follows`, fixed at its value now), locked; raises ConfigError
  naming every problem (`RULES`)."""
  resolved = config.copy_and_resolve_references()
  found = problems(resolved)
  if len(found) == 1:
    raise configs.ConfigError(found[0])
  if found:
    raise configs.ConfigError(f'{len(found)} config problems: '
                              + '; '.join(found))
  resolved.lock()
  return resolved
