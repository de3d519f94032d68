"""The plain-JAX, equinox and NNX recipes: `normjax.backward_stats` /
`with_backward_stats`, the three example scripts (they learn and move
`ema_gz`), the optimizer never holding `ema_gz`, and forgetting the
backward statistics failing loudly in each style."""

import pathlib
import re
import subprocess
import sys

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import normjax
from backward_stats_test import MESSAGE
from normjax import functional as nf

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'examples'))
import train_tiny  # pylint: disable=g-import-not-at-top,wrong-import-position
import train_tiny_equinox  # pylint: disable=g-import-not-at-top,wrong-import-position
import train_tiny_jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import train_tiny_nnx  # pylint: disable=g-import-not-at-top,wrong-import-position


def nested_states():
  """A dict of per-layer states: PowerNorm, UN, LayerNorm's empty state and
  a plain array, in nested containers."""
  pn = nf.init_power_norm_state(8)
  un = nf.init_unified_norm_state(8)
  return {'layers': [pn._replace(ema_gz=jnp.arange(8.)), un],
          'ln': nf.EmptyState(), 'other': (jnp.ones(3), {'pn': pn})}


def test_backward_stats_holds_only_the_backward_fields():
  stats = normjax.backward_stats(nested_states())
  assert stats['layers'][0].keys() == {'ema_gz'}
  assert stats['layers'][1].keys() == {'ema_gz', 'bwd_window'}
  assert stats['other'][0] is None and stats['other'][1]['pn'].keys() == {
      'ema_gz'}
  np.testing.assert_array_equal(stats['layers'][0]['ema_gz'], np.arange(8.))
  # No integer counter: the whole tree is one argument of jax.grad.
  assert all(jnp.issubdtype(leaf.dtype, jnp.floating)
             for leaf in jax.tree.leaves(stats))


def test_with_backward_stats_round_trips_and_replaces():
  states = nested_states()
  same = normjax.with_backward_stats(states, normjax.backward_stats(states))
  assert jax.tree.structure(same) == jax.tree.structure(states)
  jax.tree.map(np.testing.assert_array_equal, same, states)
  moved = jax.tree.map(lambda s: s + 1, normjax.backward_stats(states))
  out = normjax.with_backward_stats(states, moved)
  np.testing.assert_array_equal(out['layers'][0].ema_gz, np.arange(8.) + 1)
  np.testing.assert_array_equal(out['layers'][1].bwd_window,
                                states['layers'][1].bwd_window + 1)
  assert out['layers'][0].step.dtype == jnp.int32
  np.testing.assert_array_equal(out['other'][0], states['other'][0])


def test_grad_over_backward_stats_is_each_norms_cotangent():
  """jax.grad over `backward_stats(states)` of a two-layer functional model
  gives, per layer, the cotangent of that layer's `ema_gz` taken directly."""
  x = jax.random.normal(jax.random.key(0), (4, 6, 8))
  states = {'a': nf.init_power_norm_state(8), 'b': nf.init_power_norm_state(8)}
  norm = lambda x, s: nf.power_norm(x, None, s, num_groups=2)[0]

  def loss(x, stats):
    s = normjax.with_backward_stats(states, stats)
    return jnp.sum(jnp.sin(norm(norm(x, s['a']), s['b'])))

  def loss_direct(x, ema_a, ema_b):
    a = states['a']._replace(ema_gz=ema_a)
    b = states['b']._replace(ema_gz=ema_b)
    return jnp.sum(jnp.sin(norm(norm(x, a), b)))

  _, stat_grads = jax.grad(loss, argnums=(0, 1))(
      x, normjax.backward_stats(states))
  _, ga, gb = jax.grad(loss_direct, argnums=(0, 1, 2))(
      x, states['a'].ema_gz, states['b'].ema_gz)
  np.testing.assert_allclose(stat_grads['a']['ema_gz'], ga, rtol=1e-6)
  np.testing.assert_allclose(stat_grads['b']['ema_gz'], gb, rtol=1e-6)
  assert np.abs(ga).max() > 0 and np.abs(gb).max() > 0


# Three subprocesses (~8 s each): CI's slow step runs them; the train steps
# they use are tested in process below.
@pytest.mark.slow
@pytest.mark.parametrize('script', ['train_tiny_jax.py',
                                    'train_tiny_equinox.py',
                                    'train_tiny_nnx.py'])
