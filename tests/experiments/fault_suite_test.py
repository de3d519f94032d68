"""The fault suite: each class of fault once, against the real command line
(`python -m experiments.wmt` / `experiments.lm` on the smoke presets), with
what the run does and what it keeps. The README's Reliability table is this
suite's output (`pytest -m slow -n 0 -s tests/experiments/fault_suite_test.py`).

Slow (about twenty subprocess runs): run by CI's `pytest -m slow -n 0`.
"""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from experiments import checkpointing
from experiments import faults

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
STEPS = 12
WMT = ['experiments.wmt', '--config=powernorm,smoke',
       f'--config.train.num_steps={STEPS}', '--config.train.eval_every=1000',
       '--config.train.log_every=1000']
LM = ['experiments.lm', '--config=ptb_powernorm,smoke',
      '--config.train.eval_every=1000', '--config.train.log_every=1000']
TABLE = []


def report(fault, behaviour, kept):
  TABLE.append((fault, behaviour, kept))
  print(f'\n| {fault} | {behaviour} | {kept} |')


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp('xla_cache'))


def start(args, workdir, cache, *extra, log=None):
  """Starts the command; its output goes to <log or workdir>.out/.err."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_COMPILATION_CACHE_DIR=cache,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  env.pop('XLA_FLAGS', None)
  log = log or workdir
  out = open(log + '.out', 'w')  # pylint: disable=consider-using-with
  err = open(log + '.err', 'w')  # pylint: disable=consider-using-with
  proc = subprocess.Popen(
      [sys.executable, '-m', *args, *extra, f'--workdir={workdir}'], cwd=ROOT,
      env=env, stdout=out, stderr=err)
  proc.files = (out, err, log)
  return proc


def finish(proc, timeout=400):
  """(exit code, stdout, stderr) of a started run."""
  proc.wait(timeout=timeout)
  out, err, log = proc.files
  out.close()
  err.close()
  with open(log + '.out') as o, open(log + '.err') as e:
    return proc.returncode, o.read(), e.read()


def run(args, workdir, cache, *extra):
  return finish(start(args, workdir, cache, *extra))


def rows(workdir):
  path = os.path.join(workdir, 'losses.csv')
  return faults.read_losses(path) if os.path.exists(path) else []


def wait_rows(proc, workdir, n, timeout=300):
  deadline = time.time() + timeout
  while len(rows(workdir)) < n:
    assert proc.poll() is None, finish(proc)[2][-2000:]
    assert time.time() < deadline
    time.sleep(0.002)


def one_line(err):
  """The run's last stderr line, asserting there is no traceback."""
  assert 'Traceback' not in err, err[-3000:]
  return [l for l in err.strip().splitlines() if l.strip()][-1]


def results(workdir):
  with open(os.path.join(workdir, 'results.json')) as f:
    return json.load(f)


def same_checkpoint(a, b):
  (sa, ma, _), (sb, mb, _) = a, b
  assert ma['steps'] == mb['steps'] if 'steps' in ma else True
  return all(jax.tree.leaves(jax.tree.map(np.array_equal, sa, sb)))


@pytest.fixture(scope='module')
def straight(tmp_path_factory, cache):
  workdir = str(tmp_path_factory.mktemp('suite') / 'straight')
  code, _, err = run(WMT, workdir, cache)
  assert code == 0, err[-3000:]
  return workdir


def test_sigterm_and_sigint_then_resume_change_nothing(straight, tmp_path,
                                                       cache):
  workdir = str(tmp_path / 'preempted')
  rng = random.Random(0)
  stops = []
  for signum in (signal.SIGTERM, signal.SIGINT):
    proc = start(WMT, workdir, cache)
    target = len(rows(workdir)) + rng.randint(1, 4)
    wait_rows(proc, workdir, target)
    proc.send_signal(signum)
    code, _, err = finish(proc)
    line = one_line(err)
    assert code == 128 + signum, err[-2000:]
    assert f'stopped by {signal.Signals(signum).name} after step' in line
    stops.append(int(line.split('after step ')[1].split(';')[0]))
  code, _, err = run(WMT, workdir, cache)
  assert code == 0, err[-3000:]
  assert rows(workdir) == rows(straight)
  assert (checkpointing.steps(os.path.join(workdir, 'checkpoints')) ==
          checkpointing.steps(os.path.join(straight, 'checkpoints')))
  assert results(workdir) == results(straight)
  assert same_checkpoint(
      checkpointing.read(os.path.join(workdir, 'averaged')),
      checkpointing.read(os.path.join(straight, 'averaged')))
  report(f'SIGTERM after step {stops[0]}, SIGINT after step {stops[1]} '
         '(seeded), then the same command', 'one line each, exit 143 / 130; '
         'the resumed run ends with the same losses.csv, checkpoints, '
         'averaged model and test scores as an uninterrupted run',
         'a checkpoint at the stopping step (never averaged, pruned once a '
         'newer one exists)')


