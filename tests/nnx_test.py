"""Tests of the Flax NNX modules of normjax (`normjax.nnx`).

1. Every registered norm has an nnx module with the linen name, its params
   as nnx.Param, forward statistics as nnx.BatchStat and backward-pass
   statistics as BackwardStat; train()/eval()/nnx.view; make_norm errors.
2. nnx == linen == functional, step by step over 12 training steps across
   PowerNorm's/UN's warmup with padding, for every stateful norm (y, param
   grads, every state leaf), then evaluation after model.eval(); stateless
   norms: nnx == functional for one step.
3. The train step: `value_and_grad` with nnx.Optimizer under nnx.jit (the
   statistics never reach the optimizer), nnx.vmap with axis_name,
   nnx.remat, nnx.split/merge, nnx.bridge both ways, the README example.
Run with `-s` to see the measured max |deviation| of the equivalence checks.
"""

import functools
import pathlib
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import norm_cases as nc
import normjax
from normjax import functional as nf
from normjax import linen as nl
from normjax import nnx as nnorm

B, T, C = nc.SHAPE
STEPS = 12
TOL = {jnp.float32: dict(atol=1e-6, rtol=1e-6),
       jnp.float64: dict(atol=1e-12, rtol=1e-12)}


def _options(kind):
  """The small-test options, with a warmup of 5 where the norm has one."""
  warmup = ({'warmup_steps': 5} if 'warmup_steps' in nc.definition(kind)
            .defaults else {})
  return nc.options(kind, **warmup)


def _model(kind, **fields):
  fields = {**nc.module_options(kind, **_options(kind)), **fields}
  return nnorm.make_norm(kind, **fields)(C, rngs=nnx.Rngs(0))


def _set_params(model, kind):
  """Random params (`norm_cases.params`) into `model`; returns them."""
  params = {k: v for k, v in nc.params(kind).items()
            if isinstance(getattr(model, k, None), nnx.Param)}
  for name, value in params.items():
    getattr(model, name)[...] = value
  return params


def _state_of(model):
  """Every state leaf of an nnx norm, by name."""
  flat = nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.BatchStat,
                                                    nnorm.BackwardStat)))
  return {path[-1]: v[...] for path, v in flat}


def _max_dev(a, b):
  return max((float(np.max(np.abs(np.asarray(x, np.float64) -
                                  np.asarray(y, np.float64))))
              for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))),
             default=0.0)


# ---------------------------------------------------------------------------
# 1. Modules, variable types, modes, make_norm.


def test_every_norm_has_an_nnx_module_named_as_in_linen():
  assert set(nnorm.MODULES) == set(nl.MODULES)
  for kind in nc.KINDS:
    cls = nnorm.MODULES[kind]
    assert cls.__name__ == nl.MODULES[kind].__name__
    assert getattr(nnorm, cls.__name__) is cls
    assert cls.__module__ == 'normjax.nnx'


def test_modules_are_live_over_the_registry(toy_norms):
  for kind in toy_norms:
    cls = nnorm.MODULES[kind]
    assert cls.definition is toy_norms[kind]
    assert nnorm.MODULES[kind] is cls  # made once


@pytest.mark.parametrize('kind', nc.KINDS)
def test_variable_types(kind):
  model = _model(kind)
  definition = nc.definition(kind)
  params = set(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  want = {n for n, use in (('scale', model.use_scale),
                           ('bias', model.use_bias)) if use}
  want |= {s.name for s in definition.extra_params
           if not s.enabled_by or getattr(model, s.enabled_by)}
  assert params == want
  fresh = nf.init_state(kind, C, **_options(kind))
  backward = set(definition.backward_stats)
  assert set(nnx.to_pure_dict(nnx.state(model, nnorm.BackwardStat))) == (
      backward)
  batch = set(nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))
  assert batch == set(getattr(fresh, '_fields', ())) - backward
  if definition.stateful:
    chex.assert_trees_all_equal(_state_of(model), fresh._asdict())
  assert not nnx.state(model, nnx.Not(nnx.Any(
      nnx.Param, nnx.BatchStat, nnorm.BackwardStat)))


