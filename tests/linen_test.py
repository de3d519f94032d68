"""Tests of the Flax linen modules of normjax.

1. Agreement with flax.linen (LayerNorm, RMSNorm, BatchNorm).
2. Every module equals its functional norm (outputs, state, grads, and the
   cotangents of the backward-pass statistics).
3. Param trees, logical partitioning and state collections.
4. `use_running_average` semantics (state frozen, merge_param errors).
5. The train-step idiom with `grad_stats` and `apply_backward_stats`.
6. jit / vmap / remat compatibility.
7. `make_norm`.
"""

import functools
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import normjax
from normjax import functional as nf
from normjax import linen as nl

B, T, F = 2, 3, 8
TOL = dict(atol=1e-6, rtol=1e-6)
STATEFUL = ('batchnorm', 'powernorm', 'pn_v', 'unified')
STATELESS = ('layernorm', 'rmsnorm', 'group_scaling', 'dyt', 'crmsnorm',
             'groupnorm', 'evonorm_s0', 'layernorm_scaling')
# Options without a usable default at F = 8 features: (module, function).
REQUIRED = {
    'groupnorm': (dict(num_groups=2), dict(num_groups=2)),
    'layernorm_scaling': (dict(layer_index=2), dict(layer_index=2)),
}
# Params whose shape is not (F,), and their logical axes.
PARAM_SHAPES = {'alpha': ((1,), (None,))}


def _normal(seed, shape, dtype=np.float32):
  # NumPy, not jax.random: eager JAX ops would each compile once per shape.
  return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _x(seed=0, shape=(B, T, F), dtype=jnp.float32):
  return jnp.asarray(2.0 * _normal(seed, shape) + 0.5, dtype)


def _mask():
  return jnp.array([[True, True, False], [True, True, True]])


def _cotangent(seed=7, shape=(B, T, F), dtype=jnp.float32):
  return jnp.asarray(_normal(seed, shape), dtype)


def _random_params(params, seed=3):
  """Replaces scale/bias by random values (same tree, same dtypes)."""
  out = {}
  for i, (name, v) in enumerate(sorted(params.items())):
    noise = 0.3 * _normal(seed + i, v.shape)
    out[name] = jnp.asarray((1.0 + noise) if name == 'scale' else noise,
                            v.dtype)
  return out


def _random_state(collection, seed=11):
  """A mid-training state: positive second moments, non-zero grad stats."""
  out = {}
  for i, (name, v) in enumerate(sorted(collection.items())):
    rng = np.random.default_rng(seed + i)
    if name == 'step':
      value = np.full(v.shape, 5)
    elif name == 'skip_count':
      value = np.full(v.shape, 1)
    elif name in ('mean', 'ema_gz', 'bwd_window'):
      value = 0.3 * rng.standard_normal(v.shape)
    else:  # var, running_phi, running_var, fwd_window: must be positive
      value = rng.uniform(0.5, 2.0, v.shape)
    out[name] = jnp.asarray(value, v.dtype)
  return out


def _init(module, x, **kwargs):
  """module.init under jit (one compile instead of many eager ops)."""
  return jax.jit(functools.partial(module.init, **kwargs))(
      jax.random.key(0), x)


def _split(variables):
  return (variables.get('params', {}), variables.get('batch_stats', {}),
          variables.get('grad_stats', {}))


# ---------------------------------------------------------------------------
# 1. Agreement with flax.linen.


