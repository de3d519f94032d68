"""Flax linen modules, derived from the norm definitions: no math here.

Every norm of the registry (`normjax._src.definition.REGISTRY`) gets a linen
module (`module_for(definition)`): its fields are the norm's options (under
flax's names: `epsilon`, `reduction_axes`) plus the fields every normjax
module shares, in flax.linen's LayerNorm/BatchNorm conventions: `dtype`,
`param_dtype`, `use_scale`/`use_bias`, `scale_init`/`bias_init`,
`axis_name`, flax's `feature_axes`, `use_fast_variance`,
`force_float32_reductions`, `axis_index_groups` (the values normjax
implements only: features last, the two-pass variance, float32 reductions,
no device groups; others raise naming the field), `param_axes` (logical
axis names, default None: plain arrays as flax's LayerNorm, no
`LogicallyPartitioned` boxes) and, for stateful norms,
`use_running_average` (in the constructor or the call, as `nn.BatchNorm`)
and `axis` (features last). `help()` on a module lists every field with its
default and meaning (`SHARED_FIELD_DOCS`). Params are `scale`/
`bias` (and the norm's extra parameters); forward running statistics live
in `batch_stats`. Statistics that the backward pass updates (PowerNorm's
`ema_gz`, UN's `ema_gz`/`bwd_window`) live in the `grad_stats` collection:
differentiate the loss with respect to it and fold the result back with
`normjax.apply_backward_stats`; never hand it to the optimizer.

Every module of `MODULES` is called as
`module(x, use_running_average=None, *, mask=None)`, so any norm can be
injected where another was. `dtype=None` returns the dtype of `x` (flax
would promote bf16 activations to the float32 of the params).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from normjax._src import definition as nd
from normjax._src import probes
# Importing the registry registers the built-in norms.
from normjax._src import registry  # noqa: F401  # pylint: disable=unused-import
from normjax._src.conditional_modules import CONDITIONAL_MODULES
from normjax._src.training import GRAD_STATS

Array = jax.Array
Initializer = Callable[..., Array]

BATCH_STATS = 'batch_stats'


# The meaning of every field the modules share (linen and nnx), for help().
SHARED_FIELD_DOCS: dict[str, str] = {
    'dtype': 'dtype of the output; None keeps the dtype of x (flax would '
             'promote bf16 inputs to the params\' float32).',
    'param_dtype': 'dtype of the parameters.',
    'use_scale': 'whether to learn a per-feature `scale` (gamma).',
    'use_bias': 'whether to learn a per-feature `bias` (beta).',
    'scale_init': 'initializer of `scale`.',
    'bias_init': 'initializer of `bias`.',
    'axis_name': 'name of the mapped axis (vmap/pmap/shard_map) whose '
                 'devices share the statistics, as flax; None: local.',
    'param_axes': 'logical axis names of the per-feature parameters and '
                  "statistics (e.g. ('embed',)) for flax's logical "
                  'partitioning; None (as flax): plain arrays, no annotation.',
    'feature_axes': "flax's axes of scale/bias: normjax keeps the features "
                    'on the last axis, so -1 (or (-1,)) only.',
    'use_fast_variance': "flax's one-pass variance E[x^2]-E[x]^2: normjax "
                         'always computes the precise two-pass variance, so '
                         'False only.',
    'force_float32_reductions': 'normjax always reduces in float32, so True '
                                'only.',
    'axis_index_groups': "flax's device groups of `axis_name`: not "
                         'supported, None only.',
    'use_running_average': 'normalise with the running statistics '
                           '(evaluation) instead of the batch (training); '
                           'the call argument, when given, wins.',
    'axis': "nn.BatchNorm's features axis: normjax keeps the features "
            'last, so -1 only.',
}


def _axes(value: Any) -> tuple[Any, ...]:
  return tuple(value) if isinstance(value, (tuple, list)) else (value,)


# flax fields with the one value normjax implements: (accepted, fix).
_FLAX_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    'feature_axes': (lambda v: _axes(v) == (-1,),
                     'normjax keeps the features (scale/bias) on the last '
                     'axis: pass -1 and move the features last.'),
    'use_fast_variance': (lambda v: v is False or v == 0,
                          'normjax always computes the precise two-pass '
                          'variance E[(x-mean)^2], not the one-pass '
                          'E[x^2]-E[x]^2: pass False or leave it out.'),
    'force_float32_reductions': (lambda v: bool(v),
                                 'normjax always reduces in float32: pass '
                                 'True or leave it out.'),
    'axis_index_groups': (lambda v: v is None,
                          'device groups are not supported: leave it None '
                          'and give `axis_name` a mesh axis of the group.'),
    'axis': (lambda v: _axes(v) == (-1,),
             'normjax keeps the features on the last axis: pass -1 and '
             'move the features last.'),
}


def check_flax_fields(values: Mapping[str, Any], cls: str) -> None:
  """Raises a ValueError naming the field and the fix for a flax field
  with a value normjax does not implement."""
  for name, (accepted, fix) in _FLAX_FIELDS.items():
    if name in values and not accepted(values[name]):
      raise ValueError(f'{cls}: {name}={values[name]!r} is not supported; '
                       f'{fix}')


def attributes_doc(definition: nd.NormDefinition,
                   defaults: Mapping[str, Any]) -> str:
  """The `Attributes:` section of a module class: every field (`defaults`,
  in order) with its default and meaning."""
  docs = {**SHARED_FIELD_DOCS,
          **{s.init_field: f'initializer (or value) of the `{s.name}` '
                           'parameter.' for s in definition.extra_params},
          **{o.module_field: o.doc for o in definition.options}}
  lines = [f'    {name} (default {_shown(default)}): {docs[name]}'
           for name, default in defaults.items()]
  return '\n\n  Attributes:\n' + '\n'.join(lines) + '\n'


def _shown(value: Any) -> str:
  """A default as help() shows it: functions and dtypes by name."""
  if callable(value) and hasattr(value, '__name__'):
    return value.__name__
  return repr(value)


class _Norm(nn.Module):
  """Fields shared by every normjax norm module (flax.linen names)."""
  dtype: Any = None
  param_dtype: Any = jnp.float32
  use_scale: bool = True
  use_bias: bool = True
  scale_init: Initializer = nn.initializers.ones
  bias_init: Initializer = nn.initializers.zeros
  axis_name: Any = None
  feature_axes: Any = -1
  use_fast_variance: bool = False
  force_float32_reductions: bool = True
  axis_index_groups: Any = None
  param_axes: tuple[str, ...] | None = None

  definition: ClassVar[nd.NormDefinition]

  def __post_init__(self):
    options = {o.module_field for o in self.definition.options}
    check_flax_fields({f: getattr(self, f) for f in _FLAX_FIELDS
                       if hasattr(self, f) and f not in options},
                      type(self).__name__)
    # A free function: flax interceptors see every method call, and the
    # module is not bound yet.
    self.definition.check_options(options_of(self.definition, self),
                                  type(self).__name__, fields=True)
    super().__post_init__()

  def _annotated(self, init: Initializer, axes: Any) -> Initializer:
    """`init`, boxed with its logical axes only when `param_axes` is set."""
    if self.param_axes is None:
      return init
    return nn.with_logical_partitioning(init, axes)

  def _options(self) -> dict[str, Any]:
    return options_of(self.definition, self)

  def _params(self, features: int) -> dict[str, Array]:
    """`scale`/`bias` and the norm's extra parameters, as the fields say."""
    params = {}
    for spec in self.definition.extra_params:
      if not spec.enabled_by or getattr(self, spec.enabled_by):
        params[spec.name] = self._extra_param(spec, features)
    scale_init = nd.scale_initializer(
        self.scale_init, self._options()[nd.ZERO_CENTERED_SCALE.name])
    for name, use, init in (('scale', self.use_scale, scale_init),
                            ('bias', self.use_bias, self.bias_init)):
      if use:
        params[name] = self.param(
            name, self._annotated(init, self.param_axes),
            (features,), self.param_dtype)
    return params

  def _extra_param(self, spec: nd.ParamSpec, features: int) -> Array:
    init = spec.initializer(getattr(self, spec.init_field), features)
    shape, axes = spec.layout(features, self.param_axes, self._options())
    return self.param(spec.name, self._annotated(init, axes),
                      shape, self.param_dtype)

  def _out(self, y: Array) -> Array:
    return y if self.dtype is None else y.astype(self.dtype)


