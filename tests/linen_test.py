"""Tests of the Flax linen modules of normjax.

1. Agreement with flax.linen (LayerNorm, RMSNorm, BatchNorm).
2. Every module (`kind` from conftest, the toys included) equals its
   function over a few training steps and an evaluation step: outputs,
   state, grads and the updates of the backward-pass statistics.
3. Param trees, logical partitioning and state collections.
4. `use_running_average` semantics (state frozen, merge_param errors).
5. The train-step idiom with `grad_stats` and `apply_backward_stats`;
   `nn.remat` of the stateful modules.
6. `make_norm`.
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

import norm_cases as nc
import normjax
from normjax import functional as nf
from normjax import linen as nl

B, T, F = nc.SHAPE
TOL = dict(atol=1e-6, rtol=1e-6)
# Params whose shape is not (F,), and their logical axes.
PARAM_SHAPES = {'alpha': ((1,), (None,))}
INIT_VALUES = {'alpha': 0.5, 'v': 1.0}  # params beyond scale/bias, at init


def _random_params(params, seed=3):
  """Replaces scale/bias by random values (same tree, same dtypes)."""
  out = {}
  for i, (name, v) in enumerate(sorted(params.items())):
    noise = 0.3 * nc.normal(seed + i, v.shape)
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
  x, dy = nc.x(), nc.cotangent()
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
  x, dy = nc.x(), nc.cotangent()
  ours, theirs = nl.BatchNorm(), nn.BatchNorm()
  v_ours = nn.unbox(ours.init(jax.random.key(0), x, use_running_average=False))
  v_flax = theirs.init(jax.random.key(0), x, use_running_average=False)
  chex.assert_trees_all_equal_shapes_and_dtypes(v_ours, v_flax)
  assert jax.tree.structure(v_ours) == jax.tree.structure(v_flax)
  chex.assert_trees_all_equal(v_ours, v_flax)  # ones/zeros, mean 0, var 1

  variables = {'params': _random_params(v_flax['params']),
               'batch_stats': _random_state(v_flax['batch_stats'])}
  mask = nc.mask() if with_mask else None
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

# kind -> (non-default options, module-only fields): the options reach the
# module under its field names (`norm_cases.module_options`).
CUSTOM = {
    'layernorm': (dict(eps=1e-3), {}),
    'rmsnorm': (dict(eps=1e-3), dict(use_bias=True)),
    'group_scaling': (dict(eps=1e-3, num_groups=2),
                      dict(use_scale=True, use_bias=True)),
    'batchnorm': (dict(eps=1e-3, momentum=0.9, num_batch_groups=2), {}),
    'paper_batchnorm': (dict(eps=1e-3, momentum=0.9, layer_scaling_eps=1e-4,
                             num_batch_groups=2), {}),
    'powernorm': (dict(eps=1e-3, num_groups=2, warmup_steps=3, alpha_fwd=0.8,
                       alpha_bkw=0.7, grad_mean_over='valid',
                       num_batch_groups=2), {}),
    'pn_v': (dict(eps=1e-3, num_groups=2, momentum=0.8), {}),
    'unified': (dict(eps=1e-3, window_size=(2, 3), warmup_steps=3,
                     compensation_delay=3, mean_over='padded',
                     num_batch_groups=2), {}),
    'dyt': (dict(alpha=0.3), dict(use_bias=False)),
    'crmsnorm': (dict(eps=1e-3), dict(use_scale=True)),
    'groupnorm': (dict(eps=1e-3, num_groups=4), {}),
    'evonorm_s0': (dict(eps=1e-3, num_groups=2), {}),
    'layernorm_scaling': (dict(eps=1e-3, layer_index=4, base='rmsnorm'),
                          dict(use_bias=False)),
}
CUSTOM.update({  # the family additions; zero_centered_scale on two of them
    'derf': (dict(alpha=0.3, shift=0.1), {}),
    'seednorm': (dict(eps=1e-3, zero_centered_scale=True),
                 dict(use_bias=True)),
    'evonorm_b0': (dict(eps=1e-3, decay=0.8, num_batch_groups=2), {}),
    'bcn': (dict(eps=1e-3, group_eps=1e-4, num_groups=4, momentum=0.8,
                 num_batch_groups=2, zero_centered_scale=True), {}),
})


def test_custom_cases_cover_every_module():
  assert set(CUSTOM) == set(nc.KINDS) == set(nl.MODULES) - {'none'}


def test_module_equals_function(kind):
  """Default fields (and the small-test options), three steps, float32."""
  _check_module_equals_function(kind, {}, {}, jnp.float32, steps=3)


@pytest.mark.parametrize('kind', sorted(CUSTOM))
def test_module_equals_function_with_custom_options_float64(kind):
  with jax.enable_x64(True):
    _check_module_equals_function(kind, *CUSTOM[kind], jnp.float64, steps=2)


def _check_module_equals_function(kind, custom, module_only, dtype, steps):
  module = nl.make_norm(kind, **nc.module_options(kind, **custom),
                        **module_only)()
  fn = functools.partial(nf.get_norm(kind), **nc.options(kind, **custom))
  mask = nc.mask()
  params, batch_stats, grad_stats = _split(nn.unbox(_init(
      module, nc.x(dtype=dtype), use_running_average=False)))
  params = _random_params(params)
  fresh = nf.init_state(kind, F, **nc.options(kind, **custom))
  backward = nc.definition(kind).backward_stats
  assert set(grad_stats) == set(backward)
  chex.assert_trees_all_equal({**batch_stats, **grad_stats}, fresh._asdict())

  def module_loss(params, grad_stats, x, dy, batch_stats, train):
    y, upd = module.apply(
        {'params': params, 'batch_stats': batch_stats,
         'grad_stats': grad_stats}, x, use_running_average=not train,
        mask=mask, mutable=['batch_stats'])
    return jnp.sum(y * dy), (y, upd.get('batch_stats', {}))

  def function_loss(params, grad_stats, x, dy, state, train):
    y, new = fn(x, params, state._replace(**grad_stats), mask=mask,
                use_running_average=not train)
    return jnp.sum(y * dy), (y, new)

  @jax.jit
  def step(params, grad_stats, x, dy, batch_stats, state):
    """Both modes of both, one compile: [(module, function)] per mode."""
    grad = lambda loss, *a, train: jax.value_and_grad(
        functools.partial(loss, train=train), argnums=(0, 1, 2),
        has_aux=True)(params, grad_stats, x, dy, *a)
    return [(grad(module_loss, batch_stats, train=t),
             grad(function_loss, state, train=t)) for t in (True, False)]

  state = fresh
  for i in range(steps):
    x, dy = nc.x(seed=i, dtype=dtype), nc.cotangent(seed=10 + i, dtype=dtype)
    results = step(params, grad_stats, x, dy, batch_stats, state)
    for train, (module_out, function_out) in zip((True, False), results):
      (_, (y_m, bs_m)), g_m = module_out
      (_, (y_f, st_f)), g_f = function_out
      assert y_m.dtype == y_f.dtype == x.dtype
      chex.assert_shape(y_m, x.shape)
      chex.assert_tree_all_finite(y_m)
      chex.assert_trees_all_close(y_m, y_f, **TOL)
      # Grads wrt params and x, and the backward-stat updates (PowerNorm:
      # ema_gz, UN: ema_gz and bwd_window) equal the functional ones.
      chex.assert_trees_all_close(g_m, g_f, **TOL)
      chex.assert_trees_all_close(
          bs_m, {k: getattr(st_f, k) for k in batch_stats}, **TOL)
      if not train:
        chex.assert_trees_all_equal(bs_m, batch_stats)
    # Thread the training step's state through both.
    ((_, (_, batch_stats)), (_, updates, _)), ((_, (_, state)), _) = (
        results[0])
    if backward:  # a real update, not zero
      assert any(np.any(np.asarray(updates[k]) != 0) for k in backward)
    grad_stats = normjax.apply_backward_stats(grad_stats, updates)
    state = state._replace(**grad_stats)
  if batch_stats:  # the forward state moved
    assert any(not np.allclose(batch_stats[k], getattr(fresh, k))
               for k in batch_stats)


def test_identity_module():
  x = nc.x()
  module = nl.Identity()
  variables = module.init(jax.random.key(0), x)
  assert not variables
  chex.assert_trees_all_equal(module.apply(variables, x, True, mask=nc.mask()),
                              x)


# ---------------------------------------------------------------------------
# 3. Param trees, partitioning, collections.

EXPECTED_COLLECTIONS = {
    'layernorm': ({'scale', 'bias'}, set(), set()),
    'rmsnorm': ({'scale'}, set(), set()),
    'group_scaling': (set(), set(), set()),
    'batchnorm': ({'scale', 'bias'}, {'mean', 'var'}, set()),
    'paper_batchnorm': ({'scale', 'bias'}, {'running_mean', 'running_var'},
                        set()),
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
EXPECTED_COLLECTIONS.update({
    'derf': ({'alpha', 'shift', 'scale', 'bias'}, set(), set()),
    'seednorm': ({'alpha', 'beta', 'scale'}, set(), set()),
    'evonorm_b0': ({'v', 'scale', 'bias'}, {'var'}, set()),
    'bcn': ({'scale', 'bias', 'group_scale', 'group_bias'}, {'mean', 'var'},
            set()),
})
# Per-kind exceptions to PARAM_SHAPES / INIT_VALUES (names shared by norms).
KIND_PARAM_SHAPES = {
    'derf': {'shift': ((1,), (None,))},
    'seednorm': {'alpha': ((F,), ('embed',)), 'beta': ((F,), ('embed',))},
    'bcn': {'group_scale': ((2,), (None,)), 'group_bias': ((2,), (None,))},
}
KIND_INIT_VALUES = {'seednorm': {'alpha': 1.0, 'beta': 0.0},
                    'derf': {'shift': 0.0},
                    'bcn': {'group_scale': 1.0, 'group_bias': 0.0}}


@pytest.mark.parametrize('kind', sorted(EXPECTED_COLLECTIONS))
def test_param_tree_and_collections(kind):
  x = nc.x()
  options = {} if kind == 'none' else nc.module_options(kind)
  module = nl.make_norm(kind, **options)()
  boxed = _init(module, x, use_running_average=False)
  variables = nn.unbox(boxed)
  params, batch_stats, grad_stats = _split(variables)
  want_p, want_bs, want_gs = EXPECTED_COLLECTIONS[kind]
  assert set(variables) <= {'params', 'batch_stats', 'grad_stats'}
  assert set(params) == want_p
  assert set(batch_stats) == want_bs
  assert set(grad_stats) == want_gs
  shapes = {**PARAM_SHAPES, **KIND_PARAM_SHAPES.get(kind, {})}
  for name, v in params.items():
    chex.assert_shape(v, shapes.get(name, ((F,),))[0])
    assert v.dtype == jnp.float32
  if 'scale' in params:
    chex.assert_trees_all_equal(params['scale'], jnp.ones(F))
  if 'bias' in params:
    chex.assert_trees_all_equal(params['bias'], jnp.zeros(F))
  for name, value in {**INIT_VALUES,  # DyT's alpha_0, EvoNorm's v
                      **KIND_INIT_VALUES.get(kind, {})}.items():
    if name in params:
      chex.assert_trees_all_equal(params[name], jnp.full_like(params[name],
                                                              value))
  if kind != 'none':  # bf16 in -> bf16 out; `dtype` overrides
    x16 = x.astype(jnp.bfloat16)
    y16, y32 = jax.jit(lambda v, x: [m.apply(v, x, True) for m in (
        module, module.clone(dtype=jnp.float32))])(variables, x16)
    assert (y16.dtype, y32.dtype) == (jnp.bfloat16, jnp.float32)

  # Default: plain arrays, as flax (no LogicallyPartitioned boxes). With
  # param_axes=('embed',): features are 'embed'; windows (None, 'embed');
  # scalar counters replicated.
  assert jax.tree.structure(boxed) == jax.tree.structure(variables)
  if kind == 'none':
    return
  specs = nn.get_partition_spec(_init(module.clone(param_axes=('embed',)), x,
                                      use_running_average=False))
  for name in params:
    axes = shapes.get(name, (None, ('embed',)))[1]
    assert specs['params'][name] == jax.sharding.PartitionSpec(*axes)
  for collection in ('batch_stats', 'grad_stats'):
    for name, value in variables.get(collection, {}).items():
      want = {0: (), 1: ('embed',), 2: (None, 'embed')}[value.ndim]
      assert specs[collection][name] == jax.sharding.PartitionSpec(*want), (
          collection, name)


def test_param_dtype_and_dtype():
  x = nc.x(dtype=jnp.bfloat16)
  module = nl.LayerNorm(param_dtype=jnp.bfloat16, dtype=jnp.float32)
  variables = nn.unbox(module.init(jax.random.key(0), x))
  assert variables['params']['scale'].dtype == jnp.bfloat16
  assert module.apply(variables, x).dtype == jnp.float32
  assert nl.LayerNorm().apply(nn.unbox(nl.LayerNorm().init(
      jax.random.key(0), x)), x).dtype == jnp.bfloat16


# ---------------------------------------------------------------------------
# 4. use_running_average.


@pytest.mark.parametrize('kind', nc.STATEFUL)
def test_state_frozen_in_eval_and_at_init(kind):
  x = nc.x()
  module = nl.make_norm(kind, **nc.module_options(kind))()
  variables = nn.unbox(_init(module, x, use_running_average=False,
                             mask=nc.mask()))
  fresh = nf.init_state(kind, F, **nc.options(kind))
  _, batch_stats, grad_stats = _split(variables)
  # init does not update the running statistics, even in training mode.
  chex.assert_trees_all_equal(
      {**batch_stats, **grad_stats}, fresh._asdict())

  variables = dict(variables, batch_stats=_random_state(batch_stats))
  _, upd = jax.jit(functools.partial(
      module.apply, use_running_average=True, mask=nc.mask(),
      mutable=['batch_stats', 'grad_stats']))(variables, x)
  chex.assert_trees_all_equal(upd['batch_stats'], variables['batch_stats'])
  chex.assert_trees_all_equal(upd.get('grad_stats', {}),
                              variables.get('grad_stats', {}))
  # The constructor field works as well.
  module = nl.make_norm(kind, use_running_average=True,
                        **nc.module_options(kind))()
  _, upd = jax.jit(functools.partial(module.apply, mutable=['batch_stats']))(
      variables, x)
  chex.assert_trees_all_equal(upd['batch_stats'], variables['batch_stats'])


def _error(fn):
  with pytest.raises(ValueError) as info:
    fn()
  return str(info.value)


@pytest.mark.parametrize('kind', nc.STATEFUL)
def test_use_running_average_passed_exactly_once(kind):
  x = nc.x()
  key = jax.random.key(0)
  ours = functools.partial(nl.make_norm(kind), **nc.module_options(kind))
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
# 5. The train-step idiom, remat.


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
  x = nc.x(shape=(4, 5, 6))
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


@pytest.mark.parametrize('kind', ['batchnorm', 'powernorm', 'unified'])
def test_remat_module(kind):
  mod_opts = dict(nc.module_options(kind, **CUSTOM[kind][0]),
                  use_running_average=False)
  x, dy, mask = nc.x(), nc.cotangent(), nc.mask()
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
# 6. make_norm.


def test_make_norm_unknown_kind():
  with pytest.raises(ValueError, match=r"'fancynorm'.*layernorm"):
    nl.make_norm('fancynorm')


def test_make_norm_unknown_option():
  with pytest.raises(ValueError, match=r"'powernorm'.*\['warmup'\]"):
    nl.make_norm('powernorm', warmup=3)
  with pytest.raises(ValueError, match=r"\['momentum'\]"):
    nl.make_norm('layernorm', momentum=0.5)
