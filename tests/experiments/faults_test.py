"""Reliability, in process and fast: the averaged checkpoint follows its
inputs, preemption checkpoints never enter the averaging set nor displace a
cadence one, one writer per workdir, checksums catch altered checkpoints, a
non-finite update is never committed, failed saves and divergence stop in
one line, empty splits and unreadable directories fail before compiling.

The same faults against the command line: fault_suite_test.py (slow).
"""

import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import average
from experiments import checkpointing
from experiments import faults
from experiments import train_lib
from experiments import translation
from experiments.data import sources


def toy_state(value: float):
  return {'params': {'w': jnp.full((3, 4), value, jnp.float32)},
          'step': jnp.asarray(int(value), jnp.int32)}


def save_steps(directory, kinds):
  """Saves toy_state(step) for each (step, kind); returns the manager."""
  mngr = checkpointing.manager(directory, async_save=False)
  for step, kind in kinds:
    checkpointing.prune(mngr, keep=2)
    checkpointing.save(mngr, step, toy_state(step),
                       {'vocab_fingerprint': 'v', 'step': step, 'kind': kind})
    mngr.wait_until_finished()
  checkpointing.prune(mngr, keep=2)
  return mngr


CADENCE, FINAL, PREEMPTED = (checkpointing.CADENCE, checkpointing.FINAL,
                             checkpointing.PREEMPTED)


def test_preemption_checkpoint_never_displaces_nor_enters_the_average(
    tmp_path):
  directory = str(tmp_path / 'checkpoints')
  # An uninterrupted run, and one preempted at step 5 then resumed.
  save_steps(directory + '_straight', [(2, CADENCE), (4, CADENCE),
                                       (6, CADENCE), (8, FINAL)]).close()
  mngr = save_steps(directory, [(2, CADENCE), (4, CADENCE), (5, PREEMPTED),
                                (6, CADENCE)])
  # The preemption checkpoint went once a newer one was committed.
  assert sorted(mngr.all_steps()) == [4, 6]
  mngr.close()
  # While it is the newest it is kept (the run resumes from it) but not
  # counted: the two newest cadence ones stay too.
  mngr = save_steps(directory, [(7, PREEMPTED)])
  assert sorted(mngr.all_steps()) == [4, 6, 7]
  assert checkpointing.averaging_steps(directory, 2) == [4, 6]
  mngr.close()
  save_steps(directory, [(8, FINAL)]).close()
  assert (checkpointing.steps(directory) ==
          checkpointing.steps(directory + '_straight') == [6, 8])


def test_averaged_checkpoint_is_replaced_when_its_steps_change(tmp_path):
  workdir = str(tmp_path)
  directory = os.path.join(workdir, 'checkpoints')
  save_steps(directory, [(2, CADENCE), (4, CADENCE)]).close()
  assert average.average_last(workdir, 2) == [2, 4]
  state, meta, _ = checkpointing.read(os.path.join(workdir, 'averaged'))
  assert meta['steps'] == [2, 4]
  np.testing.assert_array_equal(state['params']['w'], 3.0)
  # The run resumed and went on: the average follows (it was written once
  # and never replaced before).
  save_steps(directory, [(6, CADENCE), (7, PREEMPTED)]).close()
  assert average.average_last(workdir, 2) == [4, 6]
  state, meta, _ = checkpointing.read(os.path.join(workdir, 'averaged'))
  assert meta['steps'] == [4, 6]
  np.testing.assert_array_equal(state['params']['w'], 5.0)
  assert not [n for n in os.listdir(workdir) if n.startswith('averaged.')]


