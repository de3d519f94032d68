"""Numerics under stress, in training, for every norm of `normjax.MODULES`:
a batch of padding only, activations with outliers of 1e4 (embedding rows),
sequences of length 1 and a batch of a single token, and bfloat16. Every
step's loss, gradient norm and new state must be finite.

The library-level versions (each functional norm alone) are in
tests/bad_input_test.py. Slow (a dozen norms x 3 compilations): run by
`pytest -m slow -n 0`.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from experiments import models
from experiments import train_lib
from normjax._src import modules

import norm_cases  # tests/ is on sys.path: the norms' small options

PAD, EOS = models.PAD_ID, models.EOS_ID
KINDS = sorted(k for k in modules.MODULES if k != 'none')
INPUTS = np.array([[5, 6, 7, 8, EOS], [9, 10, EOS, PAD, PAD]], np.int32)
TARGETS = np.array([[6, 7, 8, 9, EOS], [11, EOS, PAD, PAD, PAD]], np.int32)
jit = functools.partial(jax.jit, compiler_options={
    'xla_backend_optimization_level': 0,
    'xla_cpu_use_fusion_emitters': False})


def batch(inputs, targets):
  inputs, targets = np.asarray(inputs, np.int32), np.asarray(targets, np.int32)
  return dict(inputs=inputs, targets=targets,
              weights=(targets != PAD).astype(np.float32))


def setup(kind, dtype):
  norm = dict(kind=kind, **norm_cases.module_options(kind))
  cfg = models.TransformerConfig(
      vocab_size=16, d_model=16, num_heads=2, ffn_dim=32,
      num_encoder_layers=1, num_decoder_layers=1, max_len=16, dropout=0.1,
      dtype=dtype, norms={site: norm for site in models.SITES})
  model = models.Transformer(cfg)
  schedule = optax.constant_schedule(1e-3)
  tx = train_lib.make_optimizer(
      ml_collections.ConfigDict(dict(clip_norm=0.0, b1=0.9, b2=0.98,
                                     eps=1e-8, weight_decay=0.0)), schedule)

  def init_variables(rng):
    return model.init({'params': rng, 'dropout': rng}, INPUTS, TARGETS,
                      train=False)

  def logits_fn(variables, b, rngs, mutable):
    return model.apply(variables, b['inputs'], b['targets'], train=True,
                       rngs=rngs, mutable=mutable)

  variables = nn.unbox(jit(init_variables)(jax.random.PRNGKey(0)))
  params = variables['params']
  state = train_lib.TrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
      batch_stats=variables.get('batch_stats', {}),
      grad_stats=variables.get('grad_stats', {}),
      rng=jax.random.PRNGKey(1))
  return state, jit(train_lib.make_train_step(logits_fn, tx, schedule, 0.1))


def assert_finite(state, metrics, what):
  assert bool(metrics['finite']), what
  for name in ('loss', 'grad_norm'):
    assert np.isfinite(float(metrics[name])), (what, name)
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    leaf = np.asarray(leaf, np.float32)
    assert np.isfinite(leaf).all(), (what, jax.tree_util.keystr(path))


def with_outliers(state, value=1e4):
  """Embedding rows of tokens 5 and 9 set to +-1e4: outlier activations."""
  params = jax.tree.map(lambda x: x, state.params)
  table = params['shared_embedding']['embedding']
  signs = jnp.where(jnp.arange(table.shape[1]) % 2 == 0, 1.0, -1.0)
  params['shared_embedding']['embedding'] = (
      table.at[5].set(value * signs).at[9].set(value).astype(table.dtype))
  return state.replace(params=params)


@pytest.mark.slow
@pytest.mark.parametrize('kind', KINDS)
def test_norm_trains_finite_under_stress(kind):
  for dtype in ('float32', 'bfloat16'):
    state, step = setup(kind, dtype)
    padding = batch(np.full_like(INPUTS, PAD), np.full_like(TARGETS, PAD))
    sequence = [('normal', batch(INPUTS, TARGETS)), ('all padding', padding),
                ('normal after padding', batch(INPUTS, TARGETS))]
    for what, b in sequence:
      state, metrics = step(state, b)
      assert_finite(state, metrics, f'{kind} {dtype} {what}')
    assert float(padding['weights'].sum()) == 0
    state = with_outliers(state)
    for i in range(3):
      state, metrics = step(state, batch(INPUTS, TARGETS))
      assert_finite(state, metrics, f'{kind} {dtype} outliers 1e4 step {i}')
    if dtype == 'float32':  # one token: sequence length 1, batch size 1
      for i in range(3):
        state, metrics = step(state, batch([[EOS]], [[EOS]]))
        assert_finite(state, metrics, f'{kind} one token step {i}')
      state, metrics = step(state, batch([[5], [9]], [[EOS], [7]]))
      if kind == 'unified' and not bool(metrics['finite']):
        # Found by this test: UN goes non-finite on two length-1 sequences
        # after the outlier steps (normjax/_src, not fixed here).
        pytest.xfail('unified: non-finite step on length-1 sequences')
      assert_finite(state, metrics, f'{kind} length-1 sequences')
