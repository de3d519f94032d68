"""One definition per norm: `NormDefinition`, the record everything derives from.

A norm is written once, as a `NormDefinition`: its math (`apply`), its
options with their defaults (the only place an option is listed), its state
initialiser, which state leaves the backward pass updates, its parameters
and, where evaluation is an affine map, that map (`eval_affine`). From the
record come the pure function (`definition.function`), `get_norm`,
`init_state`, the Flax linen module (`normjax.linen`) and inference folding
(`normjax.folding`). `register(definition)` adds a norm to all of them.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from normjax._src import common
from normjax._src import rules


class Option(NamedTuple):
  """One option of a norm: its keyword, default, meaning and valid values.

  `field` names the linen module field when flax spells it differently
  (`eps` is flax's `epsilon`, `axis` its `reduction_axes`). `check` is the
  `rules.Rule` its value must satisfy (None: checked by the norm itself);
  the record applies it to every call (`NormDefinition.check_options`).
  """
  name: str
  default: Any
  doc: str
  field: str = ''
  check: rules.Rule | None = None

  @property
  def module_field(self) -> str:
    return self.field or self.name


class ParamSpec(NamedTuple):
  """A learnable parameter beyond `scale`/`bias` (DyT's alpha, EvoNorm's v).

  Its module initialiser is the field `init_field`, default `init`; a
  non-callable value v means `constant(to_value(v, features))`. `shape`:
  'features' ([C]), 'one' ((1,)) or 'groups' ([G], G the option
  `num_groups`: BCN's per-group affine). With `enabled_by` the parameter
  exists only when that option is true.
  """
  name: str
  init_field: str
  init: Any
  shape: str = 'features'
  enabled_by: str = ''
  to_value: Callable[[Any, int], float] | None = None

  def initializer(self, value: Any, features: int) -> Callable[..., Any]:
    """The initialiser a module field's `value` stands for."""
    if callable(value):
      return value
    value = self.to_value(value, features) if self.to_value else value
    return jax.nn.initializers.constant(value)

  def layout(self, features: int, param_axes: Any,
             options: Mapping[str, Any] | None = None) -> tuple[tuple, Any]:
    """(shape, logical axes): (1,) or [G] unannotated, or [C] on
    `param_axes`. 'groups' reads `options['num_groups']`."""
    if self.shape == 'one':
      return (1,), (None,)
    if self.shape == 'groups':
      return (int((options or {})['num_groups']),), (None,)
    return (features,), param_axes


class EvalAffine(NamedTuple):
  """A norm in evaluation mode: y = scale * (core(x) - center) + bias.

  `scale`, `center`, `bias` are [C]; `core` is the per-token map that stays
  (`('none', {})`, GroupScaling's `('group_scaling', {...})`, or a norm
  without affine such as `('layernorm', {'eps': ..., 'axis': -1})`).
  """
  scale: Any
  center: Any
  bias: Any
  core: tuple[str, dict[str, Any]]


@dataclasses.dataclass(frozen=True, eq=False)
class NormDefinition:
  """Everything about one norm, written once.

  Attributes:
    kind: the registry name ('powernorm').
    name: the pure function's name ('power_norm').
    module: the linen module's class name ('PowerNorm').
    apply: the math, `apply(x, params, state, *, mask, use_running_average,
      axis_name, **options)` with every option given -> `(y, new_state)`.
      Stateful norms leave it out and give `train` instead: their `apply` is
      the shared skeleton `common.stateful_apply` (validation, evaluation
      through `eval_affine`, virtual batch groups).
    options: the options and their defaults.
    doc: the docstring of the function and the module (formula, paper).
    init_state: `init_state(features, dtype, options) -> state` for stateful
      norms; None for stateless ones (their state is `EmptyState()`).
    backward_stats: state leaves updated through their cotangents in the
      backward pass (the linen `grad_stats` collection).
    eval_affine: `eval_affine(params, state, options, xp) -> EvalAffine`,
      the evaluation-mode map with `xp` = jax.numpy or numpy, where one
      exists (for stateless norms: their own affine around an affine-free
      core). `params` holds `scale` and `bias` (ones/zeros when absent);
      `state` is the evaluation state (group 0).
    use_scale, use_bias: whether the module creates `scale`/`bias`.
    extra_params: parameters beyond `scale`/`bias`.
    probe: `probe(x, state, options) -> (statistics input, {name: running})`
      for the training-dynamics probes of stateful norms.
    train: a stateful norm's training step on one batch group,
      `train(x, mask, state, params, options, axis_name) -> (y, new_state)`.
    evaluate: a stateful norm's evaluation when it is not an affine map
      (EvoNorm-B0, BCN): `evaluate(x, mask, state, params, options) -> y`
      with the evaluation state (group 0); such a norm has no
      `eval_affine` and does not fold.
    check: `check(options, features, fn)`, raising on invalid options.
    state_maker: the public name of the state initialiser, for messages.
    batch_statistics: whether training statistics are taken over the
      batch (other tokens and examples); None: as `stateful` (true of every
      built-in norm).
  """
  kind: str
  name: str
  module: str
  options: tuple[Option, ...]
  doc: str
  apply: Callable[..., Any] | None = None
  init_state: Callable[[int, Any, dict[str, Any]], Any] | None = None
  backward_stats: tuple[str, ...] = ()
  eval_affine: Callable[..., EvalAffine] | None = None
  use_scale: bool = True
  use_bias: bool = True
  extra_params: tuple[ParamSpec, ...] = ()
  probe: Callable[..., Any] | None = None
  train: Callable[..., Any] | None = None
  evaluate: Callable[..., Any] | None = None
  check: Callable[[dict[str, Any], int, str], None] | None = None
  state_maker: str = ''
  batch_statistics: bool | None = None
  function: Callable[..., Any] = dataclasses.field(init=False, repr=False)

  def __post_init__(self):
    if ZERO_CENTERED_SCALE.name not in {o.name for o in self.options}:
      object.__setattr__(self, 'options',
                         (*self.options, ZERO_CENTERED_SCALE))
    if self.stateful and 'num_batch_groups' not in self.defaults:
      raise TypeError(
          f'NormDefinition {self.kind!r}: a stateful norm needs the option '
          "Option('num_batch_groups', 1, ...): the shared skeleton splits "
          'the batch into that many groups with their own state.')
    apply = self.apply or functools.partial(common.stateful_apply, self)
    object.__setattr__(self, 'apply', _checked_apply(self, apply))
    object.__setattr__(self, 'function', _make_function(self))

  @staticmethod
  def registered(kind: str) -> NormDefinition:
    """The registered definition of `kind` (e.g. an evaluation core)."""
    return lookup(kind, 'NormDefinition')

  @property
  def defaults(self) -> dict[str, Any]:
    return {o.name: o.default for o in self.options}

  @property
  def stateful(self) -> bool:
    return self.init_state is not None

  @property
  def batch_dependent(self) -> bool:
    """A token's training output depends on the rest of the batch."""
    return (self.stateful if self.batch_statistics is None
            else self.batch_statistics)

  @property
  def causal_safe(self) -> bool:
    """A token's training output depends on that token alone, so the norm
    can sit in a decoder during training (no statistic over later
    tokens)."""
    return not self.batch_dependent

  @property
  def foldable(self) -> bool:
    """Evaluation is an affine map around a per-token core, which
    `normjax.folding` folds into the layers that read the norm."""
    return self.eval_affine is not None

  def resolve(self, given: Mapping[str, Any], fn: str | None = None
              ) -> dict[str, Any]:
    """The defaults updated with `given`; unknown options raise."""
    fn = fn or self.name
    unknown = sorted(set(given) - set(self.defaults))
    if unknown:
      raise TypeError(f'{fn}: unknown options {unknown}; {fn} accepts '
                      f'{sorted(self.defaults)}.')
    resolved = {**self.defaults, **given}
    self.check_options(resolved, fn)
    return resolved

  def check_options(self, options: Mapping[str, Any], fn: str | None = None,
                    *, fields: bool = False) -> None:
    """Raises a ValueError naming the first option its rule rejects.

    `options` is keyed by option names; `fields=True` names the option by
    its module field in the message (`epsilon` for a module's `eps`).
    """
    fn = fn or self.name
    for option in self.options:
      rule = option.check
      if rule is None or option.name not in options:
        continue
      value = options[option.name]
      if not rule.accepts(value):
        name = option.module_field if fields else option.name
        raise ValueError(f'{fn}: `{name}` must be {rule.expected}, got '
                         f'{value!r}.')

  def new_state(self, features: int, dtype=jnp.float32, **options) -> Any:
    """A fresh state; `options` may hold any option (the rest default)."""
    options = self.resolve(options)
    if self.init_state is None:
      return common.EmptyState()
    return self.init_state(features, dtype, options)


ZERO_CENTERED_SCALE = Option(
    'zero_centered_scale', False,
    'True stores the scale as gamma - 1 (initialised to 0) and applies '
    '1 + scale (Gemma RMSNorm, MaxText/T5X `scale_offset`/'
    '`center_scale_at_zero`), so weight decay pulls gamma to 1; '
    '`scale_init` still initialises gamma (the stored value is '
    'scale_init - 1). Every norm has it, added by the record.',
    check=rules.FLAG)
"""The one option every norm gets: the record appends it to its options and
the checked `apply` turns the stored `scale` into the applied one."""


def effective_params(params: Any, zero_centered: Any, x_dtype: Any = None
                     ) -> Any:
  """`params` with the applied scale 1 + scale when `zero_centered`.

  The sum is taken in at least float32 (float64 for float64 `x`), so a
  bfloat16 or float32 stored gamma - 1 near 0 keeps its precision. Anything
  that is not a mapping with a `scale` is returned as is (the norm's own
  checks report it).
  """
  if not zero_centered or not isinstance(params, Mapping) or (
      'scale' not in params):
    return params
  scale = params['scale']
  dtype = jnp.promote_types(jnp.result_type(scale), jnp.float32)
  if x_dtype is not None and jnp.issubdtype(x_dtype, jnp.floating):
    dtype = jnp.promote_types(dtype, x_dtype)
  return {**params, 'scale': jnp.asarray(scale).astype(dtype) + 1}


def scale_initializer(init: Callable[..., Any], zero_centered: Any
                      ) -> Callable[..., Any]:
  """The stored scale's initialiser: `init` (of gamma), minus 1 when
  `zero_centered` (so the default ones give zeros)."""
  if not zero_centered:
    return init

  def zero_centered_init(key, shape, dtype=jnp.float32):
    return (jnp.asarray(init(key, shape, dtype)) - 1).astype(dtype)
  return zero_centered_init


_P = inspect.Parameter


def _checked_apply(definition: NormDefinition,
                   apply: Callable[..., Any]) -> Callable[..., Any]:
  """`apply` with the options checked first: the one funnel of the function,
  the modules and evaluation cores."""
  if getattr(apply, 'checked_for', None) is definition:
    return apply

  @functools.wraps(apply)
  def checked(x, params, state, **kwargs):
    definition.check_options(kwargs, definition.name)
    zero_centered = kwargs.pop(ZERO_CENTERED_SCALE.name, False)
    params = effective_params(params, zero_centered, getattr(x, 'dtype',
                                                             None))
    return apply(x, params, state, **kwargs)

  checked.checked_for = definition
  return checked


def _make_function(definition: NormDefinition) -> Callable[..., Any]:
  def function(x, params=None, state=None, *, mask=None,
               use_running_average=False, axis_name=None, **options):
    return definition.apply(
        x, {} if params is None else params, state, mask=mask,
        use_running_average=use_running_average,
        axis_name=axis_name, **definition.resolve(options))

  fixed = [_P('x', _P.POSITIONAL_OR_KEYWORD),
           _P('params', _P.POSITIONAL_OR_KEYWORD, default=None),
           _P('state', _P.POSITIONAL_OR_KEYWORD, default=None),
           _P('mask', _P.KEYWORD_ONLY, default=None),
           _P('use_running_average', _P.KEYWORD_ONLY, default=False),
           _P('axis_name', _P.KEYWORD_ONLY, default=None)]
  opts = [_P(o.name, _P.KEYWORD_ONLY, default=o.default)
          for o in definition.options]
  function.__signature__ = inspect.Signature(fixed + opts)
  function.__name__ = function.__qualname__ = definition.name
  function.__doc__ = definition.doc.rstrip() + _options_doc(definition)
  function.__module__ = 'normjax.functional'
  function.definition = definition
  return function


def _options_doc(definition: NormDefinition) -> str:
  if not definition.options:
    return ''
  lines = [f'    {o.name} (default {o.default!r}): {o.doc}'
           + (f' Must be {o.check.expected}.' if o.check else '')
           for o in definition.options]
  return '\n\n  Options:\n' + '\n'.join(lines) + '\n'


# The registry: every norm that fills a norm slot, by kind.
REGISTRY: dict[str, NormDefinition] = {}


def register(definition: NormDefinition) -> NormDefinition:
  """Adds `definition` to the registry (replacing one of the same kind)."""
  REGISTRY[definition.kind] = definition
  return definition


def unregister(kind: str) -> None:
  """Removes a registered norm from the registry (and so from MODULES)."""
  REGISTRY.pop(kind, None)


def lookup(kind: str, fn: str) -> NormDefinition:
  if kind not in REGISTRY:
    raise ValueError(f'{fn}: unknown norm kind {kind!r}; choose from '
                     f'{sorted(REGISTRY)}.')
  return REGISTRY[kind]
