"""One suite over every functional norm: the shared contract."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from normjax import functional as nf

C = 8
OPTIONS = {
    'layernorm': {}, 'rmsnorm': {}, 'group_scaling': dict(num_groups=2),
    'batchnorm': {}, 'pn_v': dict(num_groups=2),
    'powernorm': dict(num_groups=2, warmup_steps=2),
    'unified': dict(window_size=2, warmup_steps=2, compensation_delay=2),
    'dyt': {}, 'crmsnorm': {}, 'groupnorm': dict(num_groups=2),
    'evonorm_s0': dict(num_groups=2), 'layernorm_scaling': dict(layer_index=3),
}
KINDS = sorted(nf.FUNCTIONS)


def test_every_registered_norm_is_covered():
  assert set(OPTIONS) == set(nf.FUNCTIONS)


def inputs(dtype=jnp.float32):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(4, 5, C)) * 2 + 1, dtype)
  mask = jnp.asarray(np.arange(5)[None] < np.array([[5], [3], [1], [4]]))
  params = {'scale': jnp.linspace(0.5, 1.5, C), 'bias': jnp.zeros(C)}
  return x, mask, params


def run(kind, x, mask, params, state=None, **kw):
  state = nf.init_state(kind, C, **OPTIONS[kind]) if state is None else state
  return nf.get_norm(kind)(x, params, state, mask=mask, **OPTIONS[kind], **kw)


@pytest.mark.parametrize('kind', KINDS)
@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_shape_dtype_and_finite(kind, dtype):
  x, mask, params = inputs(dtype)
  state = nf.init_state(kind, C, **OPTIONS[kind])
  y, new = run(kind, x, mask, params, state)
  chex.assert_shape(y, x.shape)
  chex.assert_type(y, x.dtype)
  chex.assert_tree_all_finite(y)
  chex.assert_trees_all_equal_shapes_and_dtypes(new, state)
  y_eval, same = run(kind, x, mask, params, new, use_running_average=True)
  chex.assert_type(y_eval, x.dtype)
  assert same is new


@pytest.mark.parametrize('kind', KINDS)
def test_jit_equals_eager(kind):
  x, mask, params = inputs()
  eager = run(kind, x, mask, params)
  jitted = jax.jit(lambda x, m, p: run(kind, x, m, p))(x, mask, params)
  chex.assert_trees_all_close(eager, jitted, atol=1e-6)


@pytest.mark.parametrize('kind', sorted(set(KINDS) - {'unified'}))
def test_pads_do_not_change_real_outputs_or_state(kind):
  """UN is excluded: officially its statistics include pads."""
  x, mask, params = inputs()
  y, st = run(kind, x, mask, params)
  y2, st2 = run(kind, jnp.where(mask[..., None], x, 1e3), mask, params)
  chex.assert_trees_all_close(jnp.where(mask[..., None], y - y2, 0), 0.0,
                              atol=1e-5)
  chex.assert_trees_all_close(st, st2, atol=1e-6)


@pytest.mark.parametrize('kind', KINDS)
def test_vmap_over_independent_models(kind):
  x, mask, params = inputs()
  xs = jnp.stack([x, 2 * x + 1])
  state = nf.init_state(kind, C, **OPTIONS[kind])
  states = jax.tree.map(lambda v: jnp.stack([v, v]), state)
  ys, news = jax.vmap(lambda x, s: run(kind, x, mask, params, s))(xs, states)
  for i in range(2):
    y, new = run(kind, xs[i], mask, params, state)
    chex.assert_trees_all_close(ys[i], y, atol=1e-5)
    chex.assert_trees_all_close(jax.tree.map(lambda v: v[i], news), new,
                                atol=1e-6)
