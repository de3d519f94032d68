"""Presets build, tie their references, and reject typos loudly."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import configs
from experiments import sharding
from experiments import translation
from experiments.configs import common
from experiments.configs import iwslt
from experiments.configs import wmt

MODULES = {'iwslt': iwslt, 'wmt': wmt}


@pytest.mark.parametrize('experiment', sorted(MODULES))
@pytest.mark.parametrize('preset', sorted(common.NORM_PRESETS))
@pytest.mark.parametrize('modifier', ['', ',demo', ',smoke', ',multi30k'])
def test_every_preset_builds_and_locks(experiment, preset, modifier):
  c = MODULES[experiment].get_config(preset + modifier)
  assert c.preset == preset + modifier
  assert set(c.model.norms) == set(common.SITES)
  with pytest.raises(AttributeError):
    c.model.not_a_field = 1
  assert MODULES[experiment].PRESETS[preset].__doc__  # the paper's number


def test_paper_recipes():
  pn = iwslt.get_config('powernorm')
  assert (pn.model.d_model, pn.model.ffn_dim, pn.model.num_heads) == (512,
                                                                      1024, 4)
  assert pn.model.placement == 'pre'
  assert pn.schedule.peak_lr == 1.5e-3 and pn.schedule.warmup_steps == 8000
  assert pn.optim.weight_decay == 1e-4 and pn.optim.label_smoothing == 0.1
  assert (pn.decode.beam_size, pn.decode.average_last) == (5, 5)
  enc = pn.model.norms.encoder_attention
  assert enc.kind == 'powernorm' and enc.num_groups == 4
  assert enc.warmup_steps == 8000
  assert pn.model.norms.encoder_final.warmup_steps == 1000  # official quirk
  assert pn.model.norms.decoder_ffn.kind == 'layernorm'
  big = wmt.get_config('powernorm')
  assert (big.model.d_model, big.model.ffn_dim, big.model.num_heads) == (
      1024, 4096, 16)
  assert big.model.norms.encoder_ffn.num_groups == 16
  assert big.schedule.peak_lr == 3e-3 and big.optim.weight_decay == 0.0
  assert (big.decode.beam_size, big.decode.length_penalty,
          big.decode.average_last) == (4, 0.6, 10)


def test_norm_options_follow_the_schedule_and_heads():
  c = iwslt.get_config('powernorm')
  c.unlock()
  c.schedule.warmup_steps = 4000
  c.model.num_heads = 8
  assert c.model.norms.encoder_ffn.warmup_steps == 4000
  assert c.model.norms.encoder_ffn.num_groups == 8
  assert c.model.norms.encoder_final.warmup_steps == 1000


ENCODER = ('encoder_attention', 'encoder_ffn')  # follow model.num_heads


def groups(c):
  return {s: c.model.norms[s].num_groups for s in (*ENCODER, 'encoder_final')}


def test_overriding_one_norm_site_changes_that_site_only():
  c = configs.from_args('iwslt', [
      '--config=powernorm',
      '--config.model.norms.encoder_attention.num_groups=2'])
  assert c.model.num_heads == 4
  assert groups(c) == dict(encoder_attention=2, encoder_ffn=4, encoder_final=4)


@pytest.mark.parametrize('order', [1, -1])
def test_sites_not_overridden_follow_num_heads(order):
  c = configs.from_args('iwslt', ['--config=powernorm', *[
      '--config.model.num_heads=8',
      '--config.model.norms.encoder_ffn.num_groups=2'][::order]])
  assert c.model.num_heads == 8
  assert groups(c) == dict(encoder_attention=8, encoder_ffn=2, encoder_final=8)


def test_overriding_a_norm_warmup_leaves_the_lr_warmup():
  c = configs.from_args('iwslt', [
      '--config=powernorm', '--config.model.norms.encoder_ffn.warmup_steps=5',
      '--config.schedule.warmup_steps=300'])
  assert c.schedule.warmup_steps == 300
  assert c.model.norms.encoder_attention.warmup_steps == 300
  assert c.model.norms.encoder_ffn.warmup_steps == 5
  assert c.model.norms.encoder_final.warmup_steps == 1000


def test_lm_decay_follows_num_steps_and_not_back():
  c = configs.from_args('lm', ['--config=ptb_layernorm',
                               '--config.train.num_steps=700'])
  assert c.schedule.decay_steps == 700
  c = configs.from_args('lm', ['--config=ptb_layernorm',
                               '--config.schedule.decay_steps=50'])
  assert (c.train.num_steps, c.schedule.decay_steps) == (20000, 50)
  c = configs.from_args('lm', ['--config=ptb_pn_v,smoke',
                               '--config.model.norms.decoder_ffn.num_groups=1'])
  assert c.model.num_heads == 2 and c.model.norms.decoder_final.num_groups == 2


def test_checked_config_has_plain_values_and_is_locked():
  """What the run sees (and checkpointing.run_identity records) are plain
  values: setting one field afterwards moves no other."""
  c = configs.from_args('lm', ['--config=ptb_powernorm,smoke'])
  c.unlock()
  c.model.num_heads = 1
  c.train.num_steps = 99
  assert c.model.norms.decoder_ffn.num_groups == 2
  assert c.schedule.decay_steps == 6
  c.lock()
  with pytest.raises(AttributeError):
    c.model.not_a_field = 1


def test_unknown_preset_and_modifier_name_the_choices():
  with pytest.raises(configs.ConfigError, match='unknown preset.*powernorm'):
    iwslt.get_config('powrnorm')
  with pytest.raises(configs.ConfigError, match='unknown modifier.*demo'):
    iwslt.get_config('powernorm,dmo')


def run_cli(*args):
  return subprocess.run(
      [sys.executable, '-m', 'experiments.wmt', *args], capture_output=True,
      text=True, timeout=120)


@pytest.mark.parametrize('args,message', [
    (['--config=powrnorm'], 'unknown preset'),
    (['--config=powernorm,smoke', '--config.model.d_modl=3'], 'd_modl'),
    (['--config=powernorm,smoke', '--config.model.d_model=abc'], 'd_model'),
    (['--config=powernorm,smoke', '--bogus_flag=1'], 'bogus_flag'),
])
def test_cli_errors_are_one_line(args, message):
  out = run_cli(*args)
  assert out.returncode != 0
  assert message in out.stderr
  assert 'Traceback' not in out.stderr, out.stderr


def test_mesh_sizes_are_checked():
  assert sharding.mesh_shape(dict(data=-1, fsdp=1, tensor=1), 8) == (8, 1, 1)
  assert sharding.mesh_shape(dict(data=2, fsdp=-1, tensor=2), 8) == (2, 2, 2)
  with pytest.raises(sharding.MeshError, match='does not divide the 8'):
    sharding.mesh_shape(dict(data=3, fsdp=1, tensor=1), 8)
  with pytest.raises(sharding.MeshError, match='at most one'):
    sharding.mesh_shape(dict(data=-1, fsdp=-1, tensor=1), 8)


def test_bfloat16_compute_keeps_params_and_norm_statistics_float32(tmp_path):
  """--config.model.dtype=bfloat16: activations (every norm's output, hence
  the residual stream) in bfloat16; params, the norms' running and backward
  statistics and the logits float32; a few steps on one batch lower the
  loss."""
  config = configs.from_args('wmt', ['--config=powernorm,smoke',
                                     '--config.model.dtype=bfloat16'])
  exp = translation.Experiment(config, str(tmp_path))
  batch = next(iter(exp.batcher))
  state, losses = exp.state, []
  for _ in range(6):
    state, metrics = exp.train_step(state, batch)
    losses.append(float(metrics['loss']))
  assert np.isfinite(losses).all() and losses[-1] < losses[0] - 0.3, losses
  floats = lambda tree: {x.dtype.name for x in jax.tree.leaves(tree)
                         if jnp.issubdtype(x.dtype, jnp.floating)}
  assert floats(state.params) == {'float32'}
  assert floats(state.batch_stats) == floats(state.grad_stats) == {
      'float32'}

  def forward(variables):
    return exp.model.apply(
        variables, batch['inputs'], batch['targets'], train=True,
        rngs={'dropout': jax.random.key(0)},
        mutable=['batch_stats', 'intermediates'],
        capture_intermediates=lambda m, method: (
            method == '__call__' and (m.name or '').endswith('_norm')))
  with jax.set_mesh(exp.mesh):
    logits, updates = jax.eval_shape(forward, state.variables())
  assert logits.dtype == jnp.float32
  assert floats(updates['intermediates']) == {'bfloat16'}
  assert len(jax.tree.leaves(updates['intermediates'])) == 7  # every norm
