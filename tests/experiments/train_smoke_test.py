"""End to end: train a few steps, checkpoint, resume exactly, decode, score."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import run_helpers
from experiments import average
from experiments import checkpointing
from experiments import train_lib
from experiments import translation
from experiments.configs import wmt


pytestmark = pytest.mark.usefixtures('compilation_cache')


def smoke_config(num_steps, preset='powernorm,smoke'):
  c = wmt.get_config(preset)
  c.unlock()
  c.train.num_steps = num_steps
  c.lock()
  return c


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  return run_helpers.straight_and_resumed(
      translation.train_and_evaluate, smoke_config, tmp_path_factory, '')


def test_resume_is_exact(runs):
  straight, resumed, _ = runs
  (a, meta_a), (b, meta_b) = run_helpers.checkpoint(straight, 6), run_helpers.checkpoint(resumed, 6)
  assert meta_a['data'] == meta_b['data']
  chex_equal = jax.tree.map(lambda x, y: np.array_equal(x, y), a, b)
  assert all(jax.tree.leaves(chex_equal)), 'resumed run diverged'
  # The PowerNorm states moved and were checkpointed.
  enc = a['batch_stats']['encoder']['layer_0']['attention_norm']
  assert int(enc['step']) == 6
  gz = a['grad_stats']['encoder']['layer_0']['attention_norm']
  assert float(np.abs(gz['ema_gz']).max()) > 0


def test_outputs_and_averaging(runs):
  straight, _, result = runs
  for name in ('results.json', 'test_hypotheses.txt', 'averaged',
               'tensorboard'):
    assert os.path.exists(os.path.join(straight, name)), name
  with open(os.path.join(straight, 'results.json')) as f:
    saved = json.load(f)
  assert set(saved) >= {'loss', 'ppl', 'bleu', 'tok_bleu', 'averaged_steps'}
  assert saved['averaged_steps'] == [3, 6]
  assert np.isfinite(result['loss'])
  assert os.listdir(os.path.join(straight, 'tensorboard'))
  steps = average.average_last(straight, 2)
  assert steps == [3, 6]
  (a, _), (b, _) = run_helpers.checkpoint(straight, 3), run_helpers.checkpoint(straight, 6)
  avg, _, _ = checkpointing.read(os.path.join(straight, translation.AVERAGED))
  np.testing.assert_allclose(
      avg['params']['shared_embedding']['embedding'],
      (a['params']['shared_embedding']['embedding']
       + b['params']['shared_embedding']['embedding']) / 2,
      rtol=1e-6)


def test_eval_mode_scores_a_checkpoint(runs):
  straight, _, _ = runs
  result = translation.evaluate(smoke_config(6), straight, 'latest', 'valid')
  assert np.isfinite(result['ppl']) and 'bleu' in result


def test_vocabulary_mismatch_on_resume_is_reported(runs, tmp_path):
  straight, _, _ = runs
  c = smoke_config(8)
  c.unlock()
  c.data.synthetic_seed = 7  # another corpus: another vocabulary
  c.lock()
  with pytest.raises(ValueError, match='vocab_fingerprint'):
    translation.train_and_evaluate(c, straight)


def test_label_smoothed_loss_by_hand():
  logits = jnp.log(jnp.asarray([[[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]]))
  targets = jnp.asarray([[0, 2]])
  weights = jnp.asarray([[1.0, 0.0]])
  loss, nll, n = train_lib.label_smoothed_loss(logits, targets, weights, 0.3)
  logp = np.log([0.7, 0.2, 0.1])
  want = (1 - 0.3 - 0.1) * -logp[0] + 0.1 * -logp.sum()
  assert float(n) == 1.0
  assert float(nll) == pytest.approx(-logp[0], rel=1e-6)
  assert float(loss) == pytest.approx(want, rel=1e-6)