@pytest.mark.parametrize('ours, theirs', [
    (nl.LayerNorm, functools.partial(nn.LayerNorm, reduction_axes=-1)),
    (nl.RMSNorm, nn.RMSNorm),
], ids=['layernorm', 'rmsnorm'])
def test_per_token_norm_matches_flax(ours, theirs):
  x, dy = _x(), _cotangent()
  v_ours = nn.unbox(ours().init(jax.random.key(0), x))
  v_flax = nn.unbox(theirs().init(jax.random.key(0), x))
  chex.assert_trees_all_equal_shapes_and_dtypes(v_ours, v_flax)
  assert jax.tree.structure(v_ours) == jax.tree.structure(v_flax)

  variables = {'params': _random_params(v_flax['params'])}

  def loss(module, variables, x):
    y = module.apply(variables, x)
    return jnp.sum(y * dy), y

  (_, y_ours), g_ours = jax.jit(jax.value_and_grad(
      functools.partial(loss, ours()), argnums=(0, 1), has_aux=True))(
          variables, x)
  (_, y_flax), g_flax = jax.jit(jax.value_and_grad(
      functools.partial(loss, theirs()), argnums=(0, 1), has_aux=True))(
          variables, x)
  chex.assert_trees_all_close(y_ours, y_flax, **TOL)
  chex.assert_trees_all_close(g_ours, g_flax, **TOL)


@pytest.mark.parametrize('with_mask', [False, True])
def test_batch_norm_matches_flax(with_mask):
  x, dy = _x(), _cotangent()
  ours, theirs = nl.BatchNorm(), nn.BatchNorm()
  v_ours = nn.unbox(ours.init(jax.random.key(0), x, use_running_average=False))
  v_flax = theirs.init(jax.random.key(0), x, use_running_average=False)
  chex.assert_trees_all_equal_shapes_and_dtypes(v_ours, v_flax)
  assert jax.tree.structure(v_ours) == jax.tree.structure(v_flax)
  chex.assert_trees_all_equal(v_ours, v_flax)  # ones/zeros, mean 0, var 1

  variables = {'params': _random_params(v_flax['params']),
               'batch_stats': _random_state(v_flax['batch_stats'])}
  mask = _mask() if with_mask else None
  # flax's mask broadcasts against x; normjax's has one entry per token.
  flax_mask = None if mask is None else mask[..., None]

  def loss(module, mask, params, x):
    y, upd = module.apply(
        {'params': params, 'batch_stats': variables['batch_stats']}, x,
        use_running_average=False, mask=mask, mutable=['batch_stats'])
    return jnp.sum(y * dy), (y, upd['batch_stats'])

  (_, (y_ours, bs_ours)), g_ours = jax.jit(jax.value_and_grad(
      functools.partial(loss, ours, mask), argnums=(0, 1), has_aux=True))(
          variables['params'], x)
  (_, (y_flax, bs_flax)), g_flax = jax.jit(jax.value_and_grad(
      functools.partial(loss, theirs, flax_mask), argnums=(0, 1),
      has_aux=True))(variables['params'], x)
  chex.assert_trees_all_close(y_ours, y_flax, **TOL)
  chex.assert_trees_all_close(bs_ours, bs_flax, **TOL)
  chex.assert_trees_all_close(g_ours, g_flax, **TOL)
  if with_mask:  # the pad token must not have entered the statistics
    _, unmasked = jax.jit(functools.partial(
        ours.apply, use_running_average=False, mutable=['batch_stats']))(
            variables, x)
    assert not np.allclose(bs_ours['mean'], unmasked['batch_stats']['mean'])

  # Evaluation mode with the updated running statistics.
  eval_vars = {'params': variables['params'], 'batch_stats': bs_flax}

  def eval_loss(module, params, x):
    y = module.apply({'params': params, 'batch_stats': bs_flax}, x,
                     use_running_average=True)
    return jnp.sum(y * dy), y

  (_, y_ours), g_ours = jax.jit(jax.value_and_grad(
      functools.partial(eval_loss, ours), argnums=(0, 1), has_aux=True))(
          eval_vars['params'], x)
  (_, y_flax), g_flax = jax.jit(jax.value_and_grad(
      functools.partial(eval_loss, theirs), argnums=(0, 1), has_aux=True))(
          eval_vars['params'], x)
  chex.assert_trees_all_close(y_ours, y_flax, **TOL)
  chex.assert_trees_all_close(g_ours, g_flax, **TOL)


# ---------------------------------------------------------------------------
# 2. Module == function.