def test_example_learns_and_moves_ema_gz(script):
  out = subprocess.run(
      [sys.executable, f'examples/{script}', '--norm=powernorm',
       '--steps=30'], cwd=ROOT, capture_output=True, text=True, timeout=300,
      check=True).stdout
  first, last = re.search(r'loss ([\d.]+) -> ([\d.]+)', out).groups()
  assert float(last) < 0.8 * float(first), out
  before, after = re.search(r'ema_gz \|mean\| (\S+) -> (\S+)', out).groups()
  assert float(before) == 0.0 and float(after) > 0.0, out


def equinox_model():
  params, states = train_tiny_jax.init(jax.random.key(0), 'powernorm')
  return train_tiny_equinox.TinyEncoder(params, 'powernorm'), states


def test_equinox_optimizer_state_has_no_ema_gz():
  model, states = equinox_model()
  tx = optax.adamw(3e-3, weight_decay=1e-4)
  opt_state = tx.init(eqx.filter(model, eqx.is_inexact_array))
  paths = [jax.tree_util.keystr(p)
           for p, _ in jax.tree_util.tree_leaves_with_path(opt_state)]
  assert not [p for p in paths if 'ema_gz' in p or 'norm' in p and
              'scale' not in p and 'bias' not in p]
  # Adam's two moments per parameter array, plus its step counter.
  assert len(paths) == 2 * len(jax.tree.leaves(model.params)) + 1
  # One step: ema_gz is its plain-JAX value (stats + cotangent), which no
  # optimizer sees, so AdamW's decay and moments left it alone.
  data = train_tiny.make_batch(np.random.default_rng(0), 8)
  _, new, _, _ = train_tiny_equinox.make_train_step(tx)(
      model, states, opt_state, data)
  _, plain, _, _ = train_tiny_jax.make_train_step('powernorm', tx)(
      model.params, states, tx.init(model.params), data)
  for site in train_tiny_jax.SITES:
    assert np.abs(new[site].ema_gz).max() > 0
    np.testing.assert_allclose(new[site].ema_gz, plain[site].ema_gz,
                               rtol=1e-5, atol=1e-12)


def batch():
  return train_tiny.make_batch(np.random.default_rng(0), 4)


def test_forgetting_the_stats_fails_in_plain_jax():
  params, states = train_tiny_jax.init(jax.random.key(0), 'powernorm')
  tokens, mask, targets = batch()

  def loss(params):
    logits, _ = train_tiny_jax.forward(params, states, tokens, mask, True,
                                       'powernorm')
    return train_tiny_jax.masked_ce(logits, targets, mask)

  with pytest.raises(ValueError, match=MESSAGE):
    jax.jit(jax.grad(loss))(params)


def test_forgetting_the_stats_fails_in_equinox():
  """The usual `eqx.filter_grad` over the model alone raises."""
  model, states = equinox_model()
  tokens, mask, targets = batch()

  @eqx.filter_grad
  def grads(model):
    logits, _ = model(tokens, mask, True, states)
    return train_tiny_jax.masked_ce(logits, targets, mask)

  with pytest.raises(ValueError, match=MESSAGE):
    eqx.filter_jit(grads)(model)


def test_forgetting_the_stats_fails_in_nnx():
  model = train_tiny_nnx.TinyEncoder('powernorm', nnx.Rngs(0))
  with pytest.raises(ValueError, match=MESSAGE):
    nnx.jit(nnx.grad(train_tiny_nnx.loss_fn))(model, *batch())


def readme_blocks():
  """The plain-JAX and the equinox train steps of the README."""
  text = (ROOT / 'README.md').read_text()
  section = re.search(r'## Plain JAX and Equinox\n(.*?)\n## ', text,
                      re.S).group(1)
  return re.findall(r'```python\n(.*?)```', section, re.S)


def run_readme_block(code, make_carry):
  """Execs `code`, runs three train steps and returns (losses, state)."""
  scope = {'loss': lambda y: jnp.mean(jnp.square(y - 1.0)),
           'tx': optax.adam(1e-2)}
  exec(code, scope)  # pylint: disable=exec-used
  x = jax.random.normal(jax.random.key(0), (2, 5, 8))
  mask = jnp.arange(5)[None, :] < jnp.array([[5], [3]])
  carry, losses = make_carry(scope), []
  for _ in range(3):
    *carry, loss = scope['train_step'](*carry, x, mask)
    losses.append(float(loss))
  return losses, carry


