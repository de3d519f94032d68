"""Option rules, and non-finite inputs that never poison running statistics.

1. Every option with a rule (`Option.check`) rejects invalid values with a
   ValueError naming the norm, the option, the value and the range, in the
   function, the linen module and the nnx module; every registered default
   passes its own rule.
2. A training batch whose real tokens hold NaN or Inf leaves every forward
   running statistic and the step counter bit-identical, and the backward
   statistics' updates zero (as a batch without real tokens), eagerly, under
   jit, with the fused CPU kernels and under vmap with `axis_name`; a NaN
   in a pad changes nothing; a NaN cotangent moves no backward statistic.
"""

import math
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import normjax
import norm_cases as nc
from normjax import linen as nl
from normjax import nnx as nnorm
from normjax._src import cpu_kernel, power_kernel

B, T, C = nc.SHAPE

# (kind, option, an invalid value).
INVALID = [
    ('powernorm', 'eps', -1.0), ('powernorm', 'eps', math.nan),
    ('powernorm', 'warmup_steps', -5), ('powernorm', 'warmup_steps', 2.0),
    ('powernorm', 'warmup_steps', True), ('powernorm', 'alpha_fwd', 2),
    ('powernorm', 'alpha_fwd', -0.1), ('powernorm', 'alpha_bkw', 1.5),
    ('powernorm', 'num_groups', 0), ('powernorm', 'num_groups', '2'),
    ('powernorm', 'group_scaling_eps', -1e-5),
    ('powernorm', 'use_group_scaling', 'yes'),
    ('powernorm', 'backward', 'exact'),
    ('powernorm', 'num_batch_groups', 0),
    ('powernorm', 'freeze_backward_stats', 1),
    ('pn_v', 'momentum', 1.01), ('pn_v', 'eps', -1.0),
    ('batchnorm', 'momentum', -0.5), ('batchnorm', 'eps', math.inf),
    ('batchnorm', 'num_batch_groups', True),
    ('unified', 'window_size', 0), ('unified', 'window_size', (2, True)),
    ('unified', 'warmup_steps', -1), ('unified', 'momentum', 2.0),
    ('unified', 'eps', -1.0), ('unified', 'compensation_delay', -3),
    ('unified', 'compensation_clamp', 0.5),
    ('unified', 'outlier_filtration', None),
    ('layernorm', 'eps', -1e-6), ('rmsnorm', 'eps', -1e-6),
    ('crmsnorm', 'eps', -1.0), ('group_scaling', 'num_groups', -1),
    ('groupnorm', 'num_groups', 2.5), ('evonorm_s0', 'nonlinearity', 'no'),
    ('evonorm_s0', 'num_groups', 0), ('layernorm_scaling', 'base', 'ln'),
    ('dyt', 'alpha', 'attn'), ('dyt', 'alpha', math.inf),
]
_ID = [f'{k}-{o}-{v!r}' for k, o, v in INVALID]


def _message(fn, name, value):
  return (rf"^{fn}: `{name}` must be (a|an|one) .*, got "
          rf'{re.escape(repr(value))}\.')


def _field(kind, option):
  return {o.name: o.module_field for o in nc.definition(kind).options}[option]


@pytest.mark.parametrize('kind, option, value', INVALID, ids=_ID)
def test_invalid_option_functional(kind, option, value):
  fn = nc.definition(kind).name
  for jit in (False, True):
    with pytest.raises(ValueError, match=_message(fn, option, value)):
      nc.call(kind, nc.x(), state=nc.state(kind), jit=jit,
              **{option: value})


@pytest.mark.parametrize('kind, option, value', INVALID, ids=_ID)
def test_invalid_option_linen(kind, option, value):
  cls = nc.definition(kind).module
  field = _field(kind, option)
  with pytest.raises(ValueError, match=_message(cls, field, value)):
    nl.make_norm(kind, **nc.module_options(kind, **{option: value}))()


@pytest.mark.parametrize('kind, option, value', INVALID, ids=_ID)
def test_invalid_option_nnx(kind, option, value):
  cls = nc.definition(kind).module
  field = _field(kind, option)
  with pytest.raises(ValueError, match=_message(cls, field, value)):
    nnorm.make_norm(kind, **nc.module_options(kind, **{option: value}))(
        C, rngs=nnx.Rngs(0))


@pytest.mark.parametrize('kind', nc.KINDS)
def test_registry_defaults_pass_their_rules(kind):
  definition = nc.definition(kind)
  for option in definition.options:
    if option.check is not None:
      assert option.check.accepts(option.default), option.name
  definition.check_options(definition.defaults)
  definition.check_options(definition.resolve(nc.options(kind)))


# Options every norm that has them must check.
_MUST_CHECK = {'eps', 'group_scaling_eps', 'momentum', 'alpha_fwd',
               'alpha_bkw', 'warmup_steps', 'num_groups', 'num_batch_groups',
               'window_size', 'compensation_delay', 'compensation_clamp'}


@pytest.mark.parametrize('kind', nc.KINDS)
def test_numeric_options_have_rules(kind):
  missing = [o.name for o in nc.definition(kind).options
             if o.name in _MUST_CHECK and o.check is None]
  assert not missing, f'{kind}: options without a rule: {missing}'