# kind -> (module options, the same options for the function).
CUSTOM = {
    'layernorm': (dict(epsilon=1e-3), dict(eps=1e-3)),
    'rmsnorm': (dict(epsilon=1e-3, use_bias=True), dict(eps=1e-3)),
    'group_scaling': (dict(epsilon=1e-3, num_groups=2, use_scale=True,
                           use_bias=True), dict(eps=1e-3, num_groups=2)),
    'batchnorm': (dict(epsilon=1e-3, momentum=0.9, num_batch_groups=2),
                  dict(eps=1e-3, momentum=0.9, num_batch_groups=2)),
    'powernorm': (dict(epsilon=1e-3, num_groups=2, warmup_steps=3,
                       alpha_fwd=0.8, alpha_bkw=0.7, grad_mean_over='valid',
                       num_batch_groups=2),
                  dict(eps=1e-3, num_groups=2, warmup_steps=3, alpha_fwd=0.8,
                       alpha_bkw=0.7, grad_mean_over='valid',
                       num_batch_groups=2)),
    'pn_v': (dict(epsilon=1e-3, num_groups=2, momentum=0.8),
             dict(eps=1e-3, num_groups=2, momentum=0.8)),
    'unified': (dict(epsilon=1e-3, window_size=(2, 3), warmup_steps=3,
                     compensation_delay=3, mean_over='valid',
                     num_batch_groups=2),
                dict(eps=1e-3, window_size=(2, 3), warmup_steps=3,
                     compensation_delay=3, mean_over='valid',
                     num_batch_groups=2)),
    'dyt': (dict(alpha_init=0.3, use_bias=False), {}),
    'crmsnorm': (dict(epsilon=1e-3, use_scale=True), dict(eps=1e-3)),
    'groupnorm': (dict(epsilon=1e-3, num_groups=4),
                  dict(eps=1e-3, num_groups=4)),
    'evonorm_s0': (dict(epsilon=1e-3, num_groups=2),
                   dict(eps=1e-3, num_groups=2)),
    'layernorm_scaling': (dict(epsilon=1e-3, layer_index=4, base='rmsnorm',
                               use_bias=False),
                          dict(eps=1e-3, layer_index=4, base='rmsnorm')),
}


def test_custom_cases_cover_every_module():
  assert set(CUSTOM) | {'none'} == set(nl.MODULES)
  assert set(nl.MODULES) - {'none'} == set(nf.FUNCTIONS)


@pytest.mark.parametrize('options, float_dtype', [
    ('defaults', 'float32'), ('custom', 'float32'), ('custom', 'float64')])
@pytest.mark.parametrize('kind', sorted(CUSTOM))
def test_module_equals_function(kind, options, float_dtype):
  with jax.enable_x64(float_dtype == 'float64'):
    _check_module_equals_function(kind, options, float_dtype)