# The lines each README recipe changes against the same model with LayerNorm
# (None: a line LayerNorm does not need): in plain JAX the same state-passing
# model, in equinox the usual stateless module.
PLAIN_TO_LAYERNORM = {
    'import jax, optax, normjax': 'import jax, optax',
    "  y, states['norm'] = nf.power_norm(x, params['norm'], states['norm'], "
    'mask=mask,':
        "  y, states['norm'] = nf.layer_norm(x, params['norm'], "
        "states['norm'], mask=mask)",
    '                                    num_groups=4, warmup_steps=8000)':
        None,
    '  (l, states), grads = normjax.value_and_grad(loss_fn)(params, states)':
        '  (l, states), grads = jax.value_and_grad(loss_fn, has_aux=True)'
        '(params, states)',
}
EQUINOX_TO_LAYERNORM = {
    'import equinox as eqx, jax, optax, normjax':
        'import equinox as eqx, jax, optax',
    '  def __call__(self, x, mask, state):': '  def __call__(self, x, mask):',
    '    y, state = nf.power_norm(x, self.norm, state, mask=mask, '
    'num_groups=4, warmup_steps=8000)':
        '    y, _ = nf.layer_norm(x, self.norm, mask=mask)',
    '    return y @ self.w, state': '    return y @ self.w',
    'def train_step(model, state, opt_state, x, mask):':
        'def train_step(model, opt_state, x, mask):',
    '  def loss_fn(model, state):': '  def loss_fn(model):',
    '    y, state = model(x, mask, state)': '    y = model(x, mask)',
    '    return loss(y), state': '    return loss(y)',
    '  (l, state), grads = normjax.value_and_grad(loss_fn, '
    'eqx.filter_value_and_grad)(model, state)':
        '  l, grads = eqx.filter_value_and_grad(loss_fn)(model)',
    '  return eqx.apply_updates(model, updates), state, opt_state, l':
        '  return eqx.apply_updates(model, updates), opt_state, l',
}


def to_layernorm(code, changes):
  """`code` with each line of `changes` replaced (or dropped if None)."""
  lines = code.splitlines()
  for line in changes:
    assert lines.count(line) == 1, line
  return '\n'.join(changes.get(l, l) for l in lines
                   if changes.get(l, l) is not None)


@pytest.mark.parametrize('recipe,changes,count', [
    (0, PLAIN_TO_LAYERNORM, 4), (1, EQUINOX_TO_LAYERNORM, 10)])
def test_readme_recipe_trains_and_differs_from_layernorm_as_stated(
    recipe, changes, count):
  """The recipe trains and moves ema_gz; the same model with LayerNorm (the
  README's count of changed lines) trains too."""
  code = readme_blocks()[recipe]
  norm = {'scale': jnp.ones(8), 'bias': jnp.zeros(8)}
  w = jax.random.normal(jax.random.key(1), (8, 8))

  def carry(scope, state):
    if recipe == 0:
      params = {'norm': norm, 'w': w}
      return params, {'norm': state}, scope['tx'].init(params)
    model = scope['Model'](w, norm)
    opt_state = scope['tx'].init(eqx.filter(model, eqx.is_inexact_array))
    return (model, opt_state) if state is None else (model, state, opt_state)

  losses, (_, states, _) = run_readme_block(
      code, lambda scope: carry(scope, nf.init_power_norm_state(8)))
  ema_gz = states['norm'].ema_gz if recipe == 0 else states.ema_gz
  assert losses[-1] < losses[0] and np.abs(ema_gz).max() > 0
  assert len(changes) == count
  layernorm_state = nf.EmptyState() if recipe == 0 else None
  losses, _ = run_readme_block(to_layernorm(code, changes),
                               lambda scope: carry(scope, layernorm_state))
  assert losses[-1] < losses[0]


