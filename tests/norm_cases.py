"""The slot norms under test, read from the registry, and what tests need of them.

* `OPTIONS`: THE per-norm options for small tests (C = 8 features, a few
  steps): group counts that divide 8, short warmups and windows, LayerNorm
  Scaling's required `layer_index`. Kinds not listed use their record's
  defaults. Import it; do not copy it.
* Inputs (`x`, `mask`, `cotangent`, `params` with the record's extra
  parameters), `call` and `train_grads` to run any registered norm.
* `TOYS`: two small norms written in the tests (a stateless centring norm and
  a stateful running-mean norm with an evaluation affine map); the
  `toy_norms` fixture of conftest registers them for one test. Their NumPy
  references are in reference.py.
"""

import functools
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import reference  # tests/reference.py

import normjax
from normjax import functional as nf
from normjax._src import common
from normjax._src import definition as nd

B, T, C = 2, 3, 8
SHAPE = (B, T, C)

OPTIONS: dict[str, dict[str, Any]] = {
    'group_scaling': dict(num_groups=2),
    'pn_v': dict(num_groups=2),
    'powernorm': dict(num_groups=2, warmup_steps=2),
    # 'valid': pads enter no statistic, as for every other norm (the official
    # 'padded' mode is tested in unified_norm_test and exactness_test).
    'unified': dict(window_size=2, warmup_steps=2, compensation_delay=2,
                    mean_over='valid'),
    'groupnorm': dict(num_groups=2),
    'evonorm_s0': dict(num_groups=2),
    'layernorm_scaling': dict(layer_index=3),
    'bcn': dict(num_groups=2),
    # The official defaults fit; a faster decay moves the running stats more.
    'paper_batchnorm': dict(momentum=0.8),
}
KINDS = sorted(nd.REGISTRY)  # the built-in norms, before any toy registers
STATEFUL = [k for k in KINDS if nd.REGISTRY[k].stateful]


def definition(kind: str) -> nd.NormDefinition:
  return nd.REGISTRY[kind]


def options(kind: str, **overrides: Any) -> dict[str, Any]:
  """The small-test options of `kind`, updated with `overrides`."""
  return {**OPTIONS.get(kind, {}), **overrides}


def module_options(kind: str, **overrides: Any) -> dict[str, Any]:
  """`options(kind, ...)` under the module's field names (eps -> epsilon)."""
  fields = {o.name: o.module_field for o in definition(kind).options}
  return {fields[k]: v for k, v in options(kind, **overrides).items()}


# ---------------------------------------------------------------------------
# Inputs. NumPy random numbers: eager jax.random ops would compile per shape.


def normal(seed: int, shape) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def x(seed: int = 0, shape=SHAPE, dtype=jnp.float32) -> jax.Array:
  return jnp.asarray(2.0 * normal(seed, shape) + 0.5, dtype)


def cotangent(seed: int = 7, shape=SHAPE, dtype=jnp.float32) -> jax.Array:
  return jnp.asarray(normal(seed, shape), dtype)


def mask() -> jax.Array:
  return jnp.array([[True, True, False], [True, True, True]])


def params(kind: str, seed: int = 3, features: int = C,
           dtype=jnp.float32) -> dict[str, jax.Array]:
  """Random `scale`, `bias` and the record's extra parameters (alpha, v)."""
  out = {'scale': 1.0 + 0.3 * normal(seed, (features,)),
         'bias': 0.3 * normal(seed + 1, (features,))}
  resolved = definition(kind).resolve(options(kind))
  for i, spec in enumerate(definition(kind).extra_params):
    shape = spec.layout(features, None, resolved)[0]  # BCN's: [num_groups]
    out[spec.name] = (np.full((1,), 0.8) if spec.shape == 'one' else
                      1.0 + 0.5 * normal(seed + 2 + i, shape))
  return {k: jnp.asarray(v, dtype) for k, v in out.items()}


def state(kind: str, features: int = C, dtype=jnp.float32,
          **overrides: Any) -> Any:
  return nf.init_state(kind, features, dtype, **options(kind, **overrides))


_DEFAULT: Any = object()


def call(kind, x, params=_DEFAULT, state=_DEFAULT, mask=None, *, jit=False,
         **overrides):
  """`FUNCTIONS[kind]` with the test options (updated by `overrides`)."""
  opts = options(kind, **overrides)
  params = globals()['params'](kind) if params is _DEFAULT else params
  if state is _DEFAULT:
    state = nf.init_state(kind, C, **options(kind))
  fn = nf.FUNCTIONS[kind]

  def run(x, params, state, mask):
    return fn(x, params, state, mask=mask, **opts)

  return (jax.jit(run) if jit else run)(x, params, state, mask)


def backward_stats(kind: str, state: Any) -> dict[str, jax.Array]:
  return {k: getattr(state, k) for k in definition(kind).backward_stats}


def train_grads(kind, x, params, state, mask, dy, *, jit=True, **overrides):
  """d sum(y * dy) / d(x, params, backward statistics), and (y, new state).

  Returns `((dx, dparams, dbackward), (y, new_state))`; the new state's
  backward statistics are `state`'s (fold `dbackward` in with
  `normjax.apply_backward_stats`).
  """
  fn, opts = nf.FUNCTIONS[kind], options(kind, **overrides)

  def run(x, params, backward, mask):
    def loss(x, params, backward):
      y, new = fn(x, params, state._replace(**backward), mask=mask, **opts)
      return jnp.sum(y.astype(dy.dtype) * dy), (y, new)
    return jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(x, params,
                                                           backward)

  run = jax.jit(run) if jit else run
  return run(x, params, backward_stats(kind, state), mask)


