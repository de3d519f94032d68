"""Flax NNX modules, derived from the norm definitions: no math here.

Every norm of the registry (`normjax._src.definition.REGISTRY`) gets an
`nnx.Module` class (`nnx_module_for(definition)`), in flax.nnx's
conventions: `Cls(num_features, *, rngs, <options under their flax field
names>, the fields of the linen modules with the same defaults (dtype,
param_dtype, use_scale, use_bias, scale_init, bias_init, axis_name, flax's
feature_axes/use_fast_variance/force_float32_reductions/axis_index_groups,
param_axes; `help()` lists them)` and, for stateful norms, `axis` and
`use_running_average`
(toggled by `model.train()`/`model.eval()`, `nnx.view`). Parameters are
`nnx.Param` attributes (`scale`, `bias`, the norm's extra parameters);
forward running statistics are `nnx.BatchStat`; the statistics that the
backward pass updates (PowerNorm's `ema_gz`, UN's `ema_gz`/`bwd_window`) are
`BackwardStat`, updated through their cotangents (see
`normjax._src.nnx_training.value_and_grad`).

Every module is called `module(x, use_running_average=None, *, mask=None)`,
as the linen modules and `nnx.BatchNorm`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from normjax._src import definition as nd
from normjax._src import modules as linen_modules
# Importing the registry registers the built-in norms.
from normjax._src import registry  # noqa: F401  # pylint: disable=unused-import

Array = jax.Array


class BackwardStat(nnx.Variable):
  """A statistic that the backward pass updates (PowerNorm's `ema_gz`).

  Its update comes back as its cotangent: differentiate with respect to it
  next to `nnx.Param` and add the cotangent to it, never through the
  optimizer (`normjax.nnx.value_and_grad` does both). It is the nnx type
  of linen's `grad_stats` collection, so `nnx.bridge` maps one to the other.
  """


nnx.register_variable_name(linen_modules.GRAD_STATS, BackwardStat,
                           overwrite=True)


def _shared_fields(definition: nd.NormDefinition) -> dict[str, Any]:
  """The constructor keywords of `definition`'s module and their defaults:
  the options (flax names), the extra params' initialisers, then the
  fields every normjax module shares."""
  fields = linen_modules.norm_fields(definition)
  fields.update({k: v for k, v in linen_modules.shared_defaults(
      definition.stateful).items() if k not in ('use_scale', 'use_bias')})
  if definition.stateful:
    fields['use_running_average'] = False
  return fields


def _metadata(axes: tuple[Any, ...] | None) -> dict[str, Any]:
  """nnx's sharding metadata for a variable; none without `param_axes`."""
  return {} if axes is None else {'out_sharding': tuple(axes)}


class _Norm(nnx.Module):
  """Construction shared by every normjax nnx norm: fields and params."""

  definition: ClassVar[nd.NormDefinition]
  fields: ClassVar[dict[str, Any]]

  def __init__(self, num_features: int, *, rngs: nnx.Rngs, **kwargs: Any):
    unknown = sorted(set(kwargs) - set(self.fields))
    if unknown:
      raise TypeError(f'{type(self).__name__}: unknown arguments {unknown}; '
                      f'it accepts {sorted(self.fields)}.')
    options = {o.module_field for o in self.definition.options}
    linen_modules.check_flax_fields(
        {k: v for k, v in kwargs.items() if k not in options},
        type(self).__name__)
    for name, value in {**self.fields, **kwargs}.items():
      setattr(self, name, value)
    self.num_features = num_features
    self.definition.check_options(self._options(), type(self).__name__,
                                  fields=True)
    self.definition.resolve(self._options(), type(self).__name__)
    self._param_names = self._make_params(num_features, rngs)

  def _options(self) -> dict[str, Any]:
    return linen_modules.options_of(self.definition, self)

  def _make_params(self, features: int, rngs: nnx.Rngs) -> tuple[str, ...]:
    """Creates `scale`/`bias` and the extra params as the fields say."""
    made = []
    for spec in self.definition.extra_params:
      if not spec.enabled_by or getattr(self, spec.enabled_by):
        setattr(self, spec.name, self._extra_param(spec, features, rngs))
        made.append(spec.name)
    scale_init = nd.scale_initializer(
        self.scale_init, self._options()[nd.ZERO_CENTERED_SCALE.name])
    for name, use, init in (('scale', self.use_scale, scale_init),
                            ('bias', self.use_bias, self.bias_init)):
      if use:
        setattr(self, name, nnx.Param(
            init(rngs.params(), (features,), self.param_dtype),
            **_metadata(self.param_axes)))
        made.append(name)
      else:
        setattr(self, name, nnx.data(None))
    return tuple(made)

  def _extra_param(self, spec: nd.ParamSpec, features: int,
                   rngs: nnx.Rngs) -> nnx.Param:
    init = spec.initializer(getattr(self, spec.init_field), features)
    shape, axes = spec.layout(features, self.param_axes, self._options())
    return nnx.Param(init(rngs.params(), shape, self.param_dtype),
                     **_metadata(None if self.param_axes is None else axes))

  def _params(self) -> dict[str, Array]:
    return {name: getattr(self, name)[...] for name in self._param_names}

  def _out(self, y: Array) -> Array:
    return y if self.dtype is None else y.astype(self.dtype)


class _StatelessNorm(_Norm):
  """Calls the norm's function on x with the module's params and options."""

  def __call__(self, x: Array, use_running_average: bool | None = None, *,
               mask: Array | None = None) -> Array:
    del use_running_average
    y, _ = self.definition.apply(
        x, self._params(), None, mask=mask, use_running_average=False,
        axis_name=self.axis_name, **self._options())
    return self._out(y)


class _StatefulNorm(_Norm):
  """Holds the state as BatchStat/BackwardStat variables; writes the forward
  statistics back after a training call."""

  def __init__(self, num_features: int, *, rngs: nnx.Rngs, **kwargs: Any):
    super().__init__(num_features, rngs=rngs, **kwargs)
    fresh = self.definition.new_state(num_features, jnp.float32,
                                      **self._options())
    self._state_type = type(fresh)
    backward = self.definition.backward_stats
    for name in fresh._fields:
      value = getattr(fresh, name)
      axes = (None if self.param_axes is None else
              linen_modules.state_leaf_axes(value.ndim, self.param_axes))
      if hasattr(self, name) or hasattr(nnx.Module, name):
        raise TypeError(f'normjax.nnx: the state leaf {name!r} of '
                        f'{type(self).__name__} shadows an attribute.')
      kind = BackwardStat if name in backward else nnx.BatchStat
      setattr(self, name, kind(value, **_metadata(axes)))

  def __call__(self, x: Array, use_running_average: bool | None = None, *,
               mask: Array | None = None) -> Array:
    use_running_average = _first_given(
        use_running_average, self.use_running_average, type(self).__name__)
    state = self._state_type(**{name: getattr(self, name)[...]
                                for name in self._state_type._fields})
    y, new_state = self.definition.apply(
        x, self._params(), state, mask=mask,
        use_running_average=use_running_average, axis_name=self.axis_name,
        **self._options())
    if not use_running_average:
      for name in self._state_type._fields:
        if name not in self.definition.backward_stats:
          getattr(self, name)[...] = getattr(new_state, name)
    return self._out(y)

  def set_view(self, use_running_average: bool | None = None) -> None:
    """Used by `nnx.view(model, use_running_average=...)`."""
    if use_running_average is not None:
      self.use_running_average = use_running_average


def _first_given(call: bool | None, field: bool | None, cls: str) -> bool:
  """The call's `use_running_average`, else the module's (flax's rule)."""
  if call is not None:
    return call
  if field is not None:
    return field
  raise ValueError(
      f'{cls}: no `use_running_average` was given; pass it to the '
      'constructor or the call, or use model.train()/model.eval().')


_CLASSES: dict[str, tuple[nd.NormDefinition, type[nnx.Module]]] = {}


def nnx_module_for(definition: nd.NormDefinition) -> type[nnx.Module]:
  """The nnx module class of `definition` (made once per definition)."""
  cached = _CLASSES.get(definition.kind)
  if cached and cached[0] is definition:
    return cached[1]
  fields = _shared_fields(definition)
  _check_names(definition, fields)
  base = _StatefulNorm if definition.stateful else _StatelessNorm
  namespace = {
      'definition': definition, 'fields': fields,
      '__init__': _constructor(base, fields), '__module__': 'normjax.nnx',
      '__qualname__': definition.module,
      '__doc__': (f'{definition.doc.splitlines()[0]}\n\n  Flax NNX module '
                  f'of `normjax.functional.{definition.name}` (see its '
                  'docstring for the formula).\n\n  '
                  f'`{definition.module}(num_features, *, rngs, '
                  '**attributes)`: num_features is the width of the last '
                  'axis, rngs the nnx.Rngs of the params.'
                  + linen_modules.attributes_doc(definition, fields)),
  }
  cls = type(definition.module, (base,), namespace)
  _CLASSES[definition.kind] = (definition, cls)
  return cls


def _check_names(definition: nd.NormDefinition, fields: dict[str, Any]
                 ) -> None:
  """Fields and params become attributes (state leaves too, checked in
  `_StatefulNorm`): no name twice, and none that shadows an nnx.Module
  attribute (`train`, `eval`, ...)."""
  names = [*fields, 'scale', 'bias',
           *(s.name for s in definition.extra_params)]
  clash = sorted({n for n in names if names.count(n) > 1} |
                 {n for n in names if hasattr(nnx.Module, n)})
  if clash:
    raise TypeError(f'normjax.nnx: norm {definition.kind!r} uses the names '
                    f'{clash} twice or over nnx.Module attributes.')


def _constructor(base: type[_Norm], fields: dict[str, Any]) -> Callable:
  """`base.__init__` with the class's keywords in its signature (help())."""
  @functools.wraps(base.__init__)
  def __init__(self, num_features, *, rngs, **kwargs):
    base.__init__(self, num_features, rngs=rngs, **kwargs)

  p = inspect.Parameter
  __init__.__signature__ = inspect.Signature(
      [p('self', p.POSITIONAL_OR_KEYWORD),
       p('num_features', p.POSITIONAL_OR_KEYWORD),
       p('rngs', p.KEYWORD_ONLY)] +
      [p(k, p.KEYWORD_ONLY, default=v) for k, v in fields.items()])
  del __init__.__wrapped__
  return __init__


class Identity(nnx.Module):
  """No normalisation, with the common call signature (`kind='none'`)."""

  def __init__(self, num_features: int | None = None, *,
               rngs: nnx.Rngs | None = None):
    del num_features, rngs

  def __call__(self, x: Array, use_running_average: bool | None = None, *,
               mask: Array | None = None) -> Array:
    del use_running_average, mask
    return x


class _Modules(linen_modules._Modules):  # pylint: disable=protected-access
  """The nnx norm modules by kind, live over the registry, and 'none'."""

  def __getitem__(self, kind: str) -> type[nnx.Module]:
    if kind == 'none':
      return Identity
    return nnx_module_for(nd.REGISTRY[kind])


MODULES = _Modules()


def make_norm(kind: str, **kwargs: Any) -> Callable[..., nnx.Module]:
  """A factory for the nnx norm `kind` with `kwargs` bound.

  >>> norm = make_norm('powernorm', num_groups=4, warmup_steps=8000)
  >>> layer = norm(512, rngs=nnx.Rngs(0))

  Unknown kinds and options raise a ValueError listing the valid ones.
  """
  if kind not in MODULES:
    raise ValueError(f'make_norm: unknown norm kind {kind!r}; choose from '
                     f'{sorted(MODULES)}.')
  cls = MODULES[kind]
  fields = getattr(cls, 'fields', {})
  unknown = set(kwargs) - set(fields)
  if unknown:
    raise ValueError(f'make_norm({kind!r}): unknown options {sorted(unknown)};'
                     f' {cls.__name__} accepts {sorted(fields)}.')
  return functools.partial(cls, **kwargs)