def test_value_and_grad_equals_the_hand_written_step():
  """`normjax.value_and_grad` gives the gradients and the new ema_gz of the
  explicit `backward_stats` / `apply_backward_stats` step, with aux."""
  params, states = train_tiny_jax.init(jax.random.key(0), 'powernorm')
  tokens, mask, targets = batch()

  def loss_fn(params, states):
    logits, states = train_tiny_jax.forward(params, states, tokens, mask,
                                            True, 'powernorm')
    return train_tiny_jax.masked_ce(logits, targets, mask), (states, logits)

  (loss, new, logits), grads = jax.jit(normjax.value_and_grad(
      loss_fn, has_aux=True))(params, states)

  def by_hand(params, stats):
    return loss_fn(params, normjax.with_backward_stats(states, stats))

  stats = normjax.backward_stats(states)
  (loss2, (new2, logits2)), (grads2, updates) = jax.jit(jax.value_and_grad(
      by_hand, argnums=(0, 1), has_aux=True))(params, stats)
  new2 = normjax.with_backward_stats(
      new2, normjax.apply_backward_stats(stats, updates))
  chex.assert_trees_all_close((loss, new, logits, grads),
                              (loss2, new2, logits2, grads2), rtol=1e-6)
  assert np.abs(new['final_norm'].ema_gz).max() > 0
  assert int(new['final_norm'].step) == 1


def test_value_and_grad_refuses_params_that_hold_states():
  """An equinox model with its norm states inside would hand the ema_gz
  updates to the optimizer: refused, naming the fix."""
  params, states = train_tiny_jax.init(jax.random.key(0), 'powernorm')
  model = {'params': params, 'states': states}
  step = normjax.value_and_grad(lambda m, s: (jnp.float32(0), s))
  with pytest.raises(ValueError, match=r"\['states'\]\['attn_norm_0'\]"
                     r"\['ema_gz'\].*beside the params or model"):
    step(model, {})


LINEN_TO_LAYERNORM = {
    'import flax.linen as nn, jax, optax, normjax':
        'import flax.linen as nn, jax, optax',
    "    norm = nnorm.PowerNorm(num_groups=4, warmup_steps=8000, name='norm')":
        "    norm = nnorm.LayerNorm(name='norm')",
    '    return x + nn.Dense(x.shape[-1])(norm(x, use_running_average=not '
    'train, mask=mask))': '    return x + nn.Dense(x.shape[-1])(norm(x, '
                          'mask=mask))',
    "def train_step(params, state, opt_state, x, mask):   # state: "
    "{'batch_stats': ..., 'grad_stats': ...}":
        'def train_step(params, opt_state, x, mask):',
    '  def loss_fn(params, state):': '  def loss_fn(params):',
    "    y, new = model.apply({'params': params, **state}, x, mask, True, "
    "mutable=['batch_stats'])":
        "    y = model.apply({'params': params}, x, mask, True)",
    '    return loss(y), {**state, **new}': '    return loss(y)',
    '  (l, state), grads = normjax.value_and_grad(loss_fn)(params, state)   '
    '# grad_stats never reach tx':
        '  l, grads = jax.value_and_grad(loss_fn)(params)',
    '  return optax.apply_updates(params, updates), state, opt_state, l':
        '  return optax.apply_updates(params, updates), opt_state, l',
}


def test_readme_linen_recipe_trains_and_differs_from_layernorm_by_9_lines():
  text = (ROOT / 'README.md').read_text()
  section = re.search(r'## PowerNorm in your model\n(.*?)\n## ', text,
                      re.S).group(1)
  code = re.search(r'```python\n(.*?)```', section, re.S).group(1)

  def carry(scope):
    scope['model'] = model = scope['Block']()
    variables = model.init(jax.random.key(0), jnp.ones((2, 5, 8)),
                           jnp.ones((2, 5), bool), False)
    params = variables.pop('params')
    opt_state = scope['tx'].init(params)
    return (params, opt_state) if not variables else (params, variables,
                                                      opt_state)

  losses, (_, state, _) = run_readme_block(code, carry)
  assert losses[-1] < losses[0]
  assert np.abs(state['grad_stats']['norm']['ema_gz']).max() > 0
  assert int(state['batch_stats']['norm']['step']) == 3
  assert len(LINEN_TO_LAYERNORM) == 9
  losses, _ = run_readme_block(to_layernorm(code, LINEN_TO_LAYERNORM), carry)
  assert losses[-1] < losses[0]
