"""experiments.probing: the probed train step, the probes file, resume."""

import chex
import jax
import numpy as np
import pytest

from experiments import language_model
from experiments import probing
from experiments import sharding
from experiments import dynamics
from experiments.configs import lm as lm_configs


def _config(**train):
  c = lm_configs.get_config('ptb_powernorm,smoke')
  c.update_from_flattened_dict({f'train.{k}': v for k, v in train.items()})
  return c


@pytest.fixture(scope='module')
def experiment(tmp_path_factory):
  return language_model.Experiment(
      _config(probe_every=1, probe_exact_gradient=True),
      str(tmp_path_factory.mktemp('probing')))


def test_probed_step_updates_the_state_exactly_like_the_plain_one(experiment):
  exp = experiment
  batches = iter(exp.batcher)
  plain = probed = exp.state
  copy = lambda s: jax.tree.map(lambda x: x.copy(), s)  # steps donate
  plain, probed = copy(plain), copy(probed)
  with jax.set_mesh(exp.mesh):
    for _ in range(3):
      batch = sharding.global_batch(next(batches), exp.mesh)
      plain, m0 = exp.train_step(plain, batch)
      probed, m1 = exp.probe_step(probed, batch)
  chex.assert_trees_all_equal(plain, probed)
  assert float(m0['loss']) == float(m1['loss'])
  probes = {k: float(v) for k, v in m1['probes'].items()}
  site = 'decoder/layer_0/ffn_norm'
  for metric in ('act_var', 'act_max', 'qm_dist', 'grad_stat'):
    assert np.isfinite(probes[f'{site}/{metric}']), metric
  assert probes[f'{site}/grad_stat'] > 0  # u moved off its init 0
  assert 0.0 < probes['model/grad_cosine'] <= 1.0 + 1e-6
  # After PowerNorm's warmup (3 steps in smoke) the two gradients differ.
  assert probes['model/grad_cosine'] < 1.0 - 1e-6
  np.testing.assert_allclose(probes['model/grad_norm'], float(m1['grad_norm']),
                             rtol=1e-5)
  layers = [k for k in probes if k.endswith('/grad_norm') and k != 'model/grad_norm']
  np.testing.assert_allclose(
      np.sqrt(sum(probes[k]**2 for k in layers)), probes['model/grad_norm'],
      rtol=1e-5)


def test_layer_of_groups_parameters_by_layer():
  assert probing.layer_of('decoder/layer_3/ffn/fc1/kernel') == 'decoder/layer_3'
  assert probing.layer_of('layer_0/attention_norm/scale') == 'layer_0'
  assert probing.layer_of('embedding/embedding') == 'embedding'


def test_probe_log_is_tidy_and_drops_rows_after_the_resume_step(tmp_path):
  log = probing.ProbeLog(str(tmp_path))
  for step in (2, 4, 6):
    log.write(step, {'decoder/layer_0/ffn_norm/act_var': step / 10,
                     'model/grad_norm': float(step)})
  got = probing.read_probes(str(tmp_path))
  np.testing.assert_array_equal(got[('model', 'grad_norm')][0], [2, 4, 6])
  np.testing.assert_allclose(
      got[('decoder/layer_0/ffn_norm', 'act_var')][1], [0.2, 0.4, 0.6])
  probing.ProbeLog(str(tmp_path), resume_step=4)  # a run resumed at step 4
  got = probing.read_probes(str(tmp_path))
  np.testing.assert_array_equal(got[('model', 'grad_norm')][0], [2, 4])


def test_a_foreign_file_is_not_overwritten(tmp_path):
  (tmp_path / 'probes.csv').write_text('a,b\n1,2\n')
  with pytest.raises(ValueError, match='not a probes file'):
    probing.ProbeLog(str(tmp_path))
  assert (tmp_path / 'probes.csv').read_text() == 'a,b\n1,2\n'


@pytest.mark.slow  # 23 s; CI's notebook step runs probed_lm_run as well
def test_dynamics_run_records_every_probe_step():
  run = dynamics.probed_lm_run('ptb_batchnorm,smoke', steps=4, probe_every=2)
  assert run.losses.shape == (4,)
  steps, values = run.mean_over_sites('var_dist')
  np.testing.assert_array_equal(steps, [2, 4])
  assert np.all(values > 0)
  with pytest.raises(KeyError, match='no probe'):
    run.series('decoder/layer_0/ffn_norm', 'qm_dist')
  with pytest.raises(KeyError, match='Did you mean "probe_every"'):
    dynamics.lm_config('ptb_batchnorm,smoke', {'train.probe_evry': 2})
