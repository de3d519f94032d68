"""normjax's modules follow flax's conventions (issue 16, part 4).

1. No logical-axis annotation by default (plain arrays, as flax's
   LayerNorm); `param_axes=(...)` opts in.
2. flax's `feature_axes`, `use_fast_variance`, `force_float32_reductions`,
   `axis_index_groups` (and BatchNorm's `axis` on stateful norms) are
   accepted at the value normjax implements; any other value raises a
   ValueError naming the field.
3. `help()` on every module lists every field with its default.
4. flax.linen and flax.nnx LayerNorm, RMSNorm, BatchNorm and GroupNorm
   variables load into normjax's modules as they are and give the same
   outputs (float32, within 1e-6) as the flax modules with
   `use_fast_variance=False`, the variance normjax computes (flax's default
   one-pass variance differs by up to ~1e-5 on inputs of mean 3).
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import norm_cases as nc
from normjax import linen as nl
from normjax import nnx as nnorm
from normjax._src import definition as nd

KINDS = sorted(nd.REGISTRY)
F = 8
TOL = 1e-6

# field -> (values normjax accepts, a value it rejects).
FLAX_FIELDS = {
    'feature_axes': ((-1, (-1,)), 0),
    'use_fast_variance': ((False,), True),
    'force_float32_reductions': ((True,), False),
    'axis_index_groups': ((None,), [[0, 1]]),
}
STATEFUL_FIELDS = {'axis': ((-1,), 1)}


def _x(shape=(2, 5, F), seed=0):
  return 3.0 + 2.0 * jax.random.normal(jax.random.key(seed), shape)


def _fields(kind):
  stateful = nd.REGISTRY[kind].stateful
  return {**FLAX_FIELDS, **(STATEFUL_FIELDS if stateful else {})}


def _is_boxed(leaf):
  return isinstance(leaf, nn.LogicallyPartitioned)


@pytest.mark.parametrize('kind', KINDS)
def test_no_annotation_by_default_and_opt_in(kind):
  module = nl.make_norm(kind, **nc.module_options(kind))
  x = nc.x()
  plain = module().init(jax.random.key(0), x, use_running_average=False)
  assert not any(map(_is_boxed, jax.tree.leaves(plain, is_leaf=_is_boxed)))
  boxed = module(param_axes=('embed',)).init(
      jax.random.key(0), x, use_running_average=False)
  leaves = jax.tree.leaves(boxed, is_leaf=_is_boxed)
  assert all(map(_is_boxed, leaves))
  assert len(leaves) == len(jax.tree.leaves(plain))
  assert nn.unbox(boxed).keys() == plain.keys()


@pytest.mark.parametrize('kind', KINDS)
def test_flax_fields_accept_the_implemented_value(kind):
  options = nc.module_options(kind)
  x = nc.x()
  for field, (accepted, _) in _fields(kind).items():
    for value in accepted:
      module = nl.make_norm(kind, **options, **{field: value})()
      module.init(jax.random.key(0), x, use_running_average=False)
      nnorm.make_norm(kind, **options, **{field: value})(
          x.shape[-1], rngs=nnx.Rngs(0))


@pytest.mark.parametrize('kind', KINDS)
def test_flax_fields_reject_other_values_naming_the_field(kind):
  options = nc.module_options(kind)
  for field, (_, rejected) in _fields(kind).items():
    with pytest.raises(ValueError, match=f'{field}=.*not supported'):
      nl.make_norm(kind, **options, **{field: rejected})()
    with pytest.raises(ValueError, match=f'{field}=.*not supported'):
      nnorm.make_norm(kind, **options, **{field: rejected})(
          F, rngs=nnx.Rngs(0))


@pytest.mark.parametrize('kind', KINDS)
def test_help_lists_every_field(kind):
  linen_cls, nnx_cls = nl.MODULES[kind], nnorm.MODULES[kind]
  linen_fields = [f.name for f in dataclasses.fields(linen_cls)
                  if f.name not in ('parent', 'name')]
  for cls, fields in ((linen_cls, linen_fields), (nnx_cls, nnx_cls.fields)):
    doc = cls.__doc__
    assert 'Attributes:' in doc
    for name in fields:
      assert f'\n    {name} (default ' in doc, (cls, name)


# normjax kind -> (flax module, its options; those but reduction_axes are
# normjax's too). GroupNorm per token, as normjax's (reduction_axes=-1).
LINEN_PAIRS = {
    'layernorm': (nn.LayerNorm, {}),
    'rmsnorm': (nn.RMSNorm, {}),
    'groupnorm': (nn.GroupNorm, dict(num_groups=4, reduction_axes=-1)),
}
TWO_PASS = dict(use_fast_variance=False)


def _assert_close(ours, theirs):
  np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), atol=TOL,
                             rtol=TOL)


def _randomized(variables, seed=1):
  """The variables with random values (so scale/bias/statistics matter)."""
  leaves, tree = jax.tree.flatten(variables)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [
      jnp.abs(1.0 + 0.5 * jax.random.normal(k, v.shape))
      for k, v in zip(keys, leaves)])


@pytest.mark.parametrize('kind', sorted(LINEN_PAIRS))
def test_linen_variables_load(kind):
  cls, options = LINEN_PAIRS[kind]
  x = _x()
  theirs = cls(**options, **TWO_PASS)
  variables = _randomized(theirs.init(jax.random.key(0), x))
  ours_options = {k: v for k, v in options.items() if k != 'reduction_axes'}
  ours = nl.make_norm(kind, **ours_options)()
  _assert_close(ours.apply(variables, x), theirs.apply(variables, x))


def test_linen_batch_norm_variables_load():
  x = _x()
  theirs = nn.BatchNorm(**TWO_PASS)
  variables = _randomized(theirs.init(jax.random.key(0), x,
                                      use_running_average=False))
  ours = nl.BatchNorm()
  _assert_close(ours.apply(variables, x, use_running_average=True),
                theirs.apply(variables, x, use_running_average=True))
  y_ours, new_ours = ours.apply(variables, x, use_running_average=False,
                                mutable=['batch_stats'])
  y_theirs, new_theirs = theirs.apply(variables, x, use_running_average=False,
                                      mutable=['batch_stats'])
  _assert_close(y_ours, y_theirs)
  jax.tree.map(_assert_close, dict(new_ours), dict(new_theirs))


NNX_PAIRS = {
    'layernorm': (nnx.LayerNorm, {}),
    'rmsnorm': (nnx.RMSNorm, {}),
    'groupnorm': (nnx.GroupNorm, dict(num_groups=4, reduction_axes=-1)),
    'batchnorm': (nnx.BatchNorm, {}),
}


def _randomize_nnx(module, seed=1):
  nnx.update(module, _randomized(nnx.state(module), seed))


@pytest.mark.parametrize('kind', sorted(NNX_PAIRS))
def test_nnx_state_loads(kind):
  cls, options = NNX_PAIRS[kind]
  # nnx.GroupNorm spreads the group statistics along axis 1 (flax 0.12.8),
  # so per-token GroupNorm takes the tokens flattened: [B*T, C].
  x = _x((10, F)) if kind == 'groupnorm' else _x()
  theirs = cls(F, **options, **TWO_PASS, rngs=nnx.Rngs(0))
  _randomize_nnx(theirs)
  ours_options = {k: v for k, v in options.items() if k != 'reduction_axes'}
  ours = nnorm.make_norm(kind, **ours_options)(F, rngs=nnx.Rngs(0))
  nnx.update(ours, nnx.state(theirs))
  for model in (ours, theirs):
    model.eval()
  _assert_close(ours(x), theirs(x))
  if kind == 'batchnorm':  # a training step: outputs and statistics
    for model in (ours, theirs):
      model.train()
    _assert_close(ours(x), theirs(x))
    jax.tree.map(_assert_close, nnx.state(ours, nnx.BatchStat),
                 nnx.state(theirs, nnx.BatchStat))