@functools.cache
def trained_state(kind: str, steps: int = 3) -> Any:
  """The state after `steps` training steps on real data (past warmup)."""
  st = state(kind)
  step = jax.jit(lambda st, x, dy: _step(kind, st, x, dy))
  for i in range(steps):
    st = step(st, x(seed=10 + i), cotangent(seed=20 + i))
  return st


def _step(kind, st, x, dy):
  (_, _, dback), (_, new) = train_grads(kind, x, params(kind), st, mask(),
                                        dy, jit=False)
  return new._replace(**normjax.apply_backward_stats(
      backward_stats(kind, st), dback))


def check_reference(kind: str, x: jax.Array, *, atol: float, rtol: float,
                    dx_atol: float | None = None) -> None:
  """One training step from a fresh state == `reference.REFERENCES[kind]`:
  y, dx, the new state and the backward statistics' updates."""
  if kind not in reference.REFERENCES:
    raise AssertionError(
        f'{kind!r} has no NumPy reference: add one to REFERENCES in '
        'tests/reference.py.')
  p, dy, m = params(kind, dtype=x.dtype), cotangent(6, dtype=x.dtype), mask()
  (dx, _, dback), (y, new) = train_grads(kind, x, p, state(kind, dtype=x.dtype),
                                         m, dy)
  chex.assert_tree_all_finite((y, dx, dback, new))
  rows = lambda a: np.asarray(a, np.float64).reshape(-1, C)
  # References that need the token layout (EvoNorm-B0's per-example
  # statistics) say so with a `token_shape` attribute.
  layout = ({'token_shape': tuple(x.shape[:-1])} if getattr(
      reference.REFERENCES[kind], 'token_shape', False) else {})
  want = reference.REFERENCES[kind](
      rows(x), np.asarray(m).reshape(-1), rows(dy),
      {k: np.asarray(v, np.float64) for k, v in p.items()},
      definition(kind).resolve(options(kind)), **layout)
  close = functools.partial(np.testing.assert_allclose, atol=atol, rtol=rtol)
  close(rows(y), want.y, err_msg='y')
  close(rows(dx), want.dx, err_msg='dx', atol=dx_atol or atol)
  for name, value in want.state.items():
    close(np.asarray(getattr(new, name)), value, err_msg=f'state.{name}')
  for name, value in want.backward.items():
    close(np.asarray(dback[name]), value, err_msg=f'update of {name}')


# ---------------------------------------------------------------------------
# Toy norms: each is one record, and gets a function, a linen module, a
# registry entry, `init_state` and (with its eval_affine) folding.


def _toy_center(x, params, state, *, mask, use_running_average, axis_name,
                center):
  """y = (x - mean(x)) * scale + bias over the features of each token."""
  del use_running_average, axis_name
  fn = 'toy_center'
  x = common.check_input(x, fn)
  params = common.check_params(params, x.shape[-1], fn)
  common.check_mask(mask, x, fn)
  dtype = common.stats_dtype(x)
  z = x.astype(dtype)
  if center:
    z = z - jnp.mean(z, axis=-1, keepdims=True)
  return common.affine(z, params, dtype).astype(x.dtype), state


TOY_CENTER = nd.NormDefinition(
    kind='toy_center', name='toy_center', module='ToyCenter',
    options=(nd.Option('center', True, 'subtract the mean of the token.'),),
    doc='A toy: y = (x - mean(x)) * scale + bias.', apply=_toy_center,
    eval_affine=lambda params, state, options, xp: nd.EvalAffine(
        scale=params['scale'], center=None, bias=params['bias'],
        core=('toy_center', dict(options))))


class ToyRunningMeanState(NamedTuple):
  mean: jax.Array


def _toy_running_mean_init(features, dtype, options):
  return common.group_state(
      ToyRunningMeanState(mean=jnp.zeros((features,), dtype)),
      options['num_batch_groups'])


def _toy_running_mean_train(x, mask, state, params, options, axis_name):
  """y = (x - batch mean) * scale + bias; mean <- m mean + (1 - m) batch mean."""
  dtype = common.stats_dtype(x)
  xs = x.astype(dtype)
  batch_mean, count = common.masked_row_mean(xs, mask, axis_name)
  has_data = count > 0
  batch_mean = jnp.where(has_data, batch_mean, state.mean.astype(dtype))
  y = common.affine(xs - common.feat(batch_mean, x.ndim), params, dtype)
  m = options['momentum']
  new = ToyRunningMeanState(
      mean=m * state.mean + (1 - m) * jax.lax.stop_gradient(batch_mean))
  return y, common.keep_if(has_data, new, state)


TOY_RUNNING_MEAN = nd.NormDefinition(
    kind='toy_running_mean', name='toy_running_mean', module='ToyRunningMean',
    options=(nd.Option('momentum', 0.9, 'decay of the running mean.'),
             nd.Option('eps', 1e-5, 'unused; renamed in the module.',
                       field='epsilon'),
             nd.Option('num_batch_groups', 1, 'virtual batch groups.')),
    doc='A toy: y = (x - mean over the batch) * scale + bias.',
    train=_toy_running_mean_train, init_state=_toy_running_mean_init,
    eval_affine=lambda params, state, options, xp: nd.EvalAffine(
        scale=params['scale'], center=state.mean, bias=params['bias'],
        core=('none', {})),
    probe=lambda x, state, options: (x, {'mean': state.mean}),
    state_maker='init_state')

TOYS = {d.kind: d for d in (TOY_CENTER, TOY_RUNNING_MEAN)}
