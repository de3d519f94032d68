"""normjax.optim: AdamP and NaP against NumPy re-statements of the papers'
update rules (zoo spec §12), in float64."""

import conftest
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from normjax import optim
from normjax import linen as nnorm


# ---------------------------------------------------------------------------
# NumPy references.


def np_rows(x, view):
  if view == 'channel':
    return np.moveaxis(x, -1, 0).reshape(x.shape[-1], -1)
  return x.reshape(1, -1)


def np_unrows(rows, like, view):
  if view == 'channel':
    return np.moveaxis(rows.reshape((like.shape[-1],) + like.shape[:-1]),
                       0, -1)
  return rows.reshape(like.shape)


def np_adamp(params, grads_seq, lr, b1=0.9, b2=0.999, eps=1e-8, wd=0.0,
             delta=0.1, wd_ratio=0.1, nesterov=False):
  """AdamP's step, one tensor at a time (clovaai/AdamP's Algorithm, flax
  layout: output units on the last axis). Returns params after each step
  and the views used ('none', 'channel', 'layer') per step and leaf."""
  params = {k: np.array(v, np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in params.items()}
  v2 = {k: np.zeros_like(v) for k, v in params.items()}
  history, views = [], []
  for t, grads in enumerate(grads_seq, start=1):
    lr_t = lr[t - 1] if isinstance(lr, (list, tuple)) else lr
    used = {}
    for k, p in params.items():
      g = np.asarray(grads[k], np.float64)
      m[k] = b1 * m[k] + (1 - b1) * g
      v2[k] = b2 * v2[k] + (1 - b2) * g * g
      denom = np.sqrt(v2[k]) / np.sqrt(1 - b2 ** t) + eps
      u = ((b1 * m[k] + (1 - b1) * g) if nesterov else m[k]) / denom
      factor, used[k] = 1.0, 'none'
      if p.ndim > 1:
        for view in ('channel', 'layer'):
          gr, pr = np_rows(g, view), np_rows(p, view)
          cos = np.abs(np.sum(gr * pr, 1) / (
              np.maximum(np.linalg.norm(gr, axis=1), eps)
              * np.maximum(np.linalg.norm(pr, axis=1), eps)))
          if cos.max() < delta / np.sqrt(pr.shape[1]):
            unit = pr / (np.linalg.norm(pr, axis=1, keepdims=True) + eps)
            ur = np_rows(u, view)
            ur = ur - unit * np.sum(unit * ur, 1, keepdims=True)
            u = np_unrows(ur, u, view)
            factor, used[k] = wd_ratio, view
            break
      p = p * (1 - lr_t * wd * factor)
      params[k] = p - lr_t / (1 - b1 ** t) * u
    history.append({k: v.copy() for k, v in params.items()})
    views.append(used)
  return history, views


def run_tx(tx, params, grads_seq):
  params = jax.tree.map(jnp.asarray, params)
  state = tx.init(params)

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  out = []
  for grads in grads_seq:
    params, state = step(params, state, jax.tree.map(jnp.asarray, grads))
    out.append(jax.tree.map(np.asarray, params))
  return out


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def radial_free(p, rng, view):
  """A gradient orthogonal to every row of p in `view` (the gradient of a
  loss through a norm of p's output: scale-invariant), plus tiny noise."""
  g = rng.normal(size=p.shape)
  pr, gr = np_rows(p, view), np_rows(g, view)
  gr = gr - pr * np.sum(pr * gr, 1, keepdims=True) / np.sum(
      pr * pr, 1, keepdims=True)
  return np_unrows(gr, p, view)


def mixed_problem(seed=0, steps=6):
  """A 2-D kernel with channel-orthogonal gradients, a 3-D kernel with
  layer-orthogonal ones, a plain 2-D kernel and a 1-D bias."""
  rng = np.random.default_rng(seed)
  params = {'inv_kernel': rng.normal(size=(6, 4)),
            'inv3d': rng.normal(size=(5, 2, 3)),
            'kernel': rng.normal(size=(4, 3)),
            'bias': rng.normal(size=(4,))}
  grads_seq = []
  for _ in range(steps):
    grads_seq.append({
        'inv_kernel': radial_free(params['inv_kernel'], rng, 'channel'),
        'inv3d': radial_free(params['inv3d'], rng, 'layer'),
        'kernel': params['kernel'] + 0.1 * rng.normal(size=(4, 3)),
        'bias': rng.normal(size=(4,))})
  return params, grads_seq


# ---------------------------------------------------------------------------
# AdamP.


@pytest.mark.parametrize('nesterov', [False, True])
@pytest.mark.parametrize('schedule', [False, True])
def test_adamp_matches_the_reference_over_steps(nesterov, schedule):
  """Gradients come from a fixed sequence; for the invariant leaves they
  are orthogonal to the weights they were drawn for, and the weights
  move, so the views chosen can change over the steps."""
  with jax.enable_x64(True):
    params, grads_seq = mixed_problem()
    lr, wd = 0.05, 0.3
    hist, views = np_adamp(params, grads_seq, lr, wd=wd, nesterov=nesterov)
    learning_rate = (lambda count: lr * jnp.ones_like(count, jnp.float64)
                     ) if schedule else lr
    got = run_tx(optim.adamp(learning_rate, weight_decay=wd,
                             nesterov=nesterov), params, grads_seq)
    worst = max(rel(g[k], h[k]) for g, h in zip(got, hist) for k in h)
    conftest.record_deviation('adamp vs numpy reference (f64, 6 steps)',
                              worst)
    assert worst <= 1e-12, worst
    used = {k for v in views for k, w in v.items() if w != 'none'}
    assert views[0] == {'inv_kernel': 'channel', 'inv3d': 'layer',
                        'kernel': 'none', 'bias': 'none'}, views[0]
    assert used >= {'inv_kernel', 'inv3d'}


def test_adamp_schedule_is_read_at_the_pre_step_count():
  """lr_t = schedule(count before the step), as optax's schedules."""
  with jax.enable_x64(True):
    params, grads_seq = mixed_problem(steps=3)
    lrs = [0.1, 0.05, 0.02]
    sched = lambda count: jnp.asarray(lrs, jnp.float64)[count]
    got = run_tx(optim.adamp(sched, weight_decay=0.2), params, grads_seq)
    hist, _ = np_adamp(params, grads_seq, lrs, wd=0.2)
    worst = max(rel(g[k], h[k]) for g, h in zip(got, hist) for k in h)
    assert worst <= 1e-12, worst


def test_adamp_projection_fires_exactly_below_the_threshold():
  """|cos| = delta / sqrt(n) * (1 -+ 1e-6): projected just below, plain Adam
  just above; the channel view is tried first, the layer view second."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(1)
    p = rng.normal(size=(8, 3))            # 3 output units, rows of 8
    u = rng.normal(size=p.shape)
    delta = 0.1

    def with_cos(target):
      g = radial_free(p, rng, 'channel')
      pr, gr = np_rows(p, 'channel'), np_rows(g, 'channel')
      unit_p = pr / np.linalg.norm(pr, axis=1, keepdims=True)
      unit_g = gr / np.linalg.norm(gr, axis=1, keepdims=True)
      rows = target * unit_p + np.sqrt(1 - target ** 2) * unit_g
      return np_unrows(rows, p, 'channel')

    for factor, expect in ((1 - 1e-6, 1), (1 + 1e-6, 2)):
      # every channel row at |cos| = factor * delta / sqrt(8): the channel
      # view fires below; above it, the layer view (threshold
      # delta/sqrt(24)) sees cos ~ delta/sqrt(8) and does not fire either.
      g = with_cos(factor * delta / np.sqrt(8))
      out, wd, view = optim.adamp_projection(
          jnp.asarray(p), jnp.asarray(g), jnp.asarray(u), delta=delta,
          wd_ratio=0.1, eps=1e-8)
      if expect == 1:
        assert int(view) == 1 and float(wd) == 0.1
        # radial component gone up to eps/|p_row|
        rows_out, rows_p = np_rows(np.asarray(out), 'channel'), np_rows(
            p, 'channel')
        radial = np.sum(rows_out * rows_p, 1) / np.linalg.norm(rows_p,
                                                                axis=1)
        assert np.max(np.abs(radial)) <= 1e-7 * np.max(np.abs(u))
      else:
        assert int(view) == 0 and float(wd) == 1.0
        np.testing.assert_array_equal(np.asarray(out), u)


def test_adamp_layer_view_when_channel_view_fails():
  with jax.enable_x64(True):
    rng = np.random.default_rng(2)
    p = rng.normal(size=(4, 5, 3))
    g = radial_free(p, rng, 'layer')   # orthogonal as a whole, not per row
    u = rng.normal(size=p.shape)
    out, wd, view = optim.adamp_projection(
        jnp.asarray(p), jnp.asarray(g), jnp.asarray(u), delta=0.1,
        wd_ratio=0.25, eps=1e-8)
    assert int(view) == 2 and float(wd) == 0.25
    assert abs(np.sum(np.asarray(out) * p)) <= 1e-7 * np.linalg.norm(p) * \
        np.linalg.norm(u)


def test_adamp_without_projection_is_adamw():
  """1-D params and gradients far from orthogonal: optax.adamw exactly."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(3)
    params = {'w': rng.normal(size=(5, 4)), 'b': rng.normal(size=(4,))}
    grads_seq = [{'w': params['w'] * 2 + 0.01 * rng.normal(size=(5, 4)),
                  'b': rng.normal(size=(4,))} for _ in range(5)]
    sched = optax.cosine_decay_schedule(0.01, 10)
    a = run_tx(optim.adamp(sched, weight_decay=0.1), params, grads_seq)
    b = run_tx(optax.adamw(sched, weight_decay=0.1), params, grads_seq)
    worst = max(rel(x[k], y[k]) for x, y in zip(a, b) for k in params)
    conftest.record_deviation('adamp vs optax.adamw, no projection (f64)',
                              worst)
    assert worst <= 1e-12, worst


def test_adamp_keeps_the_norm_of_a_scale_invariant_kernel_to_second_order():
  """A Dense kernel followed by LayerNorm: the projection fires every step
  and ||W|| grows only at second order (<Delta W, W> = 0 up to eps)."""
  with jax.enable_x64(True):
    model = nn.Sequential([nn.Dense(16, use_bias=False),
                           nnorm.LayerNorm(use_scale=False, use_bias=False)])
    x = jax.random.normal(jax.random.key(0), (32, 8), jnp.float64)
    y = jax.random.normal(jax.random.key(1), (32, 16), jnp.float64)
    params = model.init(jax.random.key(2), x)['params']
    loss = lambda p: jnp.mean((model.apply({'params': p}, x) - y) ** 2)
    tx = optim.adamp(1e-2)
    state = tx.init(params)
    for _ in range(5):
      g = jax.grad(loss)(params)
      updates, state = tx.update(g, state, params)
      w = params['layers_0']['kernel']
      dw = updates['layers_0']['kernel']
      cos = float(jnp.sum(w * dw) / (jnp.linalg.norm(w) * jnp.linalg.norm(dw)))
      assert abs(cos) < 1e-6, cos
      params = optax.apply_updates(params, updates)


# ---------------------------------------------------------------------------
# NaP.


def test_nap_keeps_norms_and_matches_the_reference():
  with jax.enable_x64(True):
    params, grads_seq = mixed_problem(seed=4)
    lr = 0.05
    mask = {'inv_kernel': True, 'inv3d': True, 'kernel': False,
            'bias': False}
    tx = optax.chain(optax.adam(lr), optim.nap_project(mask))
    got = run_tx(tx, params, grads_seq)
    base = run_tx(optax.adam(lr), params, grads_seq[:1])[0]
    # The reference, step by step: Adam's step from the projected params,
    # then the projection p' r0 / ||p'||.
    adam = optax.adam(lr)
    state = adam.init(jax.tree.map(jnp.asarray, params))
    p = {k: np.array(v) for k, v in params.items()}
    r0 = {k: np.linalg.norm(v) for k, v in params.items()}
    worst = worst_norm = 0.0
    for grads, out in zip(grads_seq, got):
      u, state = adam.update(jax.tree.map(jnp.asarray, grads), state)
      for k in p:
        new = p[k] + np.asarray(u[k])
        p[k] = new * r0[k] / np.linalg.norm(new) if mask[k] else new
        worst = max(worst, rel(out[k], p[k]))
        if mask[k]:
          worst_norm = max(worst_norm,
                           abs(np.linalg.norm(out[k]) / r0[k] - 1))
    conftest.record_deviation('nap vs numpy reference (f64)', worst)
    conftest.record_deviation('nap norm drift (f64, relative)', worst_norm)
    assert worst <= 1e-12, worst
    assert worst_norm <= 1e-12, worst_norm
    # Unmasked leaves: plain Adam.
    assert rel(got[0]['kernel'], base['kernel']) <= 1e-15


def test_nap_mask_forms_and_default():
  with jax.enable_x64(True):
    params, grads_seq = mixed_problem(seed=5, steps=3)
    by_tree = run_tx(optax.chain(optax.sgd(0.1), optim.nap_project(
        {'inv_kernel': True, 'inv3d': False, 'kernel': True,
         'bias': False})), params, grads_seq)
    by_path = run_tx(optax.chain(optax.sgd(0.1), optim.nap_project(
        optim.mask_by_path(r'^(inv_kernel|kernel)$'))), params, grads_seq)
    by_default = run_tx(optax.chain(optax.sgd(0.1), optim.nap_project()),
                        params, grads_seq)
    for k in params:
      np.testing.assert_array_equal(by_tree[-1][k], by_path[-1][k])
    for k, v in params.items():
      r = np.linalg.norm(v)
      if k != 'bias':
        assert abs(np.linalg.norm(by_default[-1][k]) / r - 1) <= 1e-12
    assert abs(np.linalg.norm(by_default[-1]['bias'])
               / np.linalg.norm(params['bias']) - 1) > 1e-6


def test_nap_float32_norms_and_training():
  """float32, jitted, a Dense kernel feeding a LayerNorm: its norm stays
  within 1e-6 of the initial one while the loss goes down."""
  model = nn.Sequential([nn.Dense(16), nnorm.LayerNorm(), nn.Dense(4)])
  x = jax.random.normal(jax.random.key(0), (32, 8))
  y = jax.random.normal(jax.random.key(1), (32, 4))
  params = model.init(jax.random.key(2), x)['params']
  loss = lambda p: jnp.mean((model.apply({'params': p}, x) - y) ** 2)
  tx = optax.chain(optax.adam(1e-2), optim.nap_project(
      optim.mask_by_path(r'layers_0/kernel$')))
  state = tx.init(params)
  r0 = float(jnp.linalg.norm(params['layers_0']['kernel']))

  @jax.jit
  def step(params, state):
    u, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, u), state

  first = float(loss(params))
  for _ in range(20):
    params, state = step(params, state)
    drift = abs(float(jnp.linalg.norm(params['layers_0']['kernel'])) / r0
                - 1)
    assert drift <= 1e-6, drift
  assert float(loss(params)) < first