def test_checksum_catches_altered_data_and_the_run_moves_it_aside(tmp_path):
  directory = str(tmp_path / 'checkpoints')
  save_steps(directory, [(2, CADENCE), (4, CADENCE)]).close()
  other = str(tmp_path / 'other')
  save_steps(other, [(4, CADENCE)]).close()
  # Step 4's data replaced by a decodable state of the same structure.
  target = os.path.join(directory, '4', 'state')
  os.rename(target, target + '.orig')
  os.rename(os.path.join(other, '4', 'state'), target)
  # Same bits, same leaves: the checksum is container independent.
  assert (checkpointing.checksum(toy_state(4.0)) ==
          checkpointing.checksum({'a': toy_state(4.0)}))
  with open(os.path.join(directory, '4', 'meta', 'metadata')) as f:
    saved = f.read()
  # Altering one value changes the checksum (the saved one says 4.0s).
  assert checkpointing.checksum(toy_state(4.0)) in saved
  altered = toy_state(4.0)
  altered['params']['w'] = altered['params']['w'].at[1, 2].set(4.5)
  assert checkpointing.checksum(altered) not in saved
  swapped = toy_state(4.0)
  swapped['params']['w'] = jnp.arange(12.).reshape(3, 4)
  transposed = {'params': {'w': jnp.arange(12.).reshape(4, 3).T},
                'step': swapped['step']}
  assert (checkpointing.checksum(swapped) !=
          checkpointing.checksum(transposed))
  with open(os.path.join(directory, '4', 'meta', 'metadata'), 'w') as f:
    f.write(saved.replace(checkpointing.checksum(toy_state(4.0)),
                          checkpointing.checksum(toy_state(3.0))))
  with pytest.raises(checkpointing.CheckpointCorrupt, match='checksum'):
    checkpointing.read(directory, 4)
  mngr = checkpointing.manager(directory)
  state, meta = checkpointing.restore_newest(mngr, None, {})
  assert meta['step'] == 2 and int(state['step']) == 2
  assert sorted(mngr.all_steps()) == [2]
  mngr.close()
  assert os.listdir(tmp_path / 'invalid_checkpoints') == ['4']


def test_a_non_finite_update_is_never_committed():
  """Finite loss and gradients, but the optimizer's update is NaN: the
  state stays as it was and the step is flagged."""
  def logits_fn(variables, batch, rngs, mutable):
    del rngs, mutable
    return batch['inputs'] @ variables['params']['w'], {}

  params = {'w': jnp.ones((4, 5))}
  tx = optax.scale(jnp.nan)
  state = train_lib.TrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
      batch_stats={}, grad_stats={}, rng=jax.random.PRNGKey(0))
  batch = {'inputs': jnp.ones((2, 3, 4)), 'targets': jnp.ones((2, 3), int),
           'weights': jnp.ones((2, 3))}
  step = train_lib.make_train_step(logits_fn, tx, lambda s: 1.0, 0.0)
  new, metrics = jax.jit(step)(state, batch)
  assert np.isfinite(metrics['loss']) and np.isfinite(metrics['grad_norm'])
  assert not bool(metrics['finite'])
  np.testing.assert_array_equal(new.params['w'], params['w'])
  assert int(new.step) == 1


def test_divergence_watch():
  watch = faults.DivergenceWatch(10.0, ceiling=9.0, window=20)
  for loss in [5.0, 4.0, 60.0]:  # too few steps to judge yet
    assert watch.check(loss) is None
  for loss in np.linspace(4.0, 3.0, 20):
    assert watch.check(float(loss)) is None
  assert watch.check(35.0) is None        # 10.0x limit: 3.5 * 10
  problem = watch.check(50.0)             # below 10x log V, above 10x median
  assert problem and 'times the median' in problem
  assert faults.DivergenceWatch(0.0, ceiling=9.0).check(1e30) is None
  problem = faults.DivergenceWatch(10.0, ceiling=9.0).check(91.0)
  assert problem and 'uniform prediction' in problem


class FailedSave:
  """A checkpoint manager whose save of step 6 failed (4 is complete)."""
  directory = '/runs/x/checkpoints'

  def check_for_errors(self):
    raise OSError(28, 'No space left on device')

  def wait_until_finished(self):
    self.check_for_errors()

  def all_steps(self):
    return [4]