@pytest.mark.parametrize('kind, option, value', [
    ('powernorm', 'eps', 0.0), ('powernorm', 'alpha_fwd', 0),
    ('powernorm', 'alpha_fwd', 1.0), ('powernorm', 'alpha_bkw', 1),
    ('powernorm', 'warmup_steps', 0), ('powernorm', 'num_groups',
                                       np.int64(2)),
    ('batchnorm', 'momentum', 0.0), ('batchnorm', 'momentum', 1.0),
    ('batchnorm', 'momentum', np.float32(0.5)),
    ('unified', 'compensation_clamp', math.inf),
    ('unified', 'compensation_clamp', 1), ('unified', 'window_size', (1, 3)),
    ('unified', 'compensation_delay', 0), ('dyt', 'alpha', -0.5),
    ('dyt', 'alpha', 'ffn'), ('groupnorm', 'eps', 0.0),
])
def test_boundary_values_accepted(kind, option, value):
  rule = next(o.check for o in nc.definition(kind).options
              if o.name == option)
  assert rule.accepts(value)
  y, _ = nc.call(kind, nc.x(), state=nc.state(kind, **{option: value}),
                 **{option: value})
  assert y.shape == nc.SHAPE


# ---------------------------------------------------------------------------
# 2. Non-finite inputs.


# The norms with a fused CPU kernel (power_kernel, batch_kernel).
KERNEL_KINDS = ('powernorm', 'unified', 'batchnorm', 'paper_batchnorm', 'pn_v')


@pytest.fixture(params=['xla', 'kernel'])
def path(request, monkeypatch):
  """The jnp path, or the fused CPU kernels (`KERNEL_KINDS`) on tiny x."""
  if request.param == 'kernel':
    if request.node.callspec.params.get('kind') not in KERNEL_KINDS:
      pytest.skip('no fused CPU kernel for this norm')
    if request.node.callspec.params.get('float_dtype') == 'float64':
      pytest.skip('the kernels are float32 only: float64 is the jnp path')
    if not cpu_kernel.available():
      pytest.skip('no fused CPU kernel on this machine')
    monkeypatch.setattr(power_kernel, 'MIN_ELEMENTS',
                        dict.fromkeys(power_kernel.MIN_ELEMENTS, 0))
    yield request.param
  else:
    with cpu_kernel.use_cpu_kernel(False):
      yield request.param


def _state(kind, dtype):
  """A trained state (past warmup) in `dtype`."""
  return jax.tree.map(
      lambda v: v.astype(dtype) if jnp.issubdtype(v.dtype, jnp.floating)
      else v, nc.trained_state(kind))


def _bad_x(dtype, value, where=(0, 0, 3)):
  return nc.x(seed=5, dtype=dtype).at[where].set(value)


def _assert_unchanged(new, state, dback):
  chex.assert_trees_all_equal(new, state)  # bit-identical, step included
  for name, update in dback.items():
    chex.assert_trees_all_equal(update, jnp.zeros_like(update),
                                custom_message=name)


@pytest.mark.parametrize('value, jit', [(math.nan, False), (math.nan, True),
                                        (math.inf, True), (-math.inf, False)])
@pytest.mark.parametrize('kind', nc.STATEFUL)
def test_nonfinite_real_token_leaves_state(kind, jit, value, float_dtype,
                                           path):
  del path
  state = _state(kind, float_dtype)
  (_, _, dback), (_, new) = nc.train_grads(
      kind, _bad_x(float_dtype, value), nc.params(kind, dtype=float_dtype),
      state, nc.mask(), nc.cotangent(6, dtype=float_dtype), jit=jit)
  _assert_unchanged(new, state, dback)


@pytest.mark.parametrize('kind', nc.STATEFUL)
def test_nonfinite_without_mask_leaves_state(kind, float_dtype, path):
  del path
  state = _state(kind, float_dtype)
  (_, _, dback), (_, new) = nc.train_grads(
      kind, _bad_x(float_dtype, math.nan, (1, 2, 0)),
      nc.params(kind, dtype=float_dtype), state, None,
      nc.cotangent(6, dtype=float_dtype))
  _assert_unchanged(new, state, dback)


@pytest.mark.parametrize('kind', nc.STATEFUL)
def test_nan_in_pad_changes_nothing(kind, float_dtype, path):
  """With pads out of every statistic (PowerNorm 'valid'), a NaN pad gives
  the state, the real tokens' y and the backward updates of finite pads."""
  del path
  over = {'grad_mean_over': 'valid'} if kind == 'powernorm' else {}
  state = _state(kind, float_dtype)
  pad = (0, 2, 1)  # nc.mask() is False there
  assert not nc.mask()[pad[:2]]
  runs = [nc.train_grads(kind, x, nc.params(kind, dtype=float_dtype), state,
                         nc.mask(), nc.cotangent(6, dtype=float_dtype),
                         **over)
          for x in (nc.x(seed=5, dtype=float_dtype),
                    _bad_x(float_dtype, math.nan, pad))]
  (_, _, dback_a), (y_a, new_a) = runs[0]
  (_, _, dback_b), (y_b, new_b) = runs[1]
  real = np.asarray(nc.mask())
  chex.assert_trees_all_equal(new_b, new_a)
  chex.assert_trees_all_equal(dback_b, dback_a)
  chex.assert_trees_all_equal(y_b[real], y_a[real])


