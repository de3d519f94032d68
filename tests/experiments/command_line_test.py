"""The command line explains itself: --help, --print_config, unknown keys
with the valid ones, and no empty workdir left by a run that failed before
its first checkpoint. (config.json, the TensorBoard hparams, the start-up
banner and the compile-time line are checked on the runs of the sweep's
end-to-end test, tests/experiments/sweep_test.py.)"""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def _run(module, *args):
  return subprocess.run([sys.executable, '-m', f'experiments.{module}',
                         *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=300, check=False)


def test_help_lists_flags_presets_and_modifiers_and_exits_0():
  done = _run('wmt', '--help')
  assert done.returncode == 0, done.stderr
  for text in ('--workdir', '--mode', '--print_config', 'Presets:',
               'powernorm ', 'Modifiers:', 'multi30k ', 'Transformer_PN'):
    assert text in done.stdout, text


def test_unknown_keys_name_the_path_and_the_valid_keys():
  nested = _run('wmt', '--config=powernorm,smoke', '--config.optim.peak=3')
  assert nested.returncode == 2
  assert ("--config.optim.peak: no key 'peak' in config.optim; the keys "
          'there are b1, b2,') in nested.stderr
  top = _run('lm', '--config.lr=3')  # no --config: the default preset
  assert top.returncode == 2 and 'Traceback' not in top.stderr
  assert "--config.lr: no key 'lr' in config; the keys there are data," \
      in top.stderr


def test_print_config_prints_the_resolved_config_and_exits(tmp_path):
  done = _run('lm', '--config=ptb_powernorm,smoke',
              '--config.train.num_steps=9', '--print_config',
              f'--workdir={tmp_path}/w')
  assert done.returncode == 0, done.stderr
  assert 'num_steps: 9' in done.stdout and 'kind: powernorm' in done.stdout
  assert not os.path.exists(tmp_path / 'w')


def test_a_failed_run_leaves_no_workdir_it_created(tmp_path):
  args = ['--config=ptb_layernorm,smoke', '--config.data.source=local',
          f'--config.data.path={tmp_path}/none']
  fresh = _run('lm', *args, f'--workdir={tmp_path}/fresh')
  assert fresh.returncode == 2 and 'does not exist' in fresh.stderr
  assert not os.path.exists(tmp_path / 'fresh')
  os.makedirs(tmp_path / 'mine')
  (tmp_path / 'mine' / 'notes.txt').write_text('kept')
  kept = _run('lm', *args, f'--workdir={tmp_path}/mine')
  assert kept.returncode == 2
  assert (tmp_path / 'mine' / 'notes.txt').read_text() == 'kept'