def _check_module_equals_function(kind, options, float_dtype):
  mod_opts, fn_opts = (CUSTOM[kind] if options == 'custom' else
                       REQUIRED.get(kind, ({}, {})))
  module = nl.make_norm(kind, **mod_opts)()
  fn = functools.partial(nf.get_norm(kind), **fn_opts)
  x, dy = _x(dtype=float_dtype), _cotangent(dtype=float_dtype)
  mask = _mask()
  init = nn.unbox(_init(module, x, use_running_average=False))
  params, batch_stats, grad_stats = _split(init)
  params = _random_params(params)
  batch_stats = _random_state(batch_stats)
  grad_stats = _random_state(grad_stats, seed=23)
  stateful = kind in STATEFUL
  fresh = nf.init_state(kind, F, **fn_opts)
  backward = getattr(fresh, 'BACKWARD_FIELDS', ())
  assert set(grad_stats) == set(backward)

  def module_loss(params, grad_stats, x, train):
    variables = {'params': params}
    if stateful:
      variables.update(batch_stats=batch_stats, grad_stats=grad_stats)
    y, upd = module.apply(variables, x, use_running_average=not train,
                          mask=mask, mutable=['batch_stats'])
    return jnp.sum(y * dy), (y, upd.get('batch_stats', {}))

  def function_loss(params, grad_stats, x, train):
    state = (type(fresh)(**batch_stats, **grad_stats) if stateful
             else nf.EmptyState())
    y, new_state = fn(x, params, state, mask=mask,
                      use_running_average=not train)
    return jnp.sum(y * dy), (y, new_state)

  def train_and_eval(loss):  # one compile for both modes
    return jax.jit(lambda *args: [
        jax.value_and_grad(functools.partial(loss, train=train),
                           argnums=(0, 1, 2), has_aux=True)(*args)
        for train in (True, False)])(params, grad_stats, x)

  results = zip((True, False), train_and_eval(module_loss),
                train_and_eval(function_loss))
  for train, ((_, (y_m, bs_m)), g_m), ((_, (y_f, state_f)), g_f) in results:
    assert y_m.dtype == y_f.dtype == x.dtype
    chex.assert_trees_all_close(y_m, y_f, **TOL)
    # Grads wrt params and x, and the backward-stat cotangents (PN: ema_gz,
    # UN: ema_gz and bwd_window) equal the functional ones.
    chex.assert_trees_all_close(g_m, g_f, **TOL)
    if stateful:
      chex.assert_trees_all_close(
          bs_m, {k: getattr(state_f, k) for k in batch_stats}, **TOL)
      # The function leaves the backward fields to the cotangents.
      chex.assert_trees_all_equal(
          {k: getattr(state_f, k) for k in grad_stats}, grad_stats)
      if train:
        assert any(not np.allclose(bs_m[k], batch_stats[k]) for k in bs_m)
      else:
        chex.assert_trees_all_equal(bs_m, batch_stats)
    if backward and train:
      # The cotangent is a real update, not zero.
      assert any(np.any(np.asarray(g_m[1][k]) != 0) for k in backward)


def test_identity_module():
  x = _x()
  module = nl.Identity()
  variables = module.init(jax.random.key(0), x)
  assert not variables
  chex.assert_trees_all_equal(module.apply(variables, x, True, mask=_mask()),
                              x)


# ---------------------------------------------------------------------------
# 3. Param trees, partitioning, collections.

EXPECTED_COLLECTIONS = {
    'layernorm': ({'scale', 'bias'}, set(), set()),
    'rmsnorm': ({'scale'}, set(), set()),
    'group_scaling': (set(), set(), set()),
    'batchnorm': ({'scale', 'bias'}, {'mean', 'var'}, set()),
    'powernorm': ({'scale', 'bias'}, {'running_phi', 'step'}, {'ema_gz'}),
    'pn_v': ({'scale', 'bias'}, {'running_phi'}, set()),
    'unified': ({'scale', 'bias'},
                {'running_var', 'fwd_window', 'step', 'skip_count'},
                {'ema_gz', 'bwd_window'}),
    'dyt': ({'alpha', 'scale', 'bias'}, set(), set()),
    'crmsnorm': (set(), set(), set()),
    'groupnorm': ({'scale', 'bias'}, set(), set()),
    'evonorm_s0': ({'v', 'scale', 'bias'}, set(), set()),
    'layernorm_scaling': ({'scale', 'bias'}, set(), set()),
    'none': (set(), set(), set()),
}


@pytest.mark.parametrize('kind', sorted(EXPECTED_COLLECTIONS))
def test_param_tree_and_collections(kind):
  x = _x()
  module = nl.make_norm(kind, **REQUIRED.get(kind, ({},))[0])()
  boxed = _init(module, x, use_running_average=False)
  variables = nn.unbox(boxed)
  params, batch_stats, grad_stats = _split(variables)
  want_p, want_bs, want_gs = EXPECTED_COLLECTIONS[kind]
  assert set(variables) <= {'params', 'batch_stats', 'grad_stats'}
  assert set(params) == want_p
  assert set(batch_stats) == want_bs
  assert set(grad_stats) == want_gs
  for name, v in params.items():
    chex.assert_shape(v, PARAM_SHAPES.get(name, ((F,),))[0])
    assert v.dtype == jnp.float32
  if 'scale' in params:
    chex.assert_trees_all_equal(params['scale'], jnp.ones(F))
  if 'bias' in params:
    chex.assert_trees_all_equal(params['bias'], jnp.zeros(F))

  # Logical partitioning: features are 'embed'; windows (None, 'embed');
  # scalar counters replicated.
  specs = nn.get_partition_spec(boxed)
  for name in params:
    axes = PARAM_SHAPES.get(name, (None, ('embed',)))[1]
    assert specs['params'][name] == jax.sharding.PartitionSpec(*axes)
  for collection in ('batch_stats', 'grad_stats'):
    for name, value in variables.get(collection, {}).items():
      want = {0: (), 1: ('embed',), 2: (None, 'embed')}[value.ndim]
      assert specs[collection][name] == jax.sharding.PartitionSpec(*want), (
          collection, name)


