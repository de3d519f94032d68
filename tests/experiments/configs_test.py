"""Presets build, tie their references, and reject typos loudly."""

import subprocess
import sys

import pytest

from experiments import configs
from experiments import sharding
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