class _StatelessNorm(_Norm):
  """Calls the norm's function on x with the module's params and options."""

  @nn.compact
  def __call__(self, x: Array, use_running_average: bool | None = None, *,
               mask: Array | None = None) -> Array:
    del use_running_average
    probes.record(self, x, mask)
    y, _ = self.definition.apply(
        x, self._params(jnp.shape(x)[-1]), None, mask=mask,
        use_running_average=False, axis_name=self.axis_name,
        **self._options())
    return self._out(y)


class _StatefulNorm(_Norm):
  """Reads the state variables, calls the function, writes the forward state."""
  use_running_average: bool | None = None
  axis: Any = -1

  def _variables(self, features: int) -> tuple[type[Any], dict[str, Any]]:
    """(state type, the state leaves as grad_stats/batch_stats variables)."""
    fresh = self.definition.new_state(features, jnp.float32,
                                      **self._options())
    backward = self.definition.backward_stats
    variables = {}
    for name in fresh._fields:
      value = getattr(fresh, name)
      init = self._annotated(lambda v=value: v,
                             state_leaf_axes(value.ndim, self.param_axes))
      variables[name] = self.variable(
          GRAD_STATS if name in backward else BATCH_STATS, name, init)
    return type(fresh), variables

  @nn.compact
  def __call__(self, x: Array, use_running_average: bool | None = None, *,
               mask: Array | None = None) -> Array:
    use_running_average = nn.merge_param(
        'use_running_average', self.use_running_average, use_running_average)
    features = jnp.shape(x)[-1]
    params = self._params(features)
    state_type, variables = self._variables(features)
    state = state_type(**{k: v.value for k, v in variables.items()})
    options = self._options()
    if not use_running_average and self.is_mutable_collection(probes.PROBES):
      seen, running = self.definition.probe(x, state, options)
      probes.record(self, x, mask, running, statistics_input=seen)
    y, new_state = self.definition.apply(
        x, params, state, mask=mask, use_running_average=use_running_average,
        axis_name=self.axis_name, **options)
    if not self.is_initializing() and not use_running_average:
      for name, variable in variables.items():
        if name not in self.definition.backward_stats:
          variable.value = getattr(new_state, name)
    return self._out(y)


