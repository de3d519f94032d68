"""Start-up validation of the config (experiments.configs.validate): every
range, choice and divisibility, named by its flag, all at once."""

import os
import subprocess
import sys

import pytest

from experiments import configs
from experiments.configs import common
from experiments.configs import iwslt
from experiments.configs import lm
from experiments.configs import validate
from experiments.configs import wmt

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))

PRESETS = [(m, p + mod) for m in (iwslt, wmt) for p in common.NORM_PRESETS
           for mod in ('', ',demo', ',smoke', ',multi30k')] + [
               (lm, p + mod) for p in lm.PRESETS
               for mod in ('', ',small', ',demo', ',smoke')]


def problem(experiment, preset, *overrides):
  with pytest.raises(configs.ConfigError) as e:
    configs.from_args(experiment, [f'--config={preset}', *overrides])
  return str(e.value)


@pytest.mark.parametrize('override,message', [
    ('train.keep_checkpoints=0', 'train.keep_checkpoints=0: must be >= 1'),
    ('train.checkpoint_every=0', 'train.checkpoint_every=0: must be >= 1'),
    ('train.log_every=0', 'train.log_every=0: must be >= 1'),
    ('train.eval_every=0', 'train.eval_every=0: must be >= 1'),
    ('train.num_steps=0', 'train.num_steps=0: must be >= 1'),
    ('train.num_steps=-5', 'train.num_steps=-5: must be >= 1'),
    ('schedule.peak_lr=-0.001', 'schedule.peak_lr=-0.001: must be > 0'),
    ('model.num_heads=3', 'model.num_heads=3: must divide model.d_model=32'),
    ('model.norms.encoder_ffn.num_groups=3',
     'model.norms.encoder_ffn.num_groups=3: must divide model.d_model=32'),
    ('model.dropout=1.0', 'model.dropout=1.0: must be in [0, 1)'),
    ('model.placement=side',
     'model.placement=side: choose one of hybrid, lns, mix,'),
    ('model.dtype=float64', 'model.dtype=float64: choose one of bfloat16, '
     'float32'),
    ('model.norms.decoder_ffn.kind=powrnorm',
     'model.norms.decoder_ffn.kind=powrnorm: choose one of batchnorm,'),
    ('schedule.kind=linear', 'schedule.kind=linear: choose one of cosine, '
     'inverse_sqrt'),
    ('train.nonfinite=ignore', 'train.nonfinite=ignore: choose one of skip, '
     'stop'),
    ('data.source=web', 'data.source=web: choose one of local, synthetic, '
     'tfds'),
    ('data.vocab=bpe', 'data.vocab=bpe: choose one of sentencepiece, word'),
    ('data.max_len=1', 'data.max_len=1: must be 0 (no limit) or >= 2'),
    ('data.max_len=500', 'data.max_len=500: must be <= model.max_len=128'),
    ('data.max_buckets=0', 'data.max_buckets=0: must be >= 1'),
    ('decode.beam_size=0', 'decode.beam_size=0: must be >= 1'),
    ('optim.b2=1.0', 'optim.b2=1.0: must be in [0, 1)'),
    ('mesh.data=0', 'mesh.data=0: must be >= 1, or -1 for every remaining'),
])
def test_each_problem_names_its_flag(override, message):
  text = problem('wmt', 'powernorm,smoke', f'--config.{override}')
  assert f'--config.{message}' in text, text


def test_num_groups_that_does_not_divide_the_width_blames_num_groups():
  text = problem('wmt', 'powernorm,smoke',
                 '--config.model.norms.encoder_ffn.num_groups=3')
  assert text == ('--config.model.norms.encoder_ffn.num_groups=3: must '
                  'divide model.d_model=32')
  # The sites that follow model.num_heads fail with it, each by its flag.
  text = problem('wmt', 'powernorm,smoke', '--config.model.num_heads=3')
  assert text.startswith('4 config problems: --config.model.num_heads=3: ')
  assert '--config.model.norms.encoder_final.num_groups=3: ' in text


def test_norm_options_go_through_normjax():
  text = problem('wmt', 'powernorm,smoke',
                 '--config.model.norms.encoder_final.backward_denominator=x')
  assert text.startswith(
      '--config.model.norms.encoder_final.backward_denominator=x: ')
  assert "'batch'" in text and "'running'" in text


def test_lm_rules():
  assert problem('lm', 'ptb_powernorm,smoke', '--config.data.seq_len=600') == (
      '--config.data.seq_len=600: must be <= model.max_len=512')
  assert problem('lm', 'ptb_powernorm,smoke',
                 '--config.schedule.decay_steps=0') == (
                     '--config.schedule.decay_steps=0: must be >= 1')
  assert problem('lm', 'ptb_layernorm',
                 '--config.model.adaptive_softmax_cutoffs=(20, 10)') == (
                     '--config.model.adaptive_softmax_cutoffs=(20, 10): must '
                     'be increasing positive ints (empty: a full softmax)')
  config = configs.from_args(
      'lm', ['--config=ptb_layernorm',
             '--config.model.adaptive_softmax_cutoffs=(10, 20)'])
  assert config.model.adaptive_softmax_cutoffs == (10, 20)
  # With head_dim set, the heads need not divide d_model.
  config = configs.from_args('lm', ['--config=ptb_layernorm',
                                    '--config.model.num_heads=3'])
  assert config.model.head_dim == 40


def test_every_problem_is_reported_together():
  text = problem('wmt', 'powernorm,smoke', '--config.train.log_every=0',
                 '--config.schedule.peak_lr=-1.0', '--config.model.dtype=f8')
  assert text.startswith('3 config problems: ')
  for flag in ('model.dtype=f8', 'schedule.peak_lr=-1.0', 'train.log_every=0'):
    assert f'--config.{flag}: ' in text
  assert '\n' not in text


@pytest.mark.parametrize('module,preset', PRESETS,
                         ids=[f'{m.__name__.split(".")[-1]}:{p}'
                              for m, p in PRESETS])
def test_every_preset_passes(module, preset):
  assert validate.problems(module.get_config(preset)) == []


def test_every_rule_names_a_field_of_some_preset():
  samples = [iwslt.get_config('powernorm'), lm.get_config('ptb_powernorm')]
  for pattern, *_ in validate.RULES:
    assert any(list(validate.expand(c, pattern)) for c in samples), pattern


def test_the_command_line_stops_before_anything_runs(tmp_path):
  workdir = tmp_path / 'run'
  out = subprocess.run(
      [sys.executable, '-m', 'experiments.lm', '--config=ptb_powernorm,smoke',
       '--config.train.checkpoint_every=0', '--config.schedule.peak_lr=-1.0',
       f'--workdir={workdir}'],
      capture_output=True, text=True, timeout=120, cwd=ROOT)
  assert out.returncode == 2, out.stderr
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(
      'error: 2 config problems: --config.schedule.peak_lr=-1.0: must be > 0; '
      '--config.train.checkpoint_every=0: must be >= 1'), out.stderr
  assert not workdir.exists()
