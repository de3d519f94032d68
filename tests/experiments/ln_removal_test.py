"""experiments.ln_removal: LayerNorm removal by fine-tuning on the published
schedule (zoo spec §9), then folding to an LN-free model."""

import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from experiments import configs
from experiments import fold
from experiments import language_model
from experiments import ln_removal
from experiments import models
from experiments.configs import lm

pytestmark = pytest.mark.usefixtures('compilation_cache')

SHORT = ['--config.ln_removal.start=2', '--config.ln_removal.gap_ffn=1',
         '--config.ln_removal.gap_qk=1', '--config.ln_removal.gap_v=2',
         '--config.ln_removal.num_steps=8',
         '--config.ln_removal.calibration_batches=2',
         '--config.ln_removal.warmup_steps=2']


def smoke_config(*overrides):
  return configs.from_args('lm', ['--config=ptb_layernorm,smoke',
                                  '--config.model.placement=pre',
                                  *SHORT, *overrides])


@pytest.fixture(scope='module')
def removed(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('lm_run'))
  out = str(tmp_path_factory.mktemp('ln_free'))
  config = smoke_config()
  language_model.train_and_evaluate(config, workdir)
  result = ln_removal.run(workdir, config, out, verbose=False)
  return workdir, out, config, result


def test_the_published_schedule():
  """GPT-2 small (12 layers): ln_2 at 20 + 2i, ln_1qk from 44 every 2,
  ln_1v from 68 every 3, ln_f at 104 (submarat/removing-layer-norm)."""
  events = ln_removal.removal_schedule(lm.ln_removal(), 12)
  steps = {k: [e.step for e in events if e.kind == k]
           for k in ln_removal.KINDS}
  assert steps['ffn'] == list(range(20, 44, 2))
  assert steps['attention_qk'] == list(range(44, 68, 2))
  assert steps['attention_v'] == list(range(68, 104, 3))
  assert steps['final'] == [104]
  assert [e.step for e in events] == sorted(e.step for e in events)


@pytest.mark.slow  # a training run and the removal fine-tune: CI slow step
def test_every_layernorm_removed_once_in_the_published_order(removed):
  _, out, config, result = removed
  layers = config.model.num_decoder_layers
  events = result['events']
  expect = ([('ffn', i) for i in range(layers)]
            + [('attention_qk', i) for i in range(layers)]
            + [('attention_v', i) for i in range(layers)] + [('final', None)])
  assert [(e['kind'], e['layer']) for e in events] == expect
  assert [e['step'] for e in events] == [2, 3, 4, 6]
  removed_names = [n for d in result['during'] for n in d['removed']]
  assert len(removed_names) == len(set(removed_names)) == len(events)
  assert [d['step'] for d in result['during']] == [e['step'] for e in events]
  with open(os.path.join(out, ln_removal.RESULTS)) as f:
    assert json.load(f)['events'] == events


@pytest.mark.slow  # a training run and the removal fine-tune: CI slow step
def test_the_final_model_has_no_layernorm_and_matches(removed):
  _, out, _, result = removed
  new_config, variables, meta = fold.load(out)
  assert meta['transform'] == 'ln_removal'
  assert set(result['norms'].values()) == {'none'}
  paths = ['/'.join(str(k.key) for k in p) for p, _ in
           jax.tree_util.tree_leaves_with_path(variables)]
  assert not [p for p in paths if 'norm' in p], paths
  assert not [p for p in paths if p.endswith('/scale')]
  assert result['fold_max_abs_logit_deviation'] <= 1e-5, result
  ppl = [result['ppl'][k] for k in ('before', 'after_finetune',
                                    'after_fold')]
  ppl += [d['ppl'] for d in result['during']]
  assert all(np.isfinite(p) and p > 1 for p in ppl), ppl
  # Folding changes rounding only.
  assert abs(result['ppl']['after_fold'] / result['ppl']['after_finetune']
             - 1) <= 1e-4
  assert isinstance(new_config, models.TransformerConfig)


@pytest.mark.slow  # a training run and the removal fine-tune: CI slow step
def test_the_value_path_is_switched_on_its_own(removed):
  """Switching only the attention norm's V path changes the logits; with
  both paths fake the model is the all-FakeLN one."""
  workdir, _, config, result = removed
  exp = language_model.Experiment(config, workdir)
  model = exp.eval_model
  params = exp.state.params
  sigmas = {tuple(k.split('/')): v for k, v in result['sigma'].items()}
  switches = ln_removal.initial_switches(sigmas, 1)
  x = np.asarray(next(iter(exp.make_batcher()))['inputs'])

  def logits(sw):
    with nn.intercept_methods(ln_removal.switch_interceptor(sw)):
      return np.asarray(model.apply({'params': params}, x, train=False))

  real = logits(switches)
  v_only = ln_removal.initial_switches(sigmas, 1)
  v_only['fake_v']['decoder/layer_0/attention_norm'] = np.bool_(True)
  assert np.max(np.abs(logits(v_only) - real)) > 1e-4
  fake = ln_removal.all_fake(switches)
  frozen = {tuple(k.split('/')): v for k, v in result['sigma'].items()}
  with nn.intercept_methods(fold.frozen_layernorm_interceptor(frozen)):
    ref = np.asarray(model.apply({'params': params}, x, train=False))
  np.testing.assert_allclose(logits(fake), ref, rtol=0, atol=1e-5)


def test_schedule_must_end_before_num_steps():
  with pytest.raises(configs.ConfigError, match=r'ln_removal.num_steps=6: '
                     r"must be > 6, the step of the final norm's removal"):
    smoke_config('--config.ln_removal.num_steps=6')