def norm_fields(definition: nd.NormDefinition) -> dict[str, Any]:
  """The module fields particular to `definition`, with their defaults: the
  options (flax names), the extra parameters' initialisers and
  `use_scale`/`use_bias` (linen and nnx alike)."""
  fields = {o.module_field: o.default for o in definition.options}
  for spec in definition.extra_params:
    fields.setdefault(spec.init_field, spec.init)
  fields.update(use_scale=definition.use_scale, use_bias=definition.use_bias)
  return fields


def options_of(definition: nd.NormDefinition, module: Any) -> dict[str, Any]:
  """The norm's options (function names) read off a module's fields."""
  return {o.name: getattr(module, o.module_field)
          for o in definition.options}


def state_leaf_axes(ndim: int, param_axes: Any) -> tuple[Any, ...]:
  """Logical axes of a state leaf: features on `param_axes`, the leading
  (batch-group, window) axes unnamed; () for scalars (`step`)."""
  if not ndim:
    return ()
  return (None,) * (ndim - 1) + tuple(param_axes or ())


_CLASSES: dict[str, tuple[nd.NormDefinition, type[nn.Module]]] = {}


def module_for(definition: nd.NormDefinition) -> type[nn.Module]:
  """The linen module class of `definition` (made once per definition).

  Its fields: the shared ones of `_Norm`, the norm's options under their
  module names with their defaults, and the initialisers of its extra
  parameters.
  """
  cached = _CLASSES.get(definition.kind)
  if cached and cached[0] is definition:
    return cached[1]
  fields = norm_fields(definition)
  namespace = {
      '__annotations__': {k: Any for k in fields}, **fields,
      'definition': definition, '__module__': 'normjax.linen',
      '__qualname__': definition.module,
  }
  base = _StatefulNorm if definition.stateful else _StatelessNorm
  cls = type(definition.module, (base,), namespace)
  cls.__doc__ = (f'{definition.doc.splitlines()[0]}\n\n  Flax linen module '
                 f'of `normjax.functional.{definition.name}` (see its '
                 'docstring for the formula).' + attributes_doc(
                     definition, {f.name: f.default
                                  for f in dataclasses.fields(cls)
                                  if f.name not in ('parent', 'name')}))
  _CLASSES[definition.kind] = (definition, cls)
  return cls


