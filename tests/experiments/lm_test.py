"""The language-model experiment: presets, exact perplexity, causality, smoke."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import ml_collections
import jax.numpy as jnp
import numpy as np
import pytest

import run_helpers
from experiments import language_model
from experiments import models
from experiments import probing
from experiments import sharding
from experiments import train_lib
from experiments.configs import common
from experiments.configs import lm as lm_configs
from experiments.data import lm as lm_data
from experiments.data.vocab import EOS_ID

KINDS = ('layernorm', 'batchnorm', 'pn_v', 'powernorm', 'unified')


# ------------------------------------------------------------------ presets --

@pytest.mark.parametrize('preset', sorted(lm_configs.PRESETS))
@pytest.mark.parametrize('modifier', ['', ',small', ',demo', ',smoke'])
def test_every_preset_builds(preset, modifier):
  c = lm_configs.get_config(preset + modifier)
  assert c.preset == preset + modifier
  # ptb_batchnorm is the paper's BN; ptb_batchnorm_flax the flax-style one.
  kind = {'batchnorm': 'paper_batchnorm', 'batchnorm_flax': 'batchnorm'}.get(
      preset.split('_', 1)[1], preset.split('_', 1)[1])
  assert {c.model.norms[s].kind for s in lm_configs.SITES} == {kind}
  assert lm_configs.PRESETS[preset].__doc__
  with pytest.raises(AttributeError):
    c.data.not_a_field = 1
  models.TransformerConfig.from_config(c.model, 300000)  # a valid model


def test_baseline_recipes_and_paper_numbers():
  ptb = lm_configs.get_config('ptb_powernorm')
  assert (ptb.model.num_decoder_layers, ptb.model.d_model, ptb.model.num_heads,
          ptb.model.head_dim, ptb.model.ffn_dim) == (3, 256, 1, 40, 2100)
  assert (ptb.data.batch_size, ptb.data.seq_len) == (120, 32)
  assert ptb.schedule.kind == 'cosine' and ptb.schedule.peak_lr == 2.5e-4
  assert ptb.schedule.decay_steps == ptb.train.num_steps == 20000
  assert ptb.model.norms.decoder_ffn.num_groups == 1  # groups = heads
  assert '47.6' in lm_configs.PRESETS['ptb_powernorm'].__doc__
  assert '20.9' in lm_configs.PRESETS['wt103_layernorm'].__doc__
  wt = lm_configs.get_config('wt103_layernorm')
  assert wt.model.num_decoder_layers == 6
  assert list(wt.model.adaptive_softmax_cutoffs) == [20000, 40000, 200000]
  assert (wt.data.batch_size, wt.data.seq_len) == (60, 80)
  small = lm_configs.get_config('ptb_layernorm,small')
  assert small.schedule.decay_steps == small.train.num_steps == 700


def test_cosine_schedule_matches_transformer_xl():
  cfg = lm_configs.get_config('ptb_layernorm').schedule
  lr = train_lib.make_schedule(cfg)
  assert float(lr(0)) == pytest.approx(2.5e-4)
  assert float(lr(10000)) == pytest.approx(1.25e-4)
  assert float(lr(20000)) == pytest.approx(0.0, abs=1e-12)
  small = train_lib.make_schedule(
      lm_configs.get_config('ptb_layernorm,small').schedule)
  assert float(small(50)) == pytest.approx(5e-4)  # linear warmup over 100
  assert float(small(100)) == pytest.approx(1e-3 * 0.5 * (1 + np.cos(
      np.pi * 100 / 700)))


def test_unknown_lm_preset_names_the_choices():
  with pytest.raises(ValueError, match='ptb_powernorm'):
    lm_configs.get_config('powernorm')
  with pytest.raises(ValueError, match='unknown modifier.*small'):
    lm_configs.get_config('ptb_powernorm,multi30k')


# ---------------------------------------------------- perplexity by hand --

def test_perplexity_of_a_known_stream_equals_the_hand_computation():
  """A bigram 'model' with a known table through the real eval path."""
  vocab = 7
  rng = np.random.default_rng(0)
  table = np.log(rng.dirichlet(np.ones(vocab), size=vocab)).astype(np.float32)
  stream = rng.integers(2, vocab, size=53).astype(np.int32)  # 53: odd tail
  stream[[9, 20, 52]] = EOS_ID

  def bigram_logits(variables, batch):
    del variables
    return jnp.asarray(table)[batch['inputs']]

  mesh = sharding.make_mesh(common.mesh(), jax.devices()[:2])
  eval_step = jax.jit(train_lib.make_eval_step(bigram_logits, 0.0))
  batches = lm_data.eval_batches(stream, batch_size=3, seq_len=5,
                                 batch_multiple=2)
  no_params = train_lib.TrainState(
      step=jnp.zeros((), jnp.int32), params={}, opt_state=(), batch_stats={},
      grad_stats={}, rng=jax.random.PRNGKey(0))
  result = train_lib.evaluate_loss(eval_step, no_params, batches, mesh)
  previous = np.concatenate([[EOS_ID], stream[:-1]])
  nll = -table[previous, stream]
  assert result['ntokens'] == len(stream)  # no token dropped or repeated
  assert result['nll'] == pytest.approx(nll.mean(), rel=1e-6)
  assert result['ppl'] == pytest.approx(np.exp(nll.mean()), rel=1e-6)


@pytest.mark.slow  # about 20 s: over the default suite's budget
def test_adaptive_softmax_is_a_normalised_two_level_softmax():
  cfg = models.TransformerConfig(
      vocab_size=11, d_model=8, num_heads=2, ffn_dim=16, num_decoder_layers=1,
      max_len=8, adaptive_softmax_cutoffs=(4, 7))
  model = models.LanguageModel(cfg)
  tokens = jnp.asarray([[5, 6, 7, 2, 9]])
  variables = nn.unbox(model.init(jax.random.key(0), tokens, train=False))
  variables = jax.tree.map(
      lambda x: x + 0.1 * jax.random.normal(jax.random.key(1), x.shape),
      variables)
  logp = np.asarray(model.apply(variables, tokens, train=False), np.float64)
  np.testing.assert_allclose(np.exp(logp).sum(-1), 1.0, atol=1e-6)

  # By hand from the hidden state and the parameters.
  p = variables['params']
  hidden = model.apply(variables, tokens, train=False,
                       method=lambda m, x, train: m.decoder(
                           None, None, x, train=train),
                       capture_intermediates=lambda mdl, _: (
                           mdl.name == 'final_norm'))[1]
  h = np.asarray(hidden['intermediates']['decoder']['final_norm'][
      '__call__'][0][0], np.float64)
  words = h @ np.asarray(p['embedding']['embedding'], np.float64).T + \
      np.asarray(p['adaptive_softmax']['bias'])
  cluster = h @ np.asarray(p['adaptive_softmax']['cluster']['kernel']) + \
      np.asarray(p['adaptive_softmax']['cluster']['bias'])

  def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))
  head = log_softmax(np.concatenate([words[:, :4], cluster], -1))
  want = np.concatenate([
      head[:, :4], head[:, 4:5] + log_softmax(words[:, 4:7]),
      head[:, 5:6] + log_softmax(words[:, 7:])], -1)
  np.testing.assert_allclose(logp[0], want, atol=2e-5)


def test_bad_adaptive_softmax_cutoffs_are_rejected():
  with pytest.raises(ValueError, match='adaptive_softmax_cutoffs'):
    models.TransformerConfig(vocab_size=10, adaptive_softmax_cutoffs=(5, 3))
  with pytest.raises(ValueError, match='adaptive_softmax_cutoffs'):
    models.TransformerConfig(vocab_size=10, adaptive_softmax_cutoffs=(10,))


# --------------------------------------------------------------- causality --

def _lm(kind):
  norm = lm_configs.norm(kind, lm_configs.get_config('ptb_layernorm,smoke'))
  options = {k: v for k, v in norm.to_dict().items()}
  if 'num_groups' in options:
    options['num_groups'] = 2
  if 'warmup_steps' in options:
    options['warmup_steps'] = 2
  cfg = models.TransformerConfig(
      vocab_size=20, d_model=16, num_heads=2, ffn_dim=32,
      num_decoder_layers=2, max_len=16, placement='post', dropout=0.0,
      attention_dropout=0.0, activation_dropout=0.0,
      norms={s: options for s in lm_configs.SITES})
  return models.LanguageModel(cfg)


@pytest.mark.parametrize('kind', KINDS)
def test_evaluation_does_not_see_future_tokens(kind):
  model = _lm(kind)
  rng = np.random.default_rng(1)
  tokens = jnp.asarray(rng.integers(2, 20, size=(4, 10)), jnp.int32)
  variables = model.init(jax.random.key(0), tokens, train=False)
  # A few training steps move the running statistics away from their init.
  for _ in range(4):
    batch = jnp.asarray(rng.integers(2, 20, size=(4, 10)), jnp.int32)
    _, updates = model.apply(variables, batch, train=True,
                             mutable=['batch_stats'])
    variables = {**variables, **updates}
  changed = tokens.at[:, 6:].set((tokens[:, 6:] + 7) % 18 + 2)
  def logits(v, x, train):
    if train:
      return model.apply(v, x, train=True, mutable=['batch_stats'])[0]
    return model.apply(v, x, train=False)
  apply = jax.jit(logits, static_argnums=2)
  before = np.asarray(apply(variables, tokens, False))
  after = np.asarray(apply(variables, changed, False))
  np.testing.assert_array_equal(before[:, :6], after[:, :6])
  assert np.abs(before[:, 6:] - after[:, 6:]).max() > 1e-3
  if kind in ('batchnorm', 'pn_v', 'unified'):
    # Training mode normalises with statistics of the whole batch, later
    # positions included: the documented leak that evaluation avoids.
    leak = np.abs(np.asarray(apply(variables, tokens, True))[:, :6]
                  - np.asarray(apply(variables, changed, True))[:, :6]).max()
    assert leak > 1e-6


# ------------------------------------------------------------- end to end --

def smoke_config(num_steps, preset='ptb_powernorm,smoke', planned=6):
  """The smoke run planned for `planned` steps, stopped after `num_steps`
  (the cosine schedule keeps decaying over the planned steps)."""
  c = lm_configs.get_config(preset)
  c.unlock()
  c.schedule = ml_collections.ConfigDict(
      dict(c.schedule.to_dict(), decay_steps=planned))
  c.train.num_steps = num_steps
  c.train.probe_every = 2  # probes.csv must resume exactly too
  c.lock()
  return c


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  return run_helpers.straight_and_resumed(
      language_model.train_and_evaluate, smoke_config, tmp_path_factory,
      'lm_')


@pytest.mark.slow  # the end-to-end runs: SIGKILL resume in kill_resume_test
def test_lm_resume_is_exact(runs):
  straight, resumed, _ = runs
  (a, meta_a), (b, meta_b) = run_helpers.checkpoint(straight, 6), run_helpers.checkpoint(resumed, 6)
  assert meta_a['data'] == meta_b['data']
  same = jax.tree.map(np.array_equal, a, b)
  assert all(jax.tree.leaves(same)), 'resumed run diverged'
  norm = a['batch_stats']['decoder']['layer_0']['attention_norm']
  assert int(norm['step']) == 6
  pa, pb = (probing.read_probes(d) for d in (straight, resumed))
  assert sorted(pa) == sorted(pb) and ('model', 'grad_norm') in pa
  for key in pa:  # the resumed run's file has no duplicate or lost rows
    np.testing.assert_array_equal(pa[key][0], [2, 4, 6])
    np.testing.assert_array_equal(pa[key][1], pb[key][1])


@pytest.mark.slow  # the end-to-end runs: SIGKILL resume in kill_resume_test
def test_lm_results_cover_every_token(runs):
  straight, _, result = runs
  with open(os.path.join(straight, 'results.json')) as f:
    saved = json.load(f)
  data = lm_data.load_lm(smoke_config(6).data)
  for split in ('valid', 'test'):
    assert saved[split]['ntokens'] == len(getattr(data, split))
    assert np.isfinite(saved[split]['ppl'])
    assert saved[split]['ppl'] == pytest.approx(result[split]['ppl'])
  assert saved['step'] == 6
  assert os.listdir(os.path.join(straight, 'tensorboard'))


@pytest.mark.slow  # the end-to-end runs: SIGKILL resume in kill_resume_test
def test_lm_eval_mode_scores_a_checkpoint(runs):
  straight, _, result = runs
  again = language_model.evaluate(smoke_config(6), straight, 'latest', 'test')
  assert again['ppl'] == pytest.approx(result['test']['ppl'], rel=1e-6)
  with pytest.raises(ValueError, match='latest'):
    language_model.evaluate(smoke_config(6), straight, 'averaged', 'test')


def test_lm_cli_errors_are_one_line():
  out = subprocess.run(
      [sys.executable, '-m', 'experiments.lm', '--config=ptb_powrnorm'],
      capture_output=True, text=True, timeout=120)
  assert out.returncode != 0 and 'unknown preset' in out.stderr
  assert 'Traceback' not in out.stderr
