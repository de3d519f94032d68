"""The contract of every slot norm, written once over the registry.

Each test takes `kind` (or `stateful_kind`/`stateless_kind`) from conftest:
every registered norm, and the toy norms of norm_cases (registered for the
test), run with `norm_cases.OPTIONS`. A new norm is covered by its record,
its NumPy reference (reference.REFERENCES) and, if its defaults do not fit
8 features and a few steps, a line in `norm_cases.OPTIONS`.

1. Shape, dtype, finite; bfloat16 in -> bfloat16 out from float32 statistics.
2. One training step against the NumPy reference, float32 and float64;
   stateless norms' gradients against finite differences.
3. jit == eager == remat, vmap over independent models: values and
   gradients.
4. Pads change no real output and no state; stateless norms are per token.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import reference
from jax.test_util import check_grads

import norm_cases as nc
from normjax import functional as nf
from normjax._src import definition as nd


def test_every_registered_kind_has_a_reference_and_valid_options():
  missing = sorted(set(nd.REGISTRY) - set(reference.REFERENCES))
  assert not missing, (
      f'no NumPy reference for {missing}: add one per kind to REFERENCES in '
      'tests/reference.py')
  assert set(nc.OPTIONS) <= set(nd.REGISTRY)
  for kind in nd.REGISTRY:
    nc.definition(kind).resolve(nc.options(kind))  # unknown options raise


def _state(kind):
  """A mid-training state (past warmup) for stateful norms."""
  return nc.trained_state(kind) if nc.definition(kind).stateful else (
      nc.state(kind))


def test_shape_dtype_and_finite(kind):
  x, mask, state = nc.x(), nc.mask(), nc.state(kind)
  y, new = nc.call(kind, x, state=state, mask=mask, jit=True)
  chex.assert_shape(y, x.shape)
  chex.assert_type(y, x.dtype)
  chex.assert_tree_all_finite((y, new))
  chex.assert_trees_all_equal_shapes_and_dtypes(new, state)
  y_eval, same = nc.call(kind, x, state=new, mask=mask,
                         use_running_average=True)
  chex.assert_type(y_eval, x.dtype)
  chex.assert_tree_all_finite(y_eval)
  assert same is new  # evaluation hands the state back untouched


def test_bfloat16_in_bfloat16_out_from_float32_statistics(kind):
  state = _state(kind)
  x16 = nc.x(seed=5).astype(jnp.bfloat16)
  dy = nc.cotangent(6)
  p = nc.params(kind)

  @jax.jit  # one compile for both dtypes and both modes
  def run(x16):
    return [[nc.train_grads(kind, x, p, state, nc.mask(), dy, jit=False,
                            use_running_average=eval_mode)
             for x in (x16, x16.astype(jnp.float32))]  # the same values
            for eval_mode in (False, True)]

  for (g16, (y16, s16)), (g32, (y32, s32)) in run(x16):
    assert y16.dtype == g16[0].dtype == jnp.bfloat16  # y and dx
    # The state keeps its dtypes (float32, int32 counters).
    chex.assert_trees_all_equal_dtypes(s16, state)
    chex.assert_trees_all_equal_dtypes(g16[1:], g32[1:])
    # Computed in float32 from the same values and rounded once.
    chex.assert_trees_all_equal(y16, y32.astype(jnp.bfloat16))
    chex.assert_trees_all_close(s16, s32, atol=1e-6, rtol=1e-6)
    chex.assert_trees_all_close(g16[0].astype(jnp.float32), g32[0],
                                atol=2e-2, rtol=2e-2)
    chex.assert_trees_all_close(g16[1:], g32[1:], atol=1e-2, rtol=1e-2)


def test_matches_reference(kind, float_dtype):
  """y, dx, the new state and the backward-statistic updates of one step."""
  x = nc.x(dtype=float_dtype)
  if float_dtype == 'float32':
    nc.check_reference(kind, x, atol=1e-5, rtol=1e-5)
  else:  # stateless dx: finite differences of the NumPy forward, ~1e-9
    nc.check_reference(kind, x, atol=1e-12, rtol=1e-12, dx_atol=1e-7)


def test_gradients_match_finite_differences(stateless_kind):
  """With respect to x and every parameter (scale, bias, alpha, v)."""
  kind = stateless_kind
  with jax.enable_x64(True):
    x = nc.x(seed=4, dtype=jnp.float64)
    p = nc.params(kind, dtype=jnp.float64)
    check_grads(jax.jit(lambda x, p: nc.call(kind, x, p)[0]), (x, p),
                order=1, modes=['rev'], atol=1e-6, rtol=1e-6)


def _loss_and_grads(kind, state, mask, dy, remat=False):
  """(x, params, backward stats) -> ((loss, (y, new state)), grads)."""
  def loss(x, params, backward):
    y, new = nc.call(kind, x, params, state._replace(**backward), mask)
    return jnp.sum(y * dy), (y, new)
  return jax.value_and_grad(jax.checkpoint(loss) if remat else loss,
                            argnums=(0, 1, 2), has_aux=True)


def _args(kind, state):
  return nc.x(), nc.params(kind), nc.backward_stats(kind, state)


def test_jit_and_remat_equal_eager(kind):
  """jit, and jit of `jax.checkpoint` (remat): the same values and grads."""
  state = _state(kind)
  plain, remat = (_loss_and_grads(kind, state, nc.mask(), nc.cotangent(),
                                  remat=remat) for remat in (False, True))
  args = _args(kind, state)
  eager = plain(*args)
  jitted, remat = jax.jit(lambda *a: (plain(*a), remat(*a)))(*args)
  chex.assert_trees_all_close(jitted, eager, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(remat, jitted, atol=1e-6, rtol=1e-6)
  # The backward statistics' updates are real updates, not zero.
  assert all(np.any(v != 0) for v in jax.tree.leaves(eager[1][2]))


def test_vmap_over_independent_models(kind):
  """Two models with their own x, mask, cotangent and state."""
  p = nc.params(kind)
  xs = jnp.stack([nc.x(seed=0), nc.x(seed=1)])
  dys = jnp.stack([nc.cotangent(20), nc.cotangent(21)])
  masks = jnp.stack([nc.mask(), jnp.ones((nc.B, nc.T), bool)])
  states = [nc.state(kind), _state(kind)]

  def one(x, dy, mask, state):
    return _loss_and_grads(kind, state, mask, dy)(
        x, p, nc.backward_stats(kind, state))

  stack = lambda *v: jnp.stack(v)

  @jax.jit  # one compile
  def batched_and_looped(xs, dys, masks, states):
    looped = [one(xs[i], dys[i], masks[i], states[i]) for i in range(2)]
    return (jax.vmap(one)(xs, dys, masks, jax.tree.map(stack, *states)),
            jax.tree.map(stack, *looped))

  chex.assert_trees_all_close(*batched_and_looped(xs, dys, masks, states),
                              atol=1e-5, rtol=1e-5)


def test_pads_do_not_change_real_outputs_or_state(kind):
  x, mask = nc.x(), nc.mask()
  y, state = nc.call(kind, x, mask=mask, jit=True)
  y_pad, state_pad = nc.call(kind, jnp.where(mask[..., None], x, 1e3),
                             mask=mask, jit=True)
  chex.assert_trees_all_close(jnp.where(mask[..., None], y - y_pad, 0), 0.0,
                              atol=1e-5)
  chex.assert_trees_all_close(state, state_pad, atol=1e-6)


def test_stateless_norms_are_per_token(stateless_kind):
  """The mask is only validated; no other example and no later token is
  seen."""
  kind = stateless_kind
  x = nc.x()
  run = jax.jit(lambda x, mask: nc.call(kind, x, mask=mask)[0])
  y = run(x, None)
  chex.assert_trees_all_equal(run(x, nc.mask()), y)
  other = run(x.at[1].set(x[1] * 5 + 3), None)
  chex.assert_trees_all_equal(other[0], y[0])
  future = run(x.at[:, 2].set(x[:, 2] * -4 + 1), None)
  chex.assert_trees_all_equal(future[:, :2], y[:, :2])


def test_init_state_of_stateless_norms_is_empty(stateless_kind):
  assert nf.init_state(stateless_kind, nc.C) == nf.EmptyState()
