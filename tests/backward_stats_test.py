"""Forgetting PowerNorm's / UN's backward statistics is an error, not a
silently different algorithm, in every model style and under every transform;
`freeze_backward_stats=True` keeps them fixed on purpose."""

import functools

import flax.linen as flax_nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import normjax
import norm_cases as nc
from normjax import functional as nf
from normjax import linen as nl
from normjax import nnx as nnorm

KINDS = ('powernorm', 'unified')
MESSAGE = r'not the backward statistics \(state\.ema_gz.*freeze_backward_stats'
X = nc.normal(0, (4, 6, 8))
MASK = np.arange(6)[None] < np.array([[6], [3], [5], [1]])


def fn_and_state(kind):
  fn = functools.partial(nf.get_norm(kind), **nc.options(kind))
  return fn, nf.init_state(kind, 8, **nc.options(kind))


def loss(x, params, stats, state, fn, mask=MASK, **kw):
  y, _ = fn(x, params, state._replace(**stats), mask=mask, **kw)
  return jnp.sum(jnp.sin(y))


def backward_leaves(kind, state):
  names = nc.definition(kind).backward_stats
  return {n: getattr(state, n) for n in names}


@pytest.mark.parametrize('kind', KINDS)
@pytest.mark.parametrize('transform', ['eager', 'jit', 'vmap', 'remat'])
def test_differentiating_without_the_statistics_raises(kind, transform):
  fn, state = fn_and_state(kind)
  stats = backward_leaves(kind, state)
  grad = jax.grad(lambda x, p: loss(x, p, stats, state, fn), (0, 1))
  wrapped = {'eager': grad, 'jit': jax.jit(grad),
             'vmap': jax.vmap(grad, in_axes=(0, None)),
             'remat': jax.grad(jax.checkpoint(
                 lambda x, p: loss(x, p, stats, state, fn)), (0, 1))}
  args = (np.stack([X, X]) if transform == 'vmap' else X, {})
  with pytest.raises(ValueError, match=MESSAGE):
    wrapped[transform](*args)


@pytest.mark.parametrize('kind', KINDS)
def test_with_the_statistics_or_frozen_it_trains(kind):
  fn, state = fn_and_state(kind)
  stats = backward_leaves(kind, state)
  dx, dstats = jax.jit(jax.grad(
      lambda x, s: loss(x, {}, s, state, fn), (0, 1)))(X, stats)
  assert all(float(jnp.max(jnp.abs(v))) > 0 for v in jax.tree.leaves(dstats))
  frozen_dx, frozen_dstats = jax.jit(jax.grad(
      lambda x, s: loss(x, {}, s, state, fn, freeze_backward_stats=True),
      (0, 1)))(X, stats)
  np.testing.assert_array_equal(frozen_dx, dx)  # same rule, statistic kept
  assert all(float(jnp.max(jnp.abs(v))) == 0
             for v in jax.tree.leaves(frozen_dstats))
  # Only the forward (no gradient): nothing to check, nothing raised.
  fn(X, None, state, mask=MASK)


def test_sharded_step_raises_too():
  fn, state = fn_and_state('powernorm')
  stats = backward_leaves('powernorm', state)
  mesh = jax.make_mesh((8,), ('data',))
  x = jax.device_put(np.concatenate([X, X]), jax.NamedSharding(
      mesh, jax.P('data')))
  mask = np.concatenate([MASK, MASK])
  grad = jax.jit(jax.grad(lambda x: loss(x, {}, stats, state, fn, mask)))
  with pytest.raises(ValueError, match=MESSAGE):
    grad(x)


def test_linen_train_step_without_grad_stats_raises():
  module = nl.PowerNorm(**nc.module_options('powernorm'))
  variables = module.init(jax.random.key(0), X, use_running_average=False)

  def loss_fn(params, grad_stats):
    y, _ = module.apply({**variables, 'params': params,
                         'grad_stats': grad_stats}, X,
                        use_running_average=False, mask=MASK,
                        mutable=['batch_stats'])
    return jnp.sum(jnp.sin(y))
  with pytest.raises(ValueError, match=MESSAGE):
    jax.grad(loss_fn)(variables['params'], variables['grad_stats'])
  _, updates = jax.grad(loss_fn, (0, 1))(variables['params'],
                                         variables['grad_stats'])
  new = normjax.apply_backward_stats(variables['grad_stats'], updates)
  assert float(jnp.max(jnp.abs(flax_nn.unbox(new)['ema_gz']))) > 0


def test_nnx_grad_of_params_only_raises_and_the_helper_trains():
  model = nnorm.PowerNorm(8, rngs=nnx.Rngs(0),
                          **nc.module_options('powernorm'))

  def loss_fn(model):
    return jnp.sum(jnp.sin(model(X, mask=MASK)))
  with pytest.raises(ValueError, match=MESSAGE):
    nnx.grad(loss_fn)(model)
  nnorm.value_and_grad(loss_fn)(model)
  assert float(jnp.max(jnp.abs(model.ema_gz[...]))) > 0