def test_param_dtype_and_dtype():
  x = _x(dtype=jnp.bfloat16)
  module = nl.LayerNorm(param_dtype=jnp.bfloat16, dtype=jnp.float32)
  variables = nn.unbox(module.init(jax.random.key(0), x))
  assert variables['params']['scale'].dtype == jnp.bfloat16
  assert module.apply(variables, x).dtype == jnp.float32
  assert nl.LayerNorm().apply(nn.unbox(nl.LayerNorm().init(
      jax.random.key(0), x)), x).dtype == jnp.bfloat16


# ---------------------------------------------------------------------------
# 4. use_running_average.


@pytest.mark.parametrize('kind', STATEFUL)
def test_state_frozen_in_eval_and_at_init(kind):
  x = _x()
  module = nl.make_norm(kind)()
  variables = nn.unbox(_init(module, x, use_running_average=False,
                             mask=_mask()))
  fresh = nf.init_state(kind, F)
  _, batch_stats, grad_stats = _split(variables)
  # init does not update the running statistics, even in training mode.
  chex.assert_trees_all_equal(
      {**batch_stats, **grad_stats}, fresh._asdict())

  variables = dict(variables, batch_stats=_random_state(batch_stats))
  _, upd = jax.jit(functools.partial(
      module.apply, use_running_average=True, mask=_mask(),
      mutable=['batch_stats', 'grad_stats']))(variables, x)
  chex.assert_trees_all_equal(upd['batch_stats'], variables['batch_stats'])
  chex.assert_trees_all_equal(upd.get('grad_stats', {}),
                              variables.get('grad_stats', {}))
  # The constructor field works as well.
  module = nl.make_norm(kind, use_running_average=True)()
  _, upd = jax.jit(functools.partial(module.apply, mutable=['batch_stats']))(
      variables, x)
  chex.assert_trees_all_equal(upd['batch_stats'], variables['batch_stats'])


def _error(fn):
  with pytest.raises(ValueError) as info:
    fn()
  return str(info.value)


@pytest.mark.parametrize('kind', STATEFUL)
def test_use_running_average_passed_exactly_once(kind):
  x = _x()
  key = jax.random.key(0)
  ours = nl.make_norm(kind)
  variables = ours(use_running_average=True).init(key, x)
  neither = _error(lambda: ours().init(key, x))
  assert 'use_running_average' in neither
  assert neither == _error(lambda: nn.BatchNorm().init(key, x))
  both = _error(lambda: ours(use_running_average=True).apply(
      variables, x, use_running_average=False))
  assert 'use_running_average' in both
  assert both == _error(lambda: nn.BatchNorm(use_running_average=True).init(
      key, x, use_running_average=True))


# ---------------------------------------------------------------------------
# 5. The train-step idiom.


class _MLP(nn.Module):
  norm: Any  # a make_norm factory

  @nn.compact
  def __call__(self, x, train, mask=None):
    h = nn.Dense(16)(x)
    h = self.norm(name='norm')(h, use_running_average=not train, mask=mask)
    h = nn.relu(h)
    return nn.Dense(1)(h)


