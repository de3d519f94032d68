"""The norm records: what derives from them, and a toy norm added by one.

1. Every linen module's fields are derived from its record: the shared
   fields, the options under their module names with the same defaults, the
   extra parameters' initialisers and, for stateful norms,
   `use_running_average`; nothing more.
2. The pure function's signature lists exactly the options and defaults;
   `init_state` accepts every option.
3. A toy norm written in the tests (norm_cases.TOYS), registered for one
   test, gets a function, `get_norm`, `init_state`, a linen module through
   `make_norm` that trains and evaluates, and an entry in `MODULES`. (The
   `kind` fixture runs every registry test on the toys as well.)
"""

import dataclasses
import inspect
import pathlib

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference

import norm_cases as nc
from normjax import functional as nf
from normjax import linen as nl
from normjax._src import definition as nd
from normjax._src import modules
from normjax._src import registry

SHARED_FIELDS = {'dtype', 'param_dtype', 'use_scale', 'use_bias',
                 'scale_init', 'bias_init', 'axis_name', 'param_axes',
                 'feature_axes', 'use_fast_variance',
                 'force_float32_reductions', 'axis_index_groups'}
FIXED_ARGUMENTS = ['x', 'params', 'state', 'mask', 'use_running_average',
                   'axis_name']


def test_shared_module_fields():
  assert nl.module_fields(modules._Norm) == SHARED_FIELDS  # pylint: disable=protected-access


def test_module_fields_are_derived_from_the_record(kind):
  definition = nd.REGISTRY[kind]
  cls = nl.MODULES[kind]
  defaults = {f.name: f.default for f in dataclasses.fields(cls)}
  options = {o.module_field: o.default for o in definition.options}
  inits = {p.init_field: p.init for p in definition.extra_params}
  stateful = ({'use_running_average', 'axis'} if definition.stateful
              else set())
  assert nl.module_fields(cls) == (SHARED_FIELDS | set(options) | set(inits)
                                   | stateful)
  for name, default in {**inits, **options}.items():
    assert defaults[name] == default, name
  assert (defaults['use_scale'], defaults['use_bias']) == (
      definition.use_scale, definition.use_bias)
  assert cls.__name__ == definition.module


def test_function_signature_lists_exactly_the_options(kind):
  definition = nd.REGISTRY[kind]
  fn = nf.get_norm(kind)
  assert fn is nf.FUNCTIONS[kind] is definition.function
  assert fn.__name__ == definition.name
  parameters = list(inspect.signature(fn).parameters.values())
  assert [p.name for p in parameters[:6]] == FIXED_ARGUMENTS
  assert {p.name: p.default for p in parameters[6:]} == definition.defaults
  assert all(p.kind == p.KEYWORD_ONLY for p in parameters[3:])


def test_init_state_accepts_every_option(kind):
  every = nd.REGISTRY[kind].resolve(nc.options(kind))
  chex.assert_trees_all_equal(nf.init_state(kind, nc.C, **every),
                              nc.state(kind))


def test_toys_are_registered_only_inside_their_tests():
  assert not set(nc.TOYS) & set(nd.REGISTRY)
  assert not set(nc.TOYS) & set(nl.MODULES)


def test_a_toy_norm_is_one_record(toy_norms):
  for kind, definition in toy_norms.items():
    assert nf.get_norm(kind) is nf.FUNCTIONS[kind] is definition.function
    assert nl.MODULES[kind].__name__ == definition.module
  x, p = nc.x(), nc.params('toy_center')
  y, state = nf.get_norm('toy_center')(x, p)
  assert state is None  # the state passes through a stateless norm
  assert nf.init_state('toy_center', nc.C) == nf.EmptyState()
  np.testing.assert_allclose(
      np.asarray(y).reshape(-1, nc.C),
      reference.toy_center(np.asarray(x).reshape(-1, nc.C), p['scale'],
                           p['bias']), atol=1e-6)
  chex.assert_trees_all_equal(nf.get_norm('toy_center')(x, center=False)[0],
                              x)


def test_a_stateful_toy_module_trains_and_evaluates(toy_norms):
  del toy_norms
  module = nl.make_norm('toy_running_mean', momentum=0.5)()
  x, mask = nc.x(), nc.mask()
  variables = nn.unbox(module.init(jax.random.key(0), x, False))
  chex.assert_trees_all_equal(
      variables, {'params': {'scale': jnp.ones(nc.C), 'bias': jnp.zeros(nc.C)},
                  'batch_stats': {'mean': jnp.zeros(nc.C)}})
  assert nf.init_state('toy_running_mean', nc.C).mean.shape == (nc.C,)
  y, updates = module.apply(variables, x, False, mask=mask,
                            mutable=['batch_stats'])
  x = np.asarray(x)
  real = x[np.asarray(mask)]
  chex.assert_trees_all_close(y, x - real.mean(0), atol=1e-6)
  mean = updates['batch_stats']['mean']
  chex.assert_trees_all_close(mean, 0.5 * real.mean(0), atol=1e-6)
  # Evaluation: the record's eval_affine, with the running mean.
  variables = {**variables, **updates}
  chex.assert_trees_all_close(module.apply(variables, x, True),
                              x - np.asarray(mean), atol=1e-6)


def test_a_stateful_record_without_batch_groups_is_refused():
  with pytest.raises(TypeError, match="needs the option Option\\('num_batch_"):
    nd.NormDefinition(
        kind='bad', name='bad', module='Bad', options=(), doc='',
        train=lambda *a: a, init_state=lambda *a: None)


def test_readme_lists_every_norm_with_its_derived_properties():
  """The README's properties table is the registry's, and its function
  table names every registered function."""
  readme = (pathlib.Path(__file__).resolve().parents[1] / 'README.md'
            ).read_text()
  assert registry.properties_table() in readme
  for kind, definition in nd.REGISTRY.items():
    assert f'`{definition.name}`' in readme, kind
  rows = {line.split('|')[1].strip(' `'): line
          for line in registry.properties_table().splitlines()[2:]}
  assert '| yes | yes | no | yes |' in rows['powernorm']      # stateful, folds
  assert '| no | no | yes | yes |' in rows['layernorm']
  assert '| no | no | yes | no |' in rows['dyt']              # not affine