def test_nap_projection_does_not_change_a_scale_invariant_output():
  with jax.enable_x64(True):
    model = nn.Sequential([nn.Dense(16, use_bias=False), nnorm.LayerNorm(),
                           nn.Dense(4)])
    x = jax.random.normal(jax.random.key(0), (32, 8), jnp.float64)
    params = model.init(jax.random.key(2), x)['params']
    scaled = jax.tree.map(lambda v: v, params)
    scaled['layers_0'] = {'kernel': params['layers_0']['kernel'] * 3.7}
    a = model.apply({'params': params}, x)
    b = model.apply({'params': scaled}, x)
    # LayerNorm's eps makes it invariant up to eps/var.
    assert float(jnp.max(jnp.abs(a - b))) <= 1e-4


def test_optimizers_jit_and_need_params():
  params = {'w': jnp.ones((3, 2))}
  for tx in (optim.adamp(), optim.nap_project()):
    state = tx.init(params)
    with pytest.raises(ValueError, match='needs params'):
      tx.update(params, state)
    jax.jit(tx.update)(params, state, params)


# ---------------------------------------------------------------------------
# The experiments' optimizer config (optim.kind, optim.nap).


# adamp_nap (both transforms) in the default suite, the rest in the slow step.
@pytest.mark.parametrize('overrides', [
    pytest.param(['--config.optim.kind=adamp'], marks=pytest.mark.slow),
    pytest.param(['--config.optim.kind=adamp', '--config.optim.nesterov=True',
                  '--config.optim.weight_decay=0.01'], marks=pytest.mark.slow),
    pytest.param(['--config.optim.nap=True',
                  r'--config.optim.nap_params=fc1/kernel$'],
                 marks=pytest.mark.slow),
    ['--config.optim.kind=adamp', '--config.optim.nap=True',
     r'--config.optim.nap_params=(fc1|fc2)/kernel$'],
], ids=['adamp', 'adamp_nesterov_wd', 'adam_nap', 'adamp_nap'])
def test_lm_smoke_step_with_each_optimizer(overrides, tmp_path):
  from experiments import configs
  from experiments import language_model
  from experiments import sharding
  config = configs.from_args('lm', ['--config=ptb_layernorm,smoke',
                                    *overrides])
  exp = language_model.Experiment(config, str(tmp_path))
  before = jax.tree.map(np.asarray, exp.state.params)
  batch = sharding.global_batch(next(iter(exp.batcher)), exp.mesh)
  with jax.set_mesh(exp.mesh):
    state, metrics = exp.train_step(exp.state, batch)
    state, metrics = exp.train_step(state, batch)
  assert bool(metrics['finite']) and np.isfinite(float(metrics['loss']))
  after = jax.tree.map(np.asarray, state.params)
  moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), before, after)
  assert all(jax.tree.leaves(moved))
  if config.optim.nap:
    flags = optim.mask_by_path(config.optim.nap_params)(before)
    checked = 0
    for b, a, f in zip(jax.tree.leaves(before), jax.tree.leaves(after),
                       jax.tree.leaves(flags)):
      if f:
        checked += 1
        assert abs(np.linalg.norm(a) / np.linalg.norm(b) - 1) <= 1e-6
    assert checked >= 1
  kinds = {type(s).__name__ for s in jax.tree.leaves(
      state.opt_state, is_leaf=lambda s: isinstance(
          s, (optim.AdamPState, optim.NaPState)))}
  assert ('AdamPState' in kinds) == (config.optim.kind == 'adamp')
  assert ('NaPState' in kinds) == config.optim.nap