def test_train_step_idiom():
  model = _MLP(norm=nl.make_norm('powernorm', num_groups=2, warmup_steps=2))
  x = _x(shape=(4, 5, 6))
  target = jnp.sin(jnp.sum(x, axis=-1, keepdims=True))
  mask = jnp.arange(5)[None, :] < jnp.array([5, 3, 4, 2])[:, None]
  variables = nn.unbox(model.init(jax.random.key(1), x, train=False))
  params = variables['params']
  batch_stats = variables['batch_stats']
  grad_stats = variables['grad_stats']
  assert set(grad_stats['norm']) == {'ema_gz'}
  tx = optax.adam(1e-2)
  opt_state = tx.init(params)

  @jax.jit
  def train_step(params, batch_stats, grad_stats, opt_state):
    def loss_fn(params, grad_stats):
      out, upd = model.apply(
          {'params': params, 'batch_stats': batch_stats,
           'grad_stats': grad_stats}, x, train=True, mask=mask,
          mutable=['batch_stats'])
      err = jnp.where(mask[..., None], out - target, 0.0)
      loss = jnp.sum(err**2) / jnp.sum(mask)
      return loss, upd['batch_stats']

    (loss, batch_stats), (grads, stat_grads) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(params, grad_stats)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    grad_stats = normjax.apply_backward_stats(grad_stats, stat_grads)
    return params, batch_stats, grad_stats, opt_state, loss

  losses = []
  for _ in range(5):
    params, batch_stats, grad_stats, opt_state, loss = train_step(
        params, batch_stats, grad_stats, opt_state)
    losses.append(float(loss))
  assert np.all(np.isfinite(losses)), losses
  assert np.all(np.diff(losses) < 0), losses
  assert int(batch_stats['norm']['step']) == 5
  assert batch_stats['norm']['running_phi'].dtype == jnp.float32
  assert not np.allclose(batch_stats['norm']['running_phi'], 1.0)
  ema_gz = grad_stats['norm']['ema_gz']
  assert ema_gz.dtype == jnp.float32
  assert np.all(np.isfinite(ema_gz)) and np.any(ema_gz != 0)
  # The optimizer only ever saw the params.
  paths = [jax.tree_util.keystr(p) for p, _ in
           jax.tree_util.tree_flatten_with_path(opt_state)[0]]
  assert not any('ema_gz' in p or 'grad_stats' in p or 'running_phi' in p
                 for p in paths), paths
  adam_state = opt_state[0]
  assert jax.tree.structure(adam_state.mu) == jax.tree.structure(params)


# ---------------------------------------------------------------------------
# 6. jit / vmap / remat.

FUNCTIONAL_BACKWARD = {
    'powernorm': dict(num_groups=2, warmup_steps=3),
    'unified': dict(window_size=2, warmup_steps=3, compensation_delay=3),
}


def _functional_case(kind, state_seed=11):
  opts = FUNCTIONAL_BACKWARD[kind]
  fresh = nf.init_state(kind, F, **opts)
  state = type(fresh)(**_random_state(fresh._asdict(), seed=state_seed))
  params = _random_params({'scale': jnp.ones(F), 'bias': jnp.zeros(F)})
  fn = functools.partial(nf.get_norm(kind), **opts)
  return fn, params, state


def _functional_loss(fn, dy, mask):
  def loss(x, params, backward, state):
    y, new_state = fn(x, params, state._replace(**backward), mask=mask)
    return jnp.sum(y * dy), (y, new_state)
  return loss