class Identity(nn.Module):
  """No normalisation, with the common call signature (`kind='none'`)."""

  @nn.compact
  def __call__(self, x: Array, use_running_average: bool | None = None, *,
               mask: Array | None = None) -> Array:
    del use_running_average
    probes.record(self, x, mask)
    return x


class _Modules(Mapping):
  """The slot-norm modules by kind, live over the registry, and 'none'."""

  def __getitem__(self, kind: str) -> type[nn.Module]:
    if kind == 'none':
      return Identity
    return module_for(nd.REGISTRY[kind])

  def __iter__(self) -> Iterator[str]:
    return iter([*nd.REGISTRY, 'none'])

  def __len__(self) -> int:
    return len(nd.REGISTRY) + 1


MODULES: Mapping[str, type[nn.Module]] = _Modules()


def shared_defaults(stateful: bool) -> dict[str, Any]:
  """The fields every normjax module shares (and, if `stateful`, those of
  the stateful ones) with their linen defaults."""
  base = _StatefulNorm if stateful else _Norm
  return {f.name: f.default for f in dataclasses.fields(base)
          if f.name not in ('parent', 'name')}


def module_fields(cls: type[nn.Module]) -> set[str]:
  """The constructor fields of a linen module class."""
  return {f.name for f in dataclasses.fields(cls)
          if f.name not in ('parent', 'name')}


def make_norm(kind: str, **kwargs: Any) -> Callable[..., nn.Module]:
  """A factory for the norm `kind` with `kwargs` bound, for model injection.

  >>> norm = make_norm('powernorm', num_groups=4, warmup_steps=8000)
  >>> y = norm(name='ln1')(x, use_running_average=not train, mask=mask)

  Unknown kinds and unknown options raise a ValueError that lists the valid
  ones, so a typo in a config fails at model construction. The kinds of
  `CONDITIONAL_MODULES` build modules called `norm(x, cond)`, which do not
  fit a plain norm slot.
  """
  if kind in MODULES:
    cls = MODULES[kind]
  elif kind in CONDITIONAL_MODULES:
    cls = CONDITIONAL_MODULES[kind]
  else:
    raise ValueError(f'make_norm: unknown norm kind {kind!r}; choose from '
                     f'{sorted(MODULES)} or the conditional '
                     f'{sorted(CONDITIONAL_MODULES)}.')
  fields = module_fields(cls)
  unknown = set(kwargs) - fields
  if unknown:
    raise ValueError(f'make_norm({kind!r}): unknown options {sorted(unknown)};'
                     f' {cls.__name__} accepts {sorted(fields)}.')
  return functools.partial(cls, **kwargs)