def test_param_dtype_dtype_and_sharding_metadata():
  model = nnorm.LayerNorm(C, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16,
                          dtype=jnp.float32)
  assert model.scale.dtype == jnp.bfloat16
  assert model(nc.x(dtype=jnp.bfloat16)).dtype == jnp.float32
  assert nnorm.LayerNorm(C, rngs=nnx.Rngs(0))(
      nc.x(dtype=jnp.bfloat16)).dtype == jnp.bfloat16
  # Default: no annotation (as flax). With param_axes: nnx's out_sharding.
  plain = nnorm.PowerNorm(C, rngs=nnx.Rngs(0))
  assert 'out_sharding' not in plain.scale.get_metadata()
  with nnx.use_eager_sharding(False):
    sharded = nnorm.PowerNorm(C, rngs=nnx.Rngs(0), param_axes=('embed',))
    dyt = nnorm.DyT(C, rngs=nnx.Rngs(0), param_axes=('embed',))
  assert sharded.scale.get_metadata()['out_sharding'] == ('embed',)
  assert sharded.ema_gz.get_metadata()['out_sharding'] == ('embed',)
  assert sharded.step.get_metadata()['out_sharding'] == ()
  assert dyt.alpha.get_metadata()['out_sharding'] == (None,)
  specs = nnx.get_partition_spec(nnx.state(sharded))
  assert specs['running_phi'].get_value() == jax.sharding.PartitionSpec('embed')


def test_train_eval_and_view_toggle_use_running_average():
  class Block(nnx.Module):
    def __init__(self, rngs):
      self.norm = nnorm.PowerNorm(C, rngs=rngs)
      self.bn = nnx.BatchNorm(C, rngs=rngs)

  block = Block(nnx.Rngs(0))
  assert block.norm.use_running_average is False
  block.eval()
  assert block.norm.use_running_average is True
  block.train()
  assert block.norm.use_running_average is False
  view = nnx.view(block, use_running_average=True)
  assert view.norm.use_running_average and not block.norm.use_running_average


def test_use_running_average_must_be_given_somewhere():
  model = nnorm.BatchNorm(C, rngs=nnx.Rngs(0), use_running_average=None)
  with pytest.raises(ValueError, match='use_running_average'):
    model(nc.x())
  before = _state_of(model)
  model(nc.x(), use_running_average=True)  # the call's flag wins
  chex.assert_trees_all_equal(_state_of(model), before)


def test_make_norm_errors():
  with pytest.raises(ValueError, match=r"unknown norm kind 'powrnorm'.*"
                     r"'powernorm'"):
    nnorm.make_norm('powrnorm')
  with pytest.raises(ValueError, match=r"unknown options \['eps'\].*"
                     r"'epsilon'"):
    nnorm.make_norm('powernorm', eps=1e-3)
  with pytest.raises((TypeError, ValueError), match='layer_index'):
    nnorm.make_norm('layernorm_scaling')(C, rngs=nnx.Rngs(0))(nc.x())
  with pytest.raises(TypeError, match=r'unknown arguments \[.momentun.\]'):
    nnorm.BatchNorm(C, rngs=nnx.Rngs(0), momentun=0.9)
  norm = nnorm.make_norm('pn_v', num_groups=2, momentum=0.8)(
      C, rngs=nnx.Rngs(0))
  assert (norm.num_groups, norm.momentum) == (2, 0.8)
  assert isinstance(nnorm.make_norm('none')(C, rngs=nnx.Rngs(0)),
                    nnorm.Identity)


# ---------------------------------------------------------------------------
# 2. nnx == linen == functional.


def _loss(y, dy):
  return jnp.sum(y.astype(dy.dtype) * dy)


def _nnx_step(model, x, dy, mask):
  """One train step through `value_and_grad`: (y, param grads)."""
  grad_fn = nnorm.value_and_grad(
      lambda m, x: (lambda y: (_loss(y, dy), y))(m(x, mask=mask)),
      has_aux=True)
  (_, y), grads = grad_fn(model, x)
  return y, nnx.to_pure_dict(grads)


def _reference_steps(kind, train):
  """One jitted function: the linen and the functional step, each returning
  (y, param grads, new state as a dict with the backward updates added)."""
  linen = nl.make_norm(kind, **nc.module_options(kind, **_options(kind)))()
  fn = functools.partial(nf.get_norm(kind), **_options(kind))
  backward = nc.definition(kind).backward_stats

  def linen_loss(params, grad_stats, batch_stats, x, dy, mask):
    y, upd = linen.apply(
        {'params': params, 'batch_stats': batch_stats,
         'grad_stats': grad_stats}, x, use_running_average=not train,
        mask=mask, mutable=['batch_stats'])
    return _loss(y, dy), (y, upd['batch_stats'])

  def function_loss(params, grad_stats, state, x, dy, mask):
    y, new = fn(x, params, state._replace(**grad_stats), mask=mask,
                use_running_average=not train)
    return _loss(y, dy), (y, new._asdict())

  @jax.jit
  def steps(params, state, x, dy, mask):
    grad_stats = {k: getattr(state, k) for k in backward}
    batch_stats = {k: v for k, v in state._asdict().items()
                   if k not in backward}
    out = []
    for loss, st in ((linen_loss, batch_stats), (function_loss, state)):
      (_, (y, new)), (g, upd) = jax.value_and_grad(
          loss, argnums=(0, 1), has_aux=True)(params, grad_stats, st, x, dy,
                                              mask)
      new = {**new, **normjax.apply_backward_stats(grad_stats, upd)}
      out.append((y, g, new))
    return out
  return steps


