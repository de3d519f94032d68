"""Every public name of normjax is documented, and every field of a Flax
module is named in its docstring (what `help()` and the docs site show)."""

import dataclasses
import inspect


import normjax
from normjax import folding, functional, linen, nnx, optim, probes

MODULES = {'normjax': normjax, 'functional': functional, 'linen': linen,
           'nnx': nnx, 'folding': folding, 'probes': probes, 'optim': optim}
FLAX_FIELDS = {'parent', 'name'}  # flax's own


def _public():
  for module_name, module in MODULES.items():
    for name in module.__all__:
      obj = getattr(module, name)
      if not inspect.ismodule(obj) and callable(obj):
        yield f'{module_name}.{name}', obj


def test_every_public_callable_has_a_docstring():
  undocumented = [name for name, obj in _public()
                  if not (obj.__doc__ or '').strip()]
  assert not undocumented, f'undocumented: {undocumented}'


def test_every_linen_module_names_its_fields():
  missing = {}
  for name, obj in _public():
    if inspect.isclass(obj) and dataclasses.is_dataclass(obj):
      fields = [f.name for f in dataclasses.fields(obj)
                if f.name not in FLAX_FIELDS]
      absent = [f for f in fields if f not in obj.__doc__]
      if absent:
        missing[name] = absent
  assert not missing, f'fields missing from the docstrings: {missing}'


def test_nnx_modules_name_their_arguments():
  for name in nnx.__all__:
    cls = getattr(nnx, name)
    if not inspect.isclass(cls) or not hasattr(cls, 'definition'):
      continue
    params = [p for p in inspect.signature(cls.__init__).parameters
              if p != 'self']
    absent = [p for p in params if p not in cls.__doc__]
    assert not absent, f'nnx.{name}: {absent}'