@pytest.mark.parametrize('kind', ['powernorm', 'unified'])
def test_nonfinite_cotangent_leaves_backward_stats(kind, float_dtype, path):
  del path
  state = _state(kind, float_dtype)
  x, p = nc.x(seed=5, dtype=float_dtype), nc.params(kind, dtype=float_dtype)
  dy = nc.cotangent(6, dtype=float_dtype)
  (_, _, dback), (_, new) = nc.train_grads(kind, x, p, state, nc.mask(),
                                           dy.at[1, 1, 2].set(jnp.nan))
  (_, _, good), (_, want) = nc.train_grads(kind, x, p, state, nc.mask(), dy)
  chex.assert_trees_all_equal(new, want)  # the forward step still counts
  for name, update in dback.items():
    chex.assert_trees_all_equal(update, jnp.zeros_like(update),
                                custom_message=name)
    assert bool(jnp.any(good[name] != 0)), name


def _train_step(kind, state, x, dy):
  (_, _, dback), (_, new) = nc.train_grads(
      kind, x, nc.params(kind, dtype=x.dtype), state, nc.mask(), dy)
  return new._replace(**normjax.apply_backward_stats(
      nc.backward_stats(kind, state), dback))


@pytest.mark.parametrize('kind', nc.STATEFUL)
def test_finite_batch_after_nan_batch(kind, float_dtype, path):
  """A NaN batch in between changes nothing that follows."""
  del path
  state = _state(kind, float_dtype)
  x, dy = nc.x(seed=8, dtype=float_dtype), nc.cotangent(9, dtype=float_dtype)
  after_nan = _train_step(kind, state, _bad_x(float_dtype, math.nan), dy)
  chex.assert_trees_all_equal(after_nan, state)
  chex.assert_trees_all_equal(_train_step(kind, after_nan, x, dy),
                              _train_step(kind, state, x, dy))


@pytest.mark.parametrize('kind', nc.STATEFUL)
def test_vmap_axis_name_agrees(kind, float_dtype):
  """A NaN on one member of the axis keeps the state on every member."""
  state = _state(kind, float_dtype)
  fn, opts = nc.definition(kind).function, nc.options(kind)
  p = nc.params(kind, dtype=float_dtype)
  back = nc.backward_stats(kind, state)
  dy = jnp.stack([nc.cotangent(6, dtype=float_dtype)] * 2)
  mask = jnp.stack([nc.mask()] * 2)

  def member(x, dy, mask):
    def loss(backward):
      y, new = fn(x, p, state._replace(**backward), mask=mask,
                  axis_name='members', **opts)
      return jnp.sum(y * dy), new
    return jax.grad(loss, has_aux=True)(back)

  run = jax.jit(jax.vmap(member, axis_name='members'))
  finite = jnp.stack([nc.x(seed=5, dtype=float_dtype)] * 2)
  dback, new = run(finite.at[1].set(_bad_x(float_dtype, math.nan)), dy, mask)
  for i in range(2):
    _assert_unchanged(jax.tree.map(lambda v, i=i: v[i], new), state,
                      jax.tree.map(lambda v, i=i: v[i], dback))
  _, moved = run(finite, dy, mask)
  assert not all(bool(jnp.array_equal(a[0], b)) for a, b in
                 zip(jax.tree.leaves(moved), jax.tree.leaves(state)))


@pytest.mark.parametrize('kind', nc.STATEFUL)
def test_batch_groups_keep_only_the_bad_group(kind):
  """With two batch groups a NaN in group 0 keeps only group 0's state."""
  state = nc.state(kind, num_batch_groups=2)
  x = nc.x(seed=5)
  _, (_, clean) = nc.train_grads(kind, x, nc.params(kind), state, nc.mask(),
                                 nc.cotangent(6), num_batch_groups=2)
  _, (_, new) = nc.train_grads(kind, x.at[0, 0, 0].set(jnp.nan),
                               nc.params(kind), state, nc.mask(),
                               nc.cotangent(6), num_batch_groups=2)
  chex.assert_trees_all_equal(jax.tree.map(lambda v: v[0], new),
                              jax.tree.map(lambda v: v[0], state))
  chex.assert_trees_all_equal(jax.tree.map(lambda v: v[1], new),
                              jax.tree.map(lambda v: v[1], clean))


def test_nonfinite_probe_counts_real_entries_only():
  x = nc.x().at[0, 0, 0].set(jnp.nan).at[0, 1, 2].set(jnp.inf)
  x = x.at[0, 2, 5].set(jnp.nan)  # a pad
  got = normjax.probes.nonfinite_probes(x, nc.mask())
  np.testing.assert_allclose(got['nonfinite_frac'], 2 / (5 * C))
  assert float(normjax.probes.nonfinite_probes(nc.x())['nonfinite_frac']) == 0