@pytest.mark.parametrize('kind', nc.STATEFUL)
def test_stateful_nnx_equals_linen_equals_function(kind, float_dtype):
  dtype = jnp.dtype(float_dtype).type
  tol = TOL[dtype]
  model = _model(kind)
  params = _set_params(model, kind)
  state = nf.init_state(kind, C, **_options(kind))
  train_step, eval_step = (_reference_steps(kind, t) for t in (True, False))
  nnx_step = nnx.jit(_nnx_step)
  mask, dev = nc.mask(), 0.0
  for i in range(STEPS + 1):
    x = nc.x(seed=i, dtype=dtype)
    dy = nc.cotangent(seed=100 + i, dtype=dtype)
    if i == STEPS:
      model.eval()
    (y_l, g_l, st_l), (y_f, g_f, st_f) = (train_step if i < STEPS
                                          else eval_step)(
                                              params, state, x, dy, mask)
    before = _state_of(model)
    y_n, g_n = nnx_step(model, x, dy, mask)
    st_n = _state_of(model)
    assert y_n.dtype == y_l.dtype == x.dtype
    for ours, theirs in ((y_n, y_l), (y_n, y_f), (g_n, g_l), (g_n, g_f),
                         (st_n, st_l), (st_n, st_f)):
      chex.assert_trees_all_close(ours, theirs, **tol)
      dev = max(dev, _max_dev(ours, theirs))
    state = type(state)(**st_f)
    if i == STEPS:  # evaluation leaves every statistic as it was
      chex.assert_trees_all_equal(st_n, before)
  backward = nc.definition(kind).backward_stats
  fresh = nf.init_state(kind, C, **_options(kind))._asdict()
  for name in backward:  # the backward statistics moved
    assert not np.allclose(st_n[name], fresh[name]), name
  assert any(not np.allclose(st_n[k], fresh[k]) for k in fresh
             if k not in backward)
  print(f'\n{kind} {float_dtype}: nnx vs linen vs functional, max |dev| '
        f'{dev:.2e}')


def test_stateless_nnx_equals_function(stateless_kind):
  kind = stateless_kind
  model = _model(kind)
  params = _set_params(model, kind)
  x, dy, mask = nc.x(), nc.cotangent(), nc.mask()
  fn = functools.partial(nf.get_norm(kind), **nc.options(kind))

  def function_loss(params):
    y, _ = fn(x, params, mask=mask)
    return _loss(y, dy), y

  (_, y_f), g_f = jax.jit(jax.value_and_grad(function_loss, has_aux=True))(
      params)
  y_n, g_n = nnx.jit(_nnx_step)(model, x, dy, mask)
  chex.assert_trees_all_close(y_n, y_f, **TOL[jnp.float32])
  chex.assert_trees_all_close(g_n, g_f, **TOL[jnp.float32])


# ---------------------------------------------------------------------------
# 3. Train steps and transforms.


class _Tiny(nnx.Module):
  """A dense layer and a norm."""

  def __init__(self, kind, rngs):
    self.dense = nnx.Linear(C, C, rngs=rngs)
    self.norm = nnorm.make_norm(kind, **nc.module_options(
        kind, **_options(kind)))(C, rngs=rngs)

  def __call__(self, x, mask):
    return self.norm(self.dense(x), mask=mask)


def _tiny_loss(model, x, mask):
  return jnp.mean(jnp.square(model(x, mask) - 1.0))


def _optimizer_step(model, optimizer, x, mask):
  loss, grads = nnorm.value_and_grad(_tiny_loss)(model, x, mask)
  optimizer.update(model, grads)
  return loss