@pytest.mark.parametrize('kind', sorted(FUNCTIONAL_BACKWARD))
def test_jit_grad_equals_grad(kind):
  fn, params, state = _functional_case(kind)
  x, dy, mask = _x(), _cotangent(), _mask()
  backward = {k: getattr(state, k) for k in state.BACKWARD_FIELDS}
  grad = jax.grad(_functional_loss(fn, dy, mask), argnums=(0, 1, 2),
                  has_aux=True)
  g_eager, (y_eager, s_eager) = grad(x, params, backward, state)
  g_jit, (y_jit, s_jit) = jax.jit(grad)(x, params, backward, state)
  chex.assert_trees_all_close(g_jit, g_eager, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(y_jit, y_eager, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(s_jit, s_eager, atol=1e-5, rtol=1e-5)
  assert all(np.any(np.asarray(g_eager[2][k]) != 0) for k in backward)


@pytest.mark.parametrize('kind', sorted(FUNCTIONAL_BACKWARD))
def test_vmap_over_independent_models(kind):
  num_models = 3
  fn, params, _ = _functional_case(kind)
  states = [_functional_case(kind, state_seed=11 + 10 * i)[2]
            for i in range(num_models)]
  xs = jnp.stack([_x(seed=i) for i in range(num_models)])
  dys = jnp.stack([_cotangent(seed=20 + i) for i in range(num_models)])
  masks = jnp.stack([_mask(), jnp.ones((B, T), bool), ~_mask()])

  def one(x, dy, mask, state):
    backward = {k: getattr(state, k) for k in state.BACKWARD_FIELDS}
    return jax.grad(_functional_loss(fn, dy, mask), argnums=(0, 1, 2),
                    has_aux=True)(x, params, backward, state)

  batched = jax.jit(jax.vmap(one))(xs, dys, masks,
                          jax.tree.map(lambda *v: jnp.stack(v), *states))
  looped = [jax.jit(one)(xs[i], dys[i], masks[i], states[i])
            for i in range(num_models)]
  looped = jax.tree.map(lambda *v: jnp.stack(v), *looped)
  chex.assert_trees_all_close(batched, looped, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('kind', ['batchnorm', 'powernorm', 'unified'])
def test_remat_module(kind):
  mod_opts = CUSTOM[kind][0]
  x, dy, mask = _x(), _cotangent(), _mask()
  if kind in STATEFUL:
    mod_opts = dict(mod_opts, use_running_average=False)
  plain = nl.make_norm(kind, **mod_opts)()
  remat = nn.remat(nl.MODULES[kind])(**mod_opts)
  init = nn.unbox(_init(plain, x))
  init_remat = nn.unbox(_init(remat, x))
  chex.assert_trees_all_equal(init, init_remat)
  params, batch_stats, grad_stats = _split(init)
  params = _random_params(params)
  batch_stats = _random_state(batch_stats)
  grad_stats = _random_state(grad_stats, seed=23)

  def loss(module, params, grad_stats, x):
    y, upd = module.apply(
        {'params': params, 'batch_stats': batch_stats,
         'grad_stats': grad_stats}, x, mask=mask, mutable=['batch_stats'])
    return jnp.sum(y * dy), (y, upd)

  out_plain = jax.jit(jax.grad(functools.partial(loss, plain),
                               argnums=(0, 1, 2), has_aux=True))(
                                   params, grad_stats, x)
  out_remat = jax.jit(jax.grad(functools.partial(loss, remat),
                               argnums=(0, 1, 2), has_aux=True))(
                                   params, grad_stats, x)
  chex.assert_trees_all_close(out_remat, out_plain, **TOL)


# ---------------------------------------------------------------------------
# 7. make_norm.


def test_make_norm_unknown_kind():
  with pytest.raises(ValueError, match=r"'fancynorm'.*layernorm"):
    nl.make_norm('fancynorm')


def test_make_norm_unknown_option():
  with pytest.raises(ValueError, match=r"'powernorm'.*\['warmup'\]"):
    nl.make_norm('powernorm', warmup=3)
  with pytest.raises(ValueError, match=r"\['momentum'\]"):
    nl.make_norm('layernorm', momentum=0.5)


@pytest.mark.parametrize('kind', sorted(nl.MODULES))
def test_make_norm_builds_every_kind(kind):
  x = _x()
  module = nl.make_norm(kind, **REQUIRED.get(kind, ({},))[0])(name='norm')
  variables = _init(module, x, use_running_average=False)
  outputs = jax.jit(lambda v, x: [
      module.apply(v, x, use_running_average=not train, mask=_mask(),
                   mutable=True)[0] for train in (True, False)])(variables, x)
  for y in outputs:
    chex.assert_shape(y, x.shape)
    assert y.dtype == x.dtype
    chex.assert_tree_all_finite(y)