def test_a_failed_save_stops_in_one_line_naming_the_last_good_one():
  loop = train_lib._Loop.__new__(train_lib._Loop)  # pylint: disable=protected-access
  loop.mngr, loop.good = FailedSave(), [4, 6]
  with pytest.raises(faults.SaveError) as info:
    loop.check_saves()
  message = str(info.value)
  assert '\n' not in message
  assert 'No space left on device' in message
  assert '/runs/x/checkpoints/4' in message


def _wait_for(condition, timeout_s=5.0):
  """Sleeps until condition() (a signal handler runs on the main thread
  between bytecodes, later under load); returns condition()."""
  deadline = time.monotonic() + timeout_s
  while not condition() and time.monotonic() < deadline:
    time.sleep(0.001)
  return condition()


def test_preemption_flags_sigterm_and_sigint_and_a_second_sigint_stops():
  # Python's own SIGINT handler before, whatever the test runner installed.
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    for signum in (signal.SIGTERM, signal.SIGINT):
      with faults.Preemption() as preemption:
        os.kill(os.getpid(), signum)
        assert _wait_for(lambda: preemption.requested == signum)  # noqa: B023
        if signum == signal.SIGINT:
          with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            _wait_for(lambda: False)
      error = faults.Preempted(7, '/w/checkpoints', signum)
      assert error.exit_code == 128 + signum
      assert f'stopped by {signal.Signals(signum).name} after step 7' in str(
          error)
  finally:
    signal.signal(signal.SIGINT, previous)


HOLD = """
import sys, time
sys.path.insert(0, {root!r})
from experiments import faults
with faults.WorkdirLock({workdir!r}):
  print('held', flush=True)
  time.sleep(60)
"""


def test_one_writer_per_workdir_and_stale_locks_taken_over(tmp_path):
  workdir = str(tmp_path)
  root = os.path.dirname(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))))
  holder = subprocess.Popen(
      [sys.executable, '-c', HOLD.format(root=root, workdir=workdir)],
      stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'held'
    with pytest.raises(ValueError, match=rf'in use by pid {holder.pid} on '):
      with faults.WorkdirLock(workdir):
        pass
  finally:
    holder.kill()
    holder.wait()
    holder.stdout.close()
  # The holder died holding it: its lock file stays, the lock is free.
  assert f'pid {holder.pid}' in (tmp_path / '.lock').read_text()
  with faults.WorkdirLock(workdir):
    assert f'pid {os.getpid()}' in (tmp_path / '.lock').read_text()
    with faults.WorkdirLock(workdir):  # re-entrant (main_lib, then train)
      pass
  with faults.WorkdirLock(workdir):  # released
    pass
  with faults.WorkdirLock(workdir, take=False):  # processes other than 0
    pass


def test_unreadable_data_directory_says_permission(tmp_path, monkeypatch):
  real = os.listdir

  def listdir(path):
    if str(path) == str(tmp_path):
      raise PermissionError(13, 'Permission denied', str(path))
    return real(path)
  monkeypatch.setattr(os, 'listdir', listdir)
  with pytest.raises(PermissionError, match='cfg.path: permission denied'):
    sources.readable_directory(str(tmp_path), 'cfg.path', '')
  with pytest.raises(FileNotFoundError, match='does not exist'):
    sources.readable_directory(str(tmp_path / 'nope'), 'cfg.path', '')


def test_save_averaged_leaves_the_old_one_if_writing_fails(tmp_path,
                                                           monkeypatch):
  workdir = str(tmp_path)
  translation.save_averaged(workdir, toy_state(1.0), {'steps': [1]})

  def fail(*args, **kwargs):
    raise OSError(28, 'No space left on device')
  monkeypatch.setattr(checkpointing, 'save', fail)
  with pytest.raises(OSError):
    translation.save_averaged(workdir, toy_state(2.0), {'steps': [2]})
  _, meta, _ = checkpointing.read(os.path.join(workdir, 'averaged'))
  assert meta['steps'] == [1]