def test_jit_train_step_with_optimizer_equals_eager():
  models = [_Tiny('powernorm', nnx.Rngs(0)) for _ in range(2)]
  optimizers = [nnx.Optimizer(m, optax.adamw(1e-2), wrt=nnx.Param)
                for m in models]
  steps = (nnx.jit(_optimizer_step), _optimizer_step)
  losses = [step(m, o, nc.x(), nc.mask())  # eager is slow: one step
            for step, m, o in zip(steps, models, optimizers)]
  chex.assert_trees_all_close(*losses, **TOL[jnp.float32])
  chex.assert_trees_all_close(*(nnx.to_pure_dict(nnx.state(m))
                                for m in models), atol=1e-6, rtol=1e-5)
  assert np.any(np.asarray(models[0].norm.ema_gz[...]) != 0)
  # The optimizer holds moments of the params only.
  paths = {'/'.join(map(str, p)) for p, _ in nnx.to_flat_state(
      nnx.state(optimizers[0], nnx.OptState))}
  assert paths and not any(n in p for p in paths
                           for n in ('ema_gz', 'running_phi', 'step/'))


@pytest.mark.parametrize('kind', nc.STATEFUL)
def test_vmap_axis_name_equals_whole_batch(kind):
  """Statistics over the mapped axis == the unmapped whole-batch ones."""
  whole = _model(kind)
  mapped = _model(kind, axis_name='batch')

  def step(model, x, mask, dy):
    return _nnx_step(model, x, dy, mask)

  def mapped_step(model, x, mask, dy):
    y, grads = step(model, x, mask, dy)
    return y, jax.lax.psum(grads, 'batch')  # per-example grads, summed

  vstep = nnx.jit(nnx.vmap(mapped_step, in_axes=(None, 0, 0, 0),
                           out_axes=(0, None), axis_name='batch'))
  for i in range(2):
    args = (nc.x(seed=i), nc.mask(), nc.cotangent(seed=10 + i))
    chex.assert_trees_all_close(vstep(mapped, *args),
                                nnx.jit(step)(whole, *args),
                                atol=1e-6, rtol=1e-5)
    chex.assert_trees_all_close(_state_of(mapped), _state_of(whole),
                                atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize('kind', ['powernorm', 'unified'])
def test_remat_equals_plain(kind):
  models = [_model(kind) for _ in range(2)]

  def step(model, x, dy, mask, remat):
    call = lambda m, x: m(x, mask=mask)
    call = nnx.remat(call) if remat else call
    loss = lambda m, x: (lambda y: (_loss(y, dy), y))(call(m, x))
    return nnorm.value_and_grad(loss, has_aux=True)(model, x)

  step = nnx.jit(step, static_argnames='remat')
  for i in range(3):
    args = (nc.x(seed=i), nc.cotangent(seed=10 + i), nc.mask())
    chex.assert_trees_all_close(*(step(m, *args, remat=r)
                                  for m, r in zip(models, (True, False))),
                                **TOL[jnp.float32])
  chex.assert_trees_all_close(*map(_state_of, models), **TOL[jnp.float32])


def test_split_merge_round_trip_and_a_pure_jax_step():
  model = _model('powernorm')
  graphdef, params, stats, backward = nnx.split(
      model, nnx.Param, nnx.BatchStat, nnorm.BackwardStat)
  assert set(nnx.to_pure_dict(backward)) == {'ema_gz'}
  twin = nnx.merge(graphdef, params, stats, backward)
  assert isinstance(twin.ema_gz, nnorm.BackwardStat)

  @jax.jit
  def pure_step(state, x, dy, mask):  # jax.jit over nnx.split's state
    model = nnx.merge(graphdef, state)
    out = _nnx_step(model, x, dy, mask)
    return out, nnx.state(model)

  state = nnx.state(twin)
  for i in range(2):
    args = (nc.x(seed=i), nc.cotangent(seed=10 + i), nc.mask())
    out, state = pure_step(state, *args)
    chex.assert_trees_all_close(out, nnx.jit(_nnx_step)(model, *args),
                                **TOL[jnp.float32])
  chex.assert_trees_all_close(nnx.to_pure_dict(state),
                              nnx.to_pure_dict(nnx.state(model)),
                              **TOL[jnp.float32])


def test_bridge_linen_to_nnx_and_nnx_to_linen():
  """A linen PowerNorm wrapped by ToNNX trains like the nnx one (its
  grad_stats become BackwardStat); the nnx PowerNorm wrapped by ToLinen
  has the linen module's variables and outputs."""
  options = nc.module_options('powernorm', **_options('powernorm'))
  x, dy, mask = nc.x(), nc.cotangent(), nc.mask()
  wrapped = nnx.bridge.ToNNX(nl.PowerNorm(**options),  # no mesh needed
                             rngs=nnx.Rngs(0))
  nnx.bridge.lazy_init(wrapped, x, use_running_average=False, mask=mask)
  assert isinstance(wrapped.ema_gz, nnorm.BackwardStat)
  native = _model('powernorm')

  def step(model, x, **kwargs):
    loss = lambda m, x: (lambda y: (_loss(y, dy), y))(m(x, mask=mask,
                                                          **kwargs))
    out, grads = nnorm.value_and_grad(loss, has_aux=True)(model, x)
    return out, nnx.to_pure_dict(grads)

  for i in range(3):
    ours = step(native, x + i)
    theirs = step(wrapped, x + i, use_running_average=False,
                  mutable=['batch_stats'])
    chex.assert_trees_all_close(ours, theirs, **TOL[jnp.float32])
  chex.assert_trees_all_close(
      _state_of(native), _state_of(wrapped), **TOL[jnp.float32])

  linen = nl.PowerNorm(**options)
  to_linen = nnx.bridge.to_linen(nnorm.PowerNorm, C, **options)
  variables = nn.unbox(linen.init(jax.random.key(0), x,
                                  use_running_average=False))
  chex.assert_trees_all_equal_structs(
      to_linen.init(jax.random.key(0), x), variables)
  outs = [m.apply(variables, x, mask=mask, mutable=['batch_stats'], **kw)
          for m, kw in ((linen, dict(use_running_average=False)),
                        (to_linen, {}))]
  chex.assert_trees_all_close(*outs, **TOL[jnp.float32])


def test_sharded_step_on_8_devices_equals_unsharded():
  """nnx.jit with the batch sharded over 8 devices (uneven padding, one
  device without a real token), the model replicated: global statistics."""
  mesh = jax.make_mesh((8,), ('data',),
                       axis_types=(jax.sharding.AxisType.Explicit,))
  put = lambda a: jax.device_put(a, jax.NamedSharding(
      mesh, jax.P('data')))
  models = [_model('unified') for _ in range(2)]
  mask = jnp.arange(T)[None, :] < jnp.array([3, 3, 2, 0, 1, 3, 2, 3])[:, None]
  step = nnx.jit(_nnx_step)
  for i in range(2):
    x = nc.x(seed=i, shape=(8, T, C))
    dy = nc.cotangent(seed=10 + i, shape=(8, T, C))
    with jax.set_mesh(mesh):
      sharded = step(models[0], put(x), put(dy), put(mask))
    chex.assert_trees_all_close(sharded, step(models[1], x, dy, mask),
                                atol=1e-6, rtol=1e-5)
  assert sharded[0].sharding.spec[0] == 'data'
  chex.assert_trees_all_close(*map(_state_of, models), atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------
# The README's nnx example, and the same model with nnx.LayerNorm.

ROOT = pathlib.Path(__file__).resolve().parent.parent
# The lines the README's example changes against the LayerNorm version.
TO_LAYERNORM = {
    'from normjax import nnx as nnorm\n': '',
    'nnorm.PowerNorm(dim, num_groups=4, warmup_steps=8000, rngs=rngs)':
        'nnx.LayerNorm(dim, rngs=rngs)',
    'self.norm(x, mask=mask)': 'self.norm(x)',
    'nnorm.value_and_grad(loss_fn)': 'nnx.value_and_grad(loss_fn)',
}


def _readme_example():
  text = (ROOT / 'README.md').read_text()
  return re.search(r'## Flax NNX\n.*?```python\n(.*?)```', text,
                   re.S).group(1)


def _run(code):
  scope = {}
  exec(code, scope)  # pylint: disable=exec-used
  x = jnp.asarray(nc.normal(0, (2, 5, 64)))
  mask = jnp.arange(5)[None, :] < jnp.array([[5], [3]])
  losses = [float(scope['train_step'](scope['model'], scope['optimizer'],
                                      x, mask)) for _ in range(3)]
  assert losses[-1] < losses[0]
  return scope['model']


def test_readme_example_trains_and_differs_from_layernorm_by_4_lines():
  code = _readme_example()
  model = _run(code)
  assert isinstance(model.norm.ema_gz, nnorm.BackwardStat)
  assert np.any(np.asarray(model.norm.ema_gz[...]) != 0)
  layernorm_code = code
  for ours, theirs in TO_LAYERNORM.items():
    assert code.count(ours) == 1, ours
    layernorm_code = layernorm_code.replace(ours, theirs)
  assert isinstance(_run(layernorm_code).norm, nnx.LayerNorm)
  assert len(TO_LAYERNORM) == 4
