"""Sharded normjax == unsharded normjax, on 8 simulated CPU devices.

Every check runs a few training steps with the state threaded: a forward pass,
the gradient of sum(y * dy) with respect to x, the params and the backward-stat
leaves (PowerNorm's `ema_gz`, UN's `ema_gz`/`bwd_window`), and the update
`state <- apply_backward_stats(state, cotangents)`. It compares outputs, input
and parameter gradients, the new state and the cotangents.

  * `jax.jit` with x / mask / dy sharded P('data') and no `axis_name`
    (Explicit and Auto mesh axes): GSPMD computes global statistics.
  * `jax.shard_map(..., check_vma=True)` with `axis_name='data'`, the grad
    taken inside the body or outside the shard_map. Inside the body no psum
    is written for the param grads: the params enter replicated (invariant),
    so their grads come back invariant and already summed over devices (the
    transpose of the implicit pvary is a psum; an explicit psum would count
    every device 8 times). The backward-stat cotangents come back invariant
    because the custom bwd rules psum their row means over `axis_name`.
    (layer_norm/rms_norm reduce per token and run there without axis_name.)
  * `num_batch_groups=G` under the sharded jit == G separate unsharded runs
    on the batch slices, each with its own state slice.
The padding is uneven across devices; device 2 (rows 4, 5) holds no real token.
Run with `-s` to see the measured max |deviation| of every check.

`num_batch_groups` with a batch sharded over Explicit axes works when the
group count is a multiple of the devices (the state is resharded to follow the
groups) and otherwise raises a ValueError that names the fix.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import normjax
from normjax import functional as nf

B, T, C = 16, 6, 8
LENGTHS = np.array([6, 6, 5, 0, 0, 0, 3, 1, 6, 2, 4, 4, 1, 6, 2, 5])
MASK = np.arange(T)[None, :] < LENGTHS[:, None]  # True = real token

# id -> (registry kind, options, steps). Small warmups so that the warmup and
# the post-warmup paths (PowerNorm's running denominator; UN's window mean,
# geometric mean and compensation r != 1 for t > 4) are all hit.
CASES = {
    'batch_norm': ('batchnorm', dict(momentum=0.9), 4),
    'power_norm': ('powernorm', dict(warmup_steps=3, num_groups=2), 5),
    'power_norm_paper': ('powernorm', dict(
        warmup_steps=3, num_groups=2, backward_denominator='running',
        grad_mean_over='valid'), 5),
    'pn_v': ('pn_v', dict(num_groups=2), 4),
    'unified_norm': ('unified', dict(
        window_size=2, warmup_steps=3, compensation_delay=4), 6),
    'unified_norm_valid': ('unified', dict(
        window_size=2, warmup_steps=3, compensation_delay=4,
        mean_over='valid'), 6),
    'layer_norm': ('layernorm', {}, 2),
    'rms_norm': ('rmsnorm', {}, 2),
}
STATEFUL = [k for k in CASES if CASES[k][0] not in ('layernorm', 'rmsnorm')]
PER_TOKEN = ['layer_norm', 'rms_norm']
TOL = {'float32': 1e-5, 'float64': 1e-12}
F32, F64 = 'float32', 'float64'
EXPLICIT, AUTO = AxisType.Explicit, AxisType.Auto


@functools.cache
def make_mesh(axis_type=AxisType.Explicit):
  return jax.make_mesh((8,), ('data',), axis_types=(axis_type,))


def norm_call(case, axis_name=None, groups=1):
  """(x, mask, params, state) -> (y, new_state) for one case."""
  kind, options, _ = CASES[case]
  fn = nf.get_norm(kind)
  kw = dict(options, axis_name=axis_name)
  if groups != 1:
    kw['num_batch_groups'] = groups
  return lambda x, mask, params, state: fn(x, params, state, mask=mask, **kw)


def train_step(call, x, mask, dy, params, state):
  """One step: y, dx, dparams, backward-stat cotangents, threaded state."""
  stats = {f: getattr(state, f) for f in getattr(state, 'BACKWARD_FIELDS', ())}

  def loss(x, params, stats):
    y, new = call(x, mask, params, state._replace(**stats))
    return jnp.sum(y * dy), (y, new)

  (_, (y, new)), (dx, dparams, cot) = jax.value_and_grad(
      loss, argnums=(0, 1, 2), has_aux=True)(x, params, stats)
  new = new._replace(**normjax.apply_backward_stats(stats, cot))
  return dict(y=y, dx=dx, dparams=dparams, cotangents=cot, state=new)


def init(case, dtype, groups=1):
  kind, options, _ = CASES[case]
  rng = np.random.RandomState(0)
  params = {'scale': jnp.asarray(1 + 0.3 * rng.randn(C), dtype),
            'bias': jnp.asarray(0.1 * rng.randn(C), dtype)}
  if groups != 1:
    options = dict(options, num_batch_groups=groups)
  state = nf.init_state(kind, C, jnp.dtype(dtype), **options)
  return params, state


def batch(step, dtype):
  rng = np.random.RandomState(100 + step)
  x = (0.5 + 2 * rng.randn(B, T, C)) * np.linspace(0.5, 2, C)
  return x.astype(dtype), MASK, rng.randn(B, T, C).astype(dtype)


def run(step_fn, case, dtype, groups=1, put=lambda a: a,
        put_state=lambda s: s):
  """Threads the state through CASES[case] steps; returns per-step outputs."""
  params, state = init(case, dtype, groups)
  state, outs = put_state(state), []
  for i in range(CASES[case][2]):
    x, mask, dy = batch(i, dtype)
    out = step_fn(put(x), put(mask), put(dy), params, state)
    state = out['state']
    outs.append(jax.tree.map(np.asarray, out))
  return outs


def compare(got, want, dtype, label):
  """Asserts closeness and prints the max abs deviation per output kind."""
  devs = {}
  for key in want[0]:
    g, w = [jax.tree.leaves([o[key] for o in outs]) for outs in (got, want)]
    devs[key] = max((float(np.max(np.abs(a.astype(np.float64) - b), initial=0))
                     for a, b in zip(g, w)), default=0.0)
  print(f'\n[{label} {dtype}] max|dev| ' +
        ' '.join(f'{k}={v:.1e}' for k, v in devs.items()))
  tol = TOL[dtype]
  for step, (g, w) in enumerate(zip(got, want)):
    chex.assert_trees_all_close(g, w, atol=tol, rtol=tol,
                                custom_message=f'{label}, step {step + 1}')


@functools.cache
def reference_step(case):
  return jax.jit(functools.partial(train_step, norm_call(case)))


def reference(case, dtype):
  return run(reference_step(case), case, dtype)


def sharded(mesh, spec=P('data')):
  return lambda a: jax.device_put(a, NamedSharding(mesh, spec))


def params_with(cases, *rest):
  return [pytest.param(c, *rest, id='-'.join(
      [c] + [getattr(r, 'name', str(r)) for r in rest])) for c in cases]


# 1 + 4. jax.jit on a batch-sharded input, no axis_name. Auto axes for a few.
@pytest.mark.parametrize('case,axis_type', params_with(CASES, EXPLICIT) +
                         params_with(['power_norm', 'unified_norm'], AUTO))
def test_jit_sharded_matches_unsharded(case, axis_type, float_dtype):
  mesh = make_mesh(axis_type)
  with jax.set_mesh(mesh):
    got = run(reference_step(case), case, float_dtype, put=sharded(mesh))
  compare(got, reference(case, float_dtype), float_dtype,
          f'jit {axis_type.name} {case}')


@functools.cache
def shard_map_step(case, grad):
  data, rep = P('data'), P()
  # Per-token norms reduce over no token axis and take no axis_name.
  call = norm_call(case, axis_name=None if case in PER_TOKEN else 'data')
  if grad == 'grad_inside':  # the whole step is the body; no psum written
    return jax.jit(jax.shard_map(
        functools.partial(train_step, call), mesh=make_mesh(),
        in_specs=(data, data, data, rep, rep),
        out_specs=dict(y=data, dx=data, dparams=rep, cotangents=rep,
                       state=rep), check_vma=True))
  sm = jax.shard_map(call, mesh=make_mesh(), in_specs=(data, data, rep, rep),
                     out_specs=(data, rep), check_vma=True)
  return jax.jit(functools.partial(train_step, sm))


# 2. shard_map with axis_name='data': global statistics by psum.
@pytest.mark.parametrize('case,grad', params_with(CASES, 'grad_inside') + (
    params_with(['batch_norm', 'power_norm', 'unified_norm'], 'grad_outside')))
def test_shard_map_axis_name_matches_unsharded(case, grad, float_dtype):
  mesh = make_mesh()
  with jax.set_mesh(mesh):
    got = run(shard_map_step(case, grad), case, float_dtype,
              put=sharded(mesh))
  compare(got, reference(case, float_dtype), float_dtype,
          f'shard_map {grad} {case}')


@pytest.mark.parametrize('case', PER_TOKEN)
def test_per_token_norm_ignores_axis_name(case):
  x, _, _ = batch(0, F32)
  fn = nf.get_norm(CASES[case][0])
  body = lambda v: fn(v, axis_name='data')[0]
  with jax.set_mesh(make_mesh()):
    y = jax.jit(jax.shard_map(body, in_specs=P('data'), out_specs=P('data'),
                              check_vma=True))(sharded(make_mesh())(x))
  chex.assert_trees_all_close(y, fn(x)[0], atol=1e-5, rtol=1e-5)


def per_slice_reference(case, dtype, groups):
  """G independent unsharded runs on the batch slices, results re-assembled."""
  n = B // groups
  params, state = init(case, dtype, groups)
  states = [jax.tree.map(lambda v: v[g], state) for g in range(groups)]
  outs = []
  for i in range(CASES[case][2]):
    x, mask, dy = batch(i, dtype)
    parts = [reference_step(case)(x[g * n:(g + 1) * n], mask[g * n:(g + 1) * n],
                              dy[g * n:(g + 1) * n], params, states[g])
             for g in range(groups)]
    states = [p['state'] for p in parts]
    join = lambda key, f: jax.tree.map(lambda *a: f(a),
                                       *[p[key] for p in parts])
    outs.append(dict(y=join('y', np.concatenate), dx=join('dx', np.concatenate),
                     dparams=join('dparams', lambda a: np.sum(a, axis=0)),
                     cotangents=join('cotangents', np.stack),
                     state=join('state', np.stack)))
  return outs




def group_params(cases, groups, axis_type, dtypes):
  # With 8 groups each device holds its group's state; with 2, replicated.
  spec = P('data') if groups == 8 else P()
  return [pytest.param(c, groups, axis_type, spec, d,
                       id=f'{c}-G{groups}-{axis_type.name}-{d}')
          for c in cases for d in dtypes]


# 3. num_batch_groups: the official per-GPU statistics on any device count.
@pytest.mark.parametrize(
    'case,groups,axis_type,state_spec,float_dtype',
    group_params(STATEFUL, 8, EXPLICIT, [F64]) +
    group_params(['power_norm'], 8, EXPLICIT, [F32]) +
    group_params(['batch_norm', 'power_norm', 'pn_v', 'unified_norm'], 2, AUTO,
                 [F64]) +
    [pytest.param('power_norm', 8, EXPLICIT, P(), F32,
                  id='power_norm-G8-Explicit-replicated_state-float32')],
    indirect=['float_dtype'])
def test_batch_groups_match_separate_runs(case, groups, axis_type,
                                          state_spec, float_dtype):
  mesh = make_mesh(axis_type)
  step = jax.jit(functools.partial(train_step, norm_call(case, groups=groups)))
  with jax.set_mesh(mesh):
    got = run(step, case, float_dtype, groups, put=sharded(mesh),
              put_state=sharded(mesh, state_spec))
  want = per_slice_reference(case, float_dtype, groups)
  compare(got, want, float_dtype, f'groups={groups} {axis_type.name} {case}')


def test_batch_groups_that_do_not_fit_explicit_sharding_say_so():
  mesh = make_mesh(EXPLICIT)
  step = jax.jit(functools.partial(train_step, norm_call('power_norm',
                                                         groups=2)))
  with jax.set_mesh(mesh):
    with pytest.raises(ValueError, match='num_batch_groups.*Auto'):
      run(step, 'power_norm', F32, 2, put=sharded(mesh),
          put_state=sharded(mesh, P()))
