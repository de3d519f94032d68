"""Faults a long run must survive, in process (the LM smoke run, 2 layers):

* a corrupted newest checkpoint (truncated files, missing commit marker) is
  moved aside and the run resumes from the older one, ending bit for bit
  where an uninterrupted run ends; every checkpoint invalid: a clear error;
* a checkpoint of another config stops the run naming the setting;
* a NaN step stops the run naming the step and the layer, the last good
  checkpoint intact; with train.nonfinite='skip' the run goes on.

Real SIGKILL/SIGTERM: kill_resume_test.py (slow).
"""

import glob
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import checkpointing
from experiments import faults
from experiments import language_model
from experiments import train_lib
from experiments.configs import lm as lm_configs


# Three smoke runs: over the default suite's budget, so CI's slow step runs it.
# orbax's failed reads of the corrupted checkpoints leave asyncio callbacks
# that raise 'Event loop is closed' at garbage collection: benign.
pytestmark = [
    pytest.mark.slow, pytest.mark.usefixtures('compilation_cache'),
    pytest.mark.filterwarnings(
        'ignore::pytest.PytestUnraisableExceptionWarning')]


def config(**train):
  c = lm_configs.get_config('ptb_powernorm,smoke')
  c.unlock()
  c.model.num_decoder_layers = 2
  c.train.update(dict(num_steps=4, checkpoint_every=2, keep_checkpoints=3,
                      eval_every=1000, log_every=1000), **train)
  c.lock()
  return c


def run(workdir, c=None, poison=None):
  """Trains (no final evaluation); `poison(step, state, batch)` may alter
  what the train step gets."""
  exp = language_model.Experiment(c or config(), workdir)
  if poison is not None:
    step_fn = exp.train_step

    def poisoned(state, batch):
      state, batch = poison(int(state.step) + 1, state, batch)
      return step_fn(state, batch)
    exp.train_step = poisoned
  state, mngr, _, _ = train_lib.train(exp, c or config(), workdir)
  train_lib.close_run(mngr)
  return state


def checkpoint(workdir, step):
  """(state, meta) of checkpoint `step` of the run, as saved."""
  return checkpointing.read(os.path.join(workdir, 'checkpoints'), step)[:2]


def assert_same_state(a, b):
  (state_a, meta_a), (state_b, meta_b) = a, b
  same = jax.tree.map(np.array_equal, state_a, state_b)
  assert all(jax.tree.leaves(same))
  assert meta_a['data'] == meta_b['data']


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('straight'))
  run(workdir)
  return workdir


def copy_run(straight, tmp_path, name):
  workdir = str(tmp_path / name)
  shutil.copytree(straight, workdir)
  return workdir


def truncate(workdir, step):
  for path in glob.glob(os.path.join(workdir, 'checkpoints', str(step),
                                     'state', '**', 'd', '*'), recursive=True):
    with open(path, 'r+b') as f:
      f.truncate(os.path.getsize(path) // 2)


def drop_marker(workdir, step):
  os.remove(os.path.join(workdir, 'checkpoints', str(step),
                         'commit_success.txt'))


def test_truncated_newest_checkpoint_falls_back_and_resumes_exactly(
    straight, tmp_path, capsys):
  workdir = copy_run(straight, tmp_path, 'damaged')
  truncate(workdir, 4)
  run(workdir)
  err = capsys.readouterr().err
  assert f'checkpoint {workdir}/checkpoints/4 is invalid' in err, err
  assert 'resuming from an older one' in err
  # Moved aside, not deleted; the run redid steps 3-4 exactly.
  assert os.path.isdir(os.path.join(workdir, 'invalid_checkpoints', '4'))
  assert_same_state(checkpoint(straight, 4), checkpoint(workdir, 4))
  assert faults.read_losses(workdir) == faults.read_losses(straight)


def test_every_checkpoint_invalid_stops_and_keeps_them(straight, tmp_path):
  """Truncated files and a missing commit marker (a save cut short)."""
  workdir = copy_run(straight, tmp_path, 'all_bad')
  truncate(workdir, 4)
  drop_marker(workdir, 2)
  with pytest.raises(checkpointing.CheckpointCorrupt,
                     match=r'step 4: .*; step 2: commit_success.txt is '
                           'missing.*move the directory away'):
    run(workdir)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '4']


def test_checkpoint_of_another_config_is_refused(straight, tmp_path):
  workdir = copy_run(straight, tmp_path, 'other_config')
  c = config(num_steps=6)  # longer training is allowed ...
  c.unlock()
  c.model.dropout = 0.25   # ... another model is not
  c.lock()
  with pytest.raises(checkpointing.CheckpointMismatch,
                     match=r'written by another config: model.dropout=0.1 '
                           'there, 0.25 here; use a new --workdir'):
    run(workdir, c)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '4']


def _nan_layer(step, state, batch):
  if step != 3:
    return state, batch
  params = jax.tree.map(lambda x: x, state.params)
  fc1 = params['decoder']['layer_1']['fc1']
  fc1['kernel'] = fc1['kernel'].at[0, 0].set(jnp.nan)
  return state.replace(params=params), batch


def test_nan_stops_naming_step_and_layer_checkpoint_intact(straight, tmp_path):
  workdir = str(tmp_path / 'nan')
  with pytest.raises(faults.NonFiniteError) as error:
    run(workdir, poison=_nan_layer)
  message = str(error.value)
  assert message.startswith('step 3: loss nan'), message
  assert 'non-finite parameters in decoder/layer_1' in message
  assert ('first norm with a non-finite input: decoder/layer_1/ffn_norm'
          in message)  # post-norm: the FFN's output feeds ffn_norm
  assert f'last good checkpoint is {workdir}/checkpoints/2' in message
  assert 'nonfinite=skip' in message
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2']
  assert_same_state(checkpoint(straight, 2), checkpoint(workdir, 2))


def test_nan_batch_is_skipped_with_nonfinite_skip(straight, tmp_path):
  def nan_weights(step, state, batch):
    if step == 3:
      batch = dict(batch, weights=batch['weights'] * jnp.nan)
    return state, batch
  workdir = str(tmp_path / 'skip')
  state = run(workdir, config(nonfinite='skip'), poison=nan_weights)
  assert int(state.step) == 4
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))
  losses = faults.read_losses(workdir)
  assert [r['loss'] for r in losses][2] == 'nan'
  want = faults.read_losses(straight)
  assert losses[:2] == want[:2]
  # Step 3 changed nothing: step 4 starts from step 2's state and data.
  assert [r['batch_crc'] for r in losses] == [r['batch_crc'] for r in want]