def test_resumed_longer_run_rewrites_the_average_and_eval_names_it(
    straight, tmp_path, cache):
  workdir = str(tmp_path / 'longer')
  shutil.copytree(straight, workdir)
  code, _, err = run(WMT, workdir, cache,
                     f'--config.train.num_steps={STEPS + 3}')
  assert code == 0, err[-3000:]
  _, meta, _ = checkpointing.read(os.path.join(workdir, 'averaged'))
  assert meta['steps'] == [STEPS, STEPS + 3]
  assert results(workdir)['averaged_steps'] == [STEPS, STEPS + 3]
  code, out, err = run(WMT, workdir, cache, '--mode=eval')
  assert code == 0, err[-3000:]
  assert f'averaged: the average of steps [{STEPS}, {STEPS + 3}]' in out
  code, out, err = run(['experiments.average', '--last=1'], workdir, cache)
  assert code == 0, err[-3000:]
  _, meta, _ = checkpointing.read(os.path.join(workdir, 'averaged'))
  assert meta['steps'] == [STEPS + 3] and f'[{STEPS + 3}]' in out
  report('the run resumed with more steps; `experiments.average --last=1`',
         'the averaged checkpoint is rewritten (atomically) with the new '
         'steps; `--mode=eval` prints the steps it scores',
         'the checkpoints; the old average until the new one is complete')


def test_second_process_on_a_workdir_is_refused(tmp_path, cache):
  workdir = str(tmp_path / 'shared')
  first = start(WMT, workdir, cache, '--config.train.num_steps=1000')
  wait_rows(first, workdir, 1)
  second = start(WMT, workdir, cache, '--config.train.num_steps=3',
                 log=workdir + '_second')
  code, _, err = finish(second)
  line = one_line(err)
  assert code == 2 and f'is in use by pid {first.pid}' in line, err[-2000:]
  assert first.poll() is None  # the first run goes on
  first.send_signal(signal.SIGTERM)
  code, _, err = finish(first)
  assert code == 143, err[-2000:]
  steps = [int(r['step']) for r in rows(workdir)]
  assert steps == list(range(1, len(steps) + 1))
  report('a second process on the same workdir', 'refused in one line '
         'naming the holder (pid, host, start time), exit 2; a lock left by a '
         'killed process is taken over', "the first run's files, untouched")


def test_altered_checkpoint_is_moved_aside_and_the_run_resumes(
    straight, tmp_path, cache):
  workdir = str(tmp_path / 'altered')
  shutil.copytree(straight, workdir)
  meta_file = os.path.join(workdir, 'checkpoints', str(STEPS), 'meta',
                           'metadata')
  with open(meta_file) as f:
    meta = json.load(f)
  digest, count = meta['checksum'].split('/')
  meta['checksum'] = f'{int(digest, 16) ^ 1:08x}/{count}'
  with open(meta_file, 'w') as f:
    json.dump(meta, f)
  code, out, err = run(WMT, workdir, cache)
  assert code == 0, err[-3000:]
  assert 'does not match its checksum' in err
  assert f'resumed from step {STEPS - 3}' in out
  assert os.listdir(os.path.join(workdir, 'invalid_checkpoints')) == [
      str(STEPS)]
  assert results(workdir) == results(straight)
  report("the newest checkpoint's data altered (checksum mismatch)",
         'a one-line warning; moved to invalid_checkpoints/, the run resumes '
         'from the one before and ends as an uninterrupted run',
         'the altered checkpoint (moved aside, never deleted)')


def test_empty_valid_split_fails_before_compiling(tmp_path, cache):
  data = tmp_path / 'ptb'
  data.mkdir()
  for split in ('train', 'valid', 'test'):
    text = '' if split == 'valid' else 'the cat sat on the mat .\n' * 50
    (data / f'ptb.{split}.txt').write_text(text)
  workdir = str(tmp_path / 'empty')
  begin = time.time()
  code, _, err = run(LM, workdir, cache, '--config.data.source=local',
                     f'--config.data.path={data}')
  line = one_line(err)
  assert code == 2 and 'the valid split' in line and '0 tokens' in line, err
  assert not os.path.exists(os.path.join(workdir, 'checkpoints'))
  report('an empty valid split (PTB layout)', f'one line naming the split '
         f'and path, exit 2, after {time.time() - begin:.0f} s (before '
         'compiling)', 'nothing was written')


def test_divergence_stops_naming_the_step(tmp_path, cache):
  workdir = str(tmp_path / 'diverge')
  code, _, err = run(LM, workdir, cache, '--config.schedule.peak_lr=1000.0',
                     '--config.train.num_steps=40',
                     '--config.train.checkpoint_every=5')
  line = one_line(err)
  assert code == 3, err[-3000:]
  step = int(re.search(r'step (\d+)', line).group(1))
  assert 'last good checkpoint is' in line
  why = re.search(r'loss \S+ is \S+ times [^;(]+', line).group(0).strip()
  report('learning rate 1e3 (divergence)', f'stopped at step {step} in one '
         f'line ("{why}", the layer with the largest gradient), exit 3',
         'the checkpoints before it; nothing non-finite is ever committed')
  print('\n'.join(f'| {a} | {b} | {c} |' for a, b, c in TABLE))
