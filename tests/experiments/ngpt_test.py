"""nGPT (zoo spec §10): on the unit sphere after every block and every
optimizer step, loss decreasing, causal, no norm parameters."""

import functools
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import language_model
from experiments import models
from experiments import ngpt
from experiments import train_lib
from experiments.configs import lm
from experiments.configs import validate

VOCAB = 40
STEPS = 50
jit = functools.partial(jax.jit, compiler_options={
    'xla_backend_optimization_level': 0,
    'xla_cpu_use_fusion_emitters': False})


def smoke_config():
  """The smoke LM with the `ngpt` modifier; a constant-ish lr over STEPS."""
  c = lm.get_config('ptb_layernorm,smoke,ngpt')
  c.unlock()
  c.train.num_steps = STEPS  # the cosine decay follows
  c.schedule.peak_lr = 1e-2
  c.model.num_decoder_layers = 2
  return c


def row_norms(params):
  """{path: norms of the rows along the embedding dimension} of every
  matrix nGPT renormalises."""
  out = {}
  for path, x in jax.tree_util.tree_leaves_with_path(params):
    name = path[-1].key
    if name in ngpt.NORMALISED_AXES and x.ndim >= 2:
      axis = ngpt.NORMALISED_AXES[name]
      out[jax.tree_util.keystr(path)] = np.linalg.norm(np.asarray(x),
                                                       axis=axis)
  return out


@pytest.fixture(scope='module')
def trained():
  c = smoke_config()
  cfg = models.TransformerConfig.from_config(c.model, VOCAB)
  model = ngpt.NGPT(cfg)
  tokens = np.random.default_rng(0).integers(3, VOCAB, size=(8, 9))
  batch = dict(inputs=tokens[:, :-1].astype(np.int32),
               targets=tokens[:, 1:].astype(np.int32),
               weights=np.ones((8, 8), np.float32))
  variables = nn.unbox(jit(lambda: model.init(
      jax.random.key(0), batch['inputs'], train=False))())
  schedule = train_lib.make_schedule(c.schedule)
  tx = train_lib.make_optimizer(c.optim, schedule)
  state = train_lib.TrainState(
      step=jnp.zeros((), jnp.int32), params=variables['params'],
      opt_state=tx.init(variables['params']), batch_stats={}, grad_stats={},
      rng=jax.random.PRNGKey(0))

  def logits_fn(variables, batch, rngs, mutable):
    return model.apply(variables, batch['inputs'], train=True, rngs=rngs,
                       mutable=mutable)
  # The hook as the experiment passes it (language_model.Experiment).
  exp = types.SimpleNamespace(model_class=ngpt.NGPT)
  project = functools.partial(language_model.Experiment.project_params, exp)
  step = jit(train_lib.make_train_step(logits_fn, tx, schedule, 0.0,
                                       project_params=project))
  losses = []
  for _ in range(STEPS):
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
  return c, model, variables, state, batch, losses


def test_loss_decreases(trained):
  *_, losses = trained
  print('nGPT loss', losses[0], '->', losses[-1])
  assert losses[-1] < losses[0] - 0.5, losses


def test_weight_rows_have_unit_norm_after_every_step(trained):
  _, _, variables, state, _, _ = trained
  for params in (variables['params'], state.params):
    norms = row_norms(params)
    assert len(norms) == 2 + 2 * 6  # embedding, output; 6 per block
    worst = max(np.abs(n - 1).max() for n in norms.values())
    print('nGPT worst weight-row |norm - 1|', worst)
    assert worst < 1e-5, worst
  # The scalings moved and were not projected.
  layer = state.params['layer_0']
  assert not np.allclose(layer['alpha_attention'],
                         variables['params']['layer_0']['alpha_attention'])


def test_every_hidden_vector_has_unit_norm(trained):
  _, model, _, state, batch, _ = trained
  _, inter = jit(lambda p: model.apply(
      {'params': p}, batch['inputs'], train=False,
      capture_intermediates=lambda m, _: m.name and m.name.startswith(
          'layer_')))(state.params)
  blocks = inter['intermediates']
  assert len(blocks) == 2
  for name in blocks:
    h = np.asarray(blocks[name]['__call__'][0])
    assert h.dtype == np.float32
    deviation = np.abs(np.linalg.norm(h, axis=-1) - 1).max()
    print('nGPT', name, 'worst hidden |norm - 1|', deviation)
    assert deviation < 1e-5, (name, deviation)


def test_causal_and_no_norm_parameters(trained):
  _, model, _, state, batch, _ = trained
  apply = jit(lambda p, x: model.apply({'params': p}, x, train=False))
  inputs = batch['inputs']
  changed = inputs.copy()
  changed[:, 5] = (changed[:, 5] + 1 - 3) % (VOCAB - 3) + 3
  a, b = np.asarray(apply(state.params, inputs)), np.asarray(
      apply(state.params, changed))
  np.testing.assert_array_equal(a[:, :5], b[:, :5])
  assert not np.allclose(a[:, 5:], b[:, 5:])
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), inputs,
                                                train=False))
  assert set(variables) == {'params'}  # no batch or gradient statistics
  names = {jax.tree_util.keystr(p) for p, _ in
           jax.tree_util.tree_leaves_with_path(nn.unbox(variables))}
  assert not any('norm' in n or "'scale'" in n or "'bias'" in n
                 for n in names), names


def test_block_with_zero_alpha_is_the_identity_and_logits_are_bounded():
  cfg = models.TransformerConfig(vocab_size=VOCAB, d_model=16, num_heads=2,
                                 ffn_dim=32, num_decoder_layers=1,
                                 max_len=16)
  block = ngpt.NGPTBlock(cfg)
  h = ngpt.justnorm(jax.random.normal(jax.random.key(1), (2, 5, 16)))
  positions = jnp.broadcast_to(jnp.arange(5), (2, 5))
  mask = nn.make_causal_mask(jnp.ones((2, 5)), dtype=jnp.bool_)
  params = nn.unbox(jit(block.init)(jax.random.key(0), h, positions, mask))
  zero = jax.tree.map(lambda x: x, params)
  for name in ('alpha_attention', 'alpha_mlp'):
    zero['params'][name] = jnp.zeros_like(zero['params'][name])
  np.testing.assert_allclose(
      jit(block.apply)(zero, h, positions, mask), h, atol=1e-6)
  # Initial s_qk = 1: |q . k| * sqrt(d_k) <= sqrt(d_k).
  q = ngpt.justnorm(ngpt.rope(jax.random.normal(jax.random.key(2),
                                                (2, 5, 2, 8)), positions))
  assert np.abs(np.einsum('blhk,bmhk->bhlm', q, q)).max() <= 1 + 1e-6


def test_the_modifier_and_the_experiment_pick_ngpt():
  c = lm.get_config('ptb_powernorm,ngpt,smoke')
  assert c.model.architecture == 'ngpt'
  assert c.optim.weight_decay == 0.0 and c.schedule.warmup_steps == 0
  assert {c.model.norms[s].kind for s in c.model.norms} == {'none'}
  assert validate.problems(c) == []
  checked = validate.checked(c)
  exp = types.SimpleNamespace(config=checked)
  assert language_model.Experiment.model_class.fget(exp) is ngpt.NGPT
  c.unlock()
  c.model.architecture = 'gpt'
  assert 'model.architecture=gpt' in validate.problems(c)[0]
  # Every other model: the identity hook.
  identity = types.SimpleNamespace(model_class=models.LanguageModel)
  params = {'a': np.ones(3)}
  assert language_model.Experiment.project_params(identity,
                                                  params) is params
