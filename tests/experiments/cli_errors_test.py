"""User errors at the command line: exit code 2 and one line, no traceback.

Each case runs an entry point in a fresh process, as a user would; the
messages themselves are tested in detail where they are raised (data_test,
lm_data_test, configs_test, sharding). Runs with 2 simulated devices, so a
mesh or batch that does not divide them can be tried.
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


def corpus(path, test_en=None):
  """A tiny local de-en corpus; `test_en` replaces test.en's lines."""
  os.makedirs(path, exist_ok=True)
  for split in ('train', 'valid', 'test'):
    for lang in ('de', 'en'):
      lines = [f'{split} {lang} satz {i}' for i in range(4)]
      if (split, lang) == ('test', 'en') and test_en is not None:
        lines = test_en
      with open(os.path.join(path, f'{split}.{lang}'), 'w') as fh:
        fh.write('\n'.join(lines) + '\n')
  return path


CASES = {  # name: (module, args, words the line must contain)
    'unknown preset': ('wmt', ['--config=powrnorm'], ['powrnorm', 'powernorm']),
    'misspelled key': ('wmt', ['--config=powernorm,smoke',
                               '--config.model.d_modl=3'], ['d_modl', 'd_model']),
    'wrongly typed value': ('lm', ['--config=ptb_powernorm,smoke',
                                   '--config.model.d_model=abc'], ['abc']),
    'missing data directory': ('lm', ['--config=ptb_layernorm,smoke',
                                      '--config.data.source=local',
                                      '--config.data.path={tmp}/none'],
                               ['{tmp}/none']),
    'different line counts': ('wmt', ['--config=powernorm,smoke',
                                      '--config.data.source=local',
                                      '--config.data.path={tmp}/mismatch'],
                              ['test.en', 'lines']),
    'mesh not dividing the devices': ('lm', ['--config=ptb_powernorm,smoke',
                                             '--config.mesh.data=3'],
                                      ['does not divide']),
    'batch not divisible by the data axis': (
        'lm', ['--config=ptb_powernorm,smoke', '--config.data.batch_size=3'],
        ['batch_size=3']),
}


# experiments.average: (args, words the line must contain); {tmp}/empty has an
# empty checkpoints/ directory.
AVERAGE_CASES = {
    'no --workdir': ([], ['--workdir']),
    'no checkpoint directory': (['--workdir={tmp}/none'],
                                ['{tmp}/none/checkpoints']),
    'no complete checkpoint': (['--workdir={tmp}/empty'],
                               ['{tmp}/empty/checkpoints', 'no complete']),
    'last=0': (['--workdir={tmp}/empty', '--last=0'], ['--last=0']),
}

DEFAULT = ('unknown preset', 'missing data directory',
           'mesh not dividing the devices',
           'no checkpoint directory', 'last=0')  # the rest in the slow step


def cases(table):
  """The names of `table`, those not in DEFAULT marked slow."""
  return [n if n in DEFAULT else pytest.param(n, marks=pytest.mark.slow)
          for n in sorted(table)]


def assert_one_line_error(module, args, words, tmp_path):
  """`python -m experiments.<module> <args>` exits with code 2 and one error
  line holding `words` ({tmp} stands for `tmp_path`), no traceback."""
  fill = lambda s: s.replace('{tmp}', str(tmp_path))
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2',
             JAX_PLATFORMS='cpu')
  env.pop('NORMJAX_TRACEBACK', None)
  done = subprocess.run(
      [sys.executable, '-m', f'experiments.{module}', *map(fill, args)],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  lines = [l for l in done.stderr.splitlines()
           if l.strip() and not l.startswith(('W', 'I')) or 'rror' in l]
  assert done.returncode == 2, done.stderr[-2000:]
  assert 'Traceback' not in done.stderr, done.stderr[-2000:]
  errors = [l for l in lines if 'rror' in l]
  assert len(errors) == 1, done.stderr[-2000:]
  for word in map(fill, words):
    assert word in errors[0], (word, errors[0])


@pytest.mark.parametrize('name', cases(CASES))
def test_user_error_is_one_line(name, tmp_path):
  module, args, words = CASES[name]
  corpus(str(tmp_path / 'mismatch'), test_en=['only one line'])
  assert_one_line_error(module, ['--workdir={tmp}/run', *args], words,
                        tmp_path)


@pytest.mark.parametrize('name', cases(AVERAGE_CASES))
def test_average_user_error_is_one_line(name, tmp_path):
  args, words = AVERAGE_CASES[name]
  os.makedirs(tmp_path / 'empty' / 'checkpoints')
  assert_one_line_error('average', args, words, tmp_path)
