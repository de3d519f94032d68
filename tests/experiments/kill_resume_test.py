"""Real faults on a real process: SIGKILL at seeded points (one of them while
an asynchronous checkpoint is being written) and SIGTERM, then the same
command again. The resumed run's per-step losses, batches (CRCs), norm
states and final checkpoint must equal an uninterrupted run's bit for bit.

Slow (several subprocesses): run by `pytest -m slow -n 0`.
"""

import glob
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from experiments import checkpointing
from experiments import faults

STEPS = 16
ARGS = ['--config=ptb_powernorm,smoke', f'--config.train.num_steps={STEPS}',
        '--config.train.checkpoint_every=2', '--config.train.keep_checkpoints=2',
        '--config.train.eval_every=1000', '--config.train.log_every=1000']
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))


def start(workdir, cache):
  """The run's command; its output goes to <workdir>.out/.err."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_COMPILATION_CACHE_DIR=cache,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  env.pop('XLA_FLAGS', None)  # one device, as a user's CPU run
  with open(workdir + '.out', 'w') as out, open(workdir + '.err', 'w') as err:
    return subprocess.Popen(
        [sys.executable, '-m', 'experiments.lm', *ARGS,
         f'--workdir={workdir}'], cwd=ROOT, env=env, stdout=out, stderr=err)


def finish(proc, timeout=300):
  """Waits; returns (exit code, stdout, stderr)."""
  proc.wait(timeout=timeout)
  workdir = proc.args[-1].split('=', 1)[1]
  with open(workdir + '.out') as out, open(workdir + '.err') as err:
    return proc.returncode, out.read(), err.read()


def rows(workdir):
  path = os.path.join(workdir, 'losses.csv')
  return faults.read_losses(path) if os.path.exists(path) else []


def saving(workdir):
  """An orbax temporary directory: a save is in flight."""
  return bool(glob.glob(os.path.join(workdir, 'checkpoints', '*tmp*')))


def wait_for(proc, condition, timeout=180):
  deadline = time.time() + timeout
  while not condition():
    if proc.poll() is not None:
      code, _, err = finish(proc)
      raise AssertionError(f'run ended early ({code}): {err[-2000:]}')
    assert time.time() < deadline, 'timed out waiting for the run'
    time.sleep(0.0005)


def final(workdir):
  """(state, meta) of the newest checkpoint, which must be the last step's."""
  state, meta, step = checkpointing.read(os.path.join(workdir, 'checkpoints'))
  assert step == STEPS
  return state, meta


@pytest.mark.slow
def test_sigkill_and_sigterm_then_resume_is_bitwise_exact(tmp_path):
  cache = str(tmp_path / 'xla_cache')
  straight, faulty = str(tmp_path / 'straight'), str(tmp_path / 'faulty')
  code, _, err = finish(start(straight, cache))
  assert code == 0, err[-2000:]

  rng = random.Random(0)
  log = []
  # 1. SIGKILL as soon as a checkpoint save is in flight (async writer).
  proc = start(faulty, cache)
  wait_for(proc, lambda: len(rows(faulty)) >= 2 and saving(faulty))
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  log.append(('kill during save', len(rows(faulty))))
  # 2-3. SIGKILL at seeded steps plus a seeded delay into the step.
  for _ in range(2):
    proc = start(faulty, cache)
    done = len(rows(faulty))
    target = min(done + rng.randint(1, 4), STEPS - 2)
    wait_for(proc, lambda t=target: len(rows(faulty)) >= t)
    time.sleep(rng.uniform(0.0, 0.05))
    was_saving = saving(faulty)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    log.append((f'kill after step {target}', was_saving))
  # 4. SIGTERM (preemption): a final checkpoint, exit 143.
  proc = start(faulty, cache)
  done = len(rows(faulty))
  wait_for(proc, lambda: len(rows(faulty)) >= done + 1)
  proc.send_signal(signal.SIGTERM)
  code, _, err = finish(proc)
  assert code == 143, err[-2000:]
  assert 'preempted: stopped by SIGTERM after step' in err, err[-2000:]
  stopped = int(err.split('after step ')[1].split(';')[0])
  # The final checkpoint, off-cadence.
  assert checkpointing.steps(os.path.join(faulty, 'checkpoints'))[-1] == stopped
  # 5. The same command finishes the run.
  code, out, err = finish(start(faulty, cache))
  assert code == 0, err[-2000:]
  assert f'resumed from step {stopped}' in out
  print('faults:', log)

  want, got = rows(straight), rows(faulty)
  assert [r['step'] for r in want] == [str(s) for s in range(1, STEPS + 1)]
  assert got == want  # losses, gradient norms, batch CRCs: exact strings
  (a, meta_a), (b, meta_b) = final(straight), final(faulty)
  assert meta_a['data'] == meta_b['data']
  same = jax.tree.map(np.array_equal, a, b)
  assert all(jax.tree.leaves(same)), 'the resumed run diverged'
  # No stray temporary directories, nothing moved aside as invalid.
  assert not saving(faulty)
  assert not os.path.exists(os.path.join(faulty, 'invalid_checkpoints'))
