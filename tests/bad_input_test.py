"""Bad and extreme inputs for every slot norm, written once over the registry.

1. Invalid inputs raise TypeError/ValueError at trace time, eagerly and
   inside `jax.jit`, and the message names the offending argument.
2. A batch of padding only: finite output, state unchanged, zero
   backward-statistic updates.
3. Huge values: finite and close to the float64 NumPy reference.

(`kind`, `stateful_kind`: conftest; options: norm_cases.OPTIONS.)
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference

import norm_cases as nc
from normjax import functional as nf
from normjax import linen as nl

B, T, F = nc.SHAPE


def _raises(exc, match, fn, *args):
  """`fn(*args)` raises eagerly and under jit (arguments traced)."""
  for mode in (fn, jax.jit(fn)):
    with pytest.raises(exc, match=match):
      mode(*args)


def _run(kind, **kw):
  """x, params, state, mask -> y, with the test options updated by `kw`."""
  return lambda x, params, state, mask=None: nc.call(kind, x, params, state,
                                                     mask, **kw)[0]


def _args(kind, x=None, params=None, state=None):
  return (nc.x() if x is None else x,
          nc.params(kind) if params is None else params,
          nc.state(kind) if state is None else state)


# ---------------------------------------------------------------------------
# 1. Invalid inputs.


def test_integer_x(kind):
  _raises(TypeError, r'`x` must be a floating-point.*int32', _run(kind),
          *_args(kind, jnp.ones(nc.SHAPE, jnp.int32)))


def test_wrong_rank(kind):
  if nc.definition(kind).stateful:  # batch statistics need a batch axis
    x, pattern = nc.x(shape=(F,)), r'`x` must have rank >= 2.*\(8,\)'
  else:
    x, pattern = jnp.asarray(1.0), r'`x` must have rank >= 1.*\(\)'
  _raises(ValueError, pattern, _run(kind), *_args(kind, x))


@pytest.mark.parametrize('name', ['scale', 'bias'])
def test_params_wrong_features(kind, name):
  params = dict(nc.params(kind), **{name: jnp.ones((F + 1,))})
  _raises(ValueError, rf"`params\['{name}'\]` has shape \(9,\).*8 features",
          _run(kind), *_args(kind, params=params))


def test_params_unknown_key(kind):
  params = dict(nc.params(kind), gamma=jnp.ones((F,)))
  _raises(ValueError, r"`params` has unknown keys \['gamma'\]", _run(kind),
          *_args(kind, params=params))


def test_unknown_option_is_named(kind):
  with pytest.raises(TypeError, match=r"unknown options \['colour'\]"):
    nc.call(kind, nc.x(), colour=1)
  with pytest.raises(ValueError, match=r"unknown options \['colour'\]"):
    nl.make_norm(kind, colour=1)
  # The function's spelling of an option the module names differently.
  for option in nc.definition(kind).options:
    if option.field:
      with pytest.raises(ValueError,
                         match=rf"unknown options \['{option.name}'\]"):
        nl.make_norm(kind, **{option.name: option.default})


def test_init_state_names_an_unknown_option(kind):
  with pytest.raises(TypeError, match=r"unknown options \['colour'\]"):
    nf.init_state(kind, F, colour=1)


@pytest.mark.parametrize('mask_shape', [(B, T + 1), (B, T, F), (1, B, T)])
def test_mask_wrong_shape(kind, mask_shape):
  _raises(ValueError, r'`mask` has shape .* does not broadcast', _run(kind),
          *_args(kind), jnp.ones(mask_shape, bool))


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.int32])
def test_mask_not_boolean(kind, dtype):
  _raises(TypeError, r'`mask` must be boolean', _run(kind), *_args(kind),
          jnp.ones((B, T), dtype))


def test_mask_accepted_shapes(kind):
  """The valid forms: per token, with a trailing 1, and broadcast over B."""
  masks = [jnp.ones(shape, bool) for shape in ((B, T), (B, T, 1), (T,),
                                                 (1, T))]
  run = jax.jit(lambda args, masks: [_run(kind)(*args, m) for m in masks])
  want, *others = run(_args(kind), masks)
  for got in others:
    chex.assert_trees_all_close(got, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize('eval_mode', [False, True], ids=['train', 'eval'])
def test_state_wrong_features(stateful_kind, eval_mode):
  kind = stateful_kind
  _raises(ValueError, r'`state\.\w+` has shape \(.*9.*\)',
          _run(kind, use_running_average=eval_mode),
          *_args(kind, state=nc.state(kind, F + 1)))


def test_state_wrong_type(stateful_kind):
  kind = stateful_kind
  other = 'pn_v' if kind != 'pn_v' else 'batchnorm'
  for state in (nf.init_state(other, F), None):
    _raises(TypeError, r'`state` must be a \w+State', _run(kind),
            nc.x(), nc.params(kind), state)


def test_state_wrong_num_batch_groups(stateful_kind):
  kind = stateful_kind
  _raises(ValueError, r'`state\.\w+` has shape \(2,', _run(kind),
          *_args(kind, state=nc.state(kind, num_batch_groups=2)))


def test_num_batch_groups_not_dividing_batch(stateful_kind):
  kind = stateful_kind
  _raises(ValueError, r'`num_batch_groups`=3 must divide',
          _run(kind, num_batch_groups=3),
          *_args(kind, state=nc.state(kind, num_batch_groups=3)))


def test_unified_state_wrong_window():
  _raises(ValueError, r'`state\.fwd_window` has shape \(3, 8\)',
          _run('unified'),
          *_args('unified', state=nf.init_state('unified', F, window_size=3)))


@pytest.mark.parametrize('num_groups', [3, 0])
@pytest.mark.parametrize('kind', ['group_scaling', 'pn_v', 'powernorm',
                                  'groupnorm'])
def test_num_groups_invalid(kind, num_groups):
  """EvoNorm-S0 decrements `num_groups` instead, as the official code does."""
  _raises(ValueError, rf'`num_groups`.*{num_groups}',
          _run(kind, num_groups=num_groups), *_args(kind))


@pytest.mark.parametrize('kind, option', [
    ('powernorm', 'backward_denominator'),
    ('powernorm', 'grad_mean_over'),
    ('unified', 'mean_over'),
])
def test_bad_option_string(kind, option):
  _raises(ValueError, rf"`{option}` must be one of .*'foo'",
          _run(kind, **{option: 'foo'}), *_args(kind))


@pytest.mark.parametrize('window_size', [0, -1, (2, 0), (2, 2, 2), (2, 2.0),
                                         2.0])
def test_bad_window_size(window_size):
  _raises(ValueError, r'`window_size` must be a positive int',
          _run('unified', window_size=window_size), *_args('unified'))


def test_bad_window_size_in_init_state():
  with pytest.raises(ValueError, match=r'`window_size`'):
    nf.init_unified_norm_state(F, 0)


def test_get_norm_unknown_kind():
  with pytest.raises(ValueError, match=r"unknown norm kind 'foo'"):
    nf.get_norm('foo')


# ---------------------------------------------------------------------------
# 2. A batch with no real token.


def test_all_padding_batch(kind):
  stateful = nc.definition(kind).stateful
  state = nc.trained_state(kind) if stateful else nc.state(kind)
  x, dy, pads = nc.x(seed=5), nc.cotangent(6), jnp.zeros((B, T), bool)
  (dx, dparams, dback), (y, new_state) = nc.train_grads(
      kind, x, nc.params(kind), state, pads, dy)
  chex.assert_tree_all_finite((y, dx, dparams, dback))
  chex.assert_trees_all_equal(new_state, state)  # nothing moved, step included
  for name, update in dback.items():  # PN: ema_gz; UN: ema_gz, bwd_window
    chex.assert_trees_all_equal(update, jnp.zeros_like(update),
                                custom_message=name)
  # Such a batch is normalised with the running statistics (the docstrings);
  # a stateless norm does not look at the mask.
  y_ref, _ = nc.call(kind, x, state=state, use_running_average=stateful,
                     jit=True)
  chex.assert_trees_all_close(y, y_ref, atol=1e-6, rtol=1e-6)


def test_unified_padded_mode_ignores_mask():
  """'padded' (official) UN ignores the mask: an all-pad batch still counts."""
  run = lambda mask: nc.call('unified', nc.x(), mask=mask, mean_over='padded',
                             jit=True)
  y_pad, s_pad = run(jnp.zeros((B, T), bool))
  chex.assert_trees_all_equal((y_pad, s_pad), run(None))
  assert int(s_pad.step) == 1


# ---------------------------------------------------------------------------
# 3. Huge values vs a float64 NumPy reference.


def test_one_huge_token(kind):
  x = nc.x().at[0, 1].multiply(1e4)  # a real token with values ~1e4
  nc.check_reference(kind, x, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('kind', ['layernorm', 'rmsnorm'])
def test_large_mean_small_noise(kind):
  """x = 1e4 + 0.1 N(0,1): flax's one-pass variance fails here (std ~7.6)."""
  features = 64
  x = jnp.asarray(1e4 + 0.1 * nc.normal(0, (B, T, features)))
  y, _ = jax.jit(nf.FUNCTIONS[kind])(x)
  fn = reference.layer_norm if kind == 'layernorm' else reference.rms_norm
  y_ref = fn(np.asarray(x, np.float64).reshape(-1, features))
  chex.assert_tree_all_finite(y)
  # A float32 sum of 64 values ~1e4 is rounded to ~1e-2, so the mean is off
  # by ~1e-3, i.e. ~1e-2 of the 0.1 noise scale: every output of a token
  # shifts by up to ~0.015 (measured 0.012). The one-pass variance is off by
  # O(1) here.
  np.testing.assert_allclose(np.asarray(y).reshape(-1, features), y_ref,
                             atol=3e-2, rtol=0)
  if kind == 'layernorm':
    np.testing.assert_allclose(np.std(np.asarray(y), axis=-1), 1.0, atol=1e-2)