@pytest.mark.parametrize('override,message', [
    ('--config.optim.kind=sgd', 'optim.kind=sgd: choose one of adam, adamp'),
    ('--config.optim.delta=0.0', 'optim.delta=0.0: must be > 0'),
    ('--config.optim.wd_ratio=-1.0', 'optim.wd_ratio=-1.0: must be >= 0'),
    ('--config.optim.nap_params=(', 'optim.nap_params=(: is not a regular'),
    ('--config.optim.nap=True', 'optim.nap=True: the default '
     'optim.nap_params (query/key kernels) are scale-invariant only'),
])
def test_optimizer_config_rules(override, message):
  from experiments import configs
  for experiment, preset in (('lm', 'ptb_layernorm,smoke'),
                             ('iwslt', 'layernorm,smoke')):
    with pytest.raises(configs.ConfigError, match=None) as e:
      configs.from_args(experiment, [f'--config={preset}', override])
    assert message in str(e.value), str(e.value)


def test_default_optimizer_is_unchanged():
  """The presets still build optax.adamw's state (checkpoints resume)."""
  from experiments import train_lib
  from experiments.configs import lm
  c = lm.get_config('ptb_layernorm,smoke')
  assert (c.optim.kind, c.optim.nap) == ('adam', False)
  sched = lambda count: 1e-3
  tx = train_lib.make_optimizer(c.optim, sched)
  ref = optax.chain(optax.clip_by_global_norm(c.optim.clip_norm),
                    optax.adamw(sched, b1=c.optim.b1, b2=c.optim.b2,
                                eps=c.optim.eps,
                                weight_decay=c.optim.weight_decay))
  params = {'w': jnp.ones((3, 2))}
  assert (jax.tree.structure(tx.init(params))
          == jax.tree.structure(ref.init(params)))
