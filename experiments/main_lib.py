"""What the training entry points share: flags, distributed start-up, and
`cli.run`'s error reporting."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable

from absl import flags
import jax

from experiments import cli
from experiments import faults
from experiments import runtime
from experiments import sharding
from experiments.configs import validate

WORKDIR = cli.workdir_flag('Run directory: checkpoints, TensorBoard events, '
                           'vocabulary, results. Default: '
                           'runs/<experiment>_<preset>.')
MODE = flags.DEFINE_enum('mode', 'train', ['train', 'eval'],
                         'train (resumes from the newest checkpoint) or eval.')
CHECKPOINT = flags.DEFINE_string(
    'checkpoint', None, "--mode=eval: 'averaged' (translation's default), "
    "'latest' (the language model's default) or a step.")
SPLIT = flags.DEFINE_enum('split', 'test', ['valid', 'test'],
                          '--mode=eval: which split to score.')
PRINT_CONFIG = flags.DEFINE_bool(
    'print_config', False, 'Print the resolved config (preset, modifiers, '
    'overrides, checked) and exit.')


def write_config(config, workdir: str) -> None:
  """<workdir>/config.json: the resolved config (process 0)."""
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True) + '\n')


def has_checkpoint(workdir: str) -> bool:
  """Whether <workdir>/checkpoints holds a step directory."""
  directory = os.path.join(workdir, 'checkpoints')
  return os.path.isdir(directory) and any(
      name.isdigit() for name in os.listdir(directory))


def run(experiment: str, config_flag: flags.FlagHolder,
        train: Callable, evaluate: Callable,
        default_checkpoint: str = 'averaged') -> None:
  """Parses flags and runs `train(config, workdir)` (--mode=train) or
  `evaluate(config, workdir, checkpoint, split)` (--mode=eval).

  The config is checked first (`validate.checked`: every range, choice and
  divisibility, all problems in one line), before any data or compilation.
  User errors end in one line; the exit codes are `cli.run`'s: 2 a user
  error (bad flag, config, data, a checkpoint of another run, a workdir in
  use), 3 a non-finite or diverging step, 4 a failed checkpoint save, 143
  or 130 stopped by SIGTERM or SIGINT after a checkpoint. A training run
  holds the workdir (`faults.WorkdirLock`) from before its data is read,
  writes the resolved config to <workdir>/config.json, and, if it fails
  before its first checkpoint, removes the workdir it created (never one
  that existed). --print_config prints the config and exits.
  """

  def work():
    runtime.tune_malloc()
    config = validate.checked(config_flag.value)
    if PRINT_CONFIG.value:
      print(config, end='')
      return
    workdir = WORKDIR.value or os.path.join(
        'runs', f'{experiment}_{config.preset.replace(",", "_")}')
    sharding.maybe_initialize_distributed()
    if MODE.value != 'train':
      os.makedirs(workdir, exist_ok=True)
      evaluate(config, workdir, CHECKPOINT.value or default_checkpoint,
               SPLIT.value)
      return
    created = not os.path.exists(workdir)
    os.makedirs(workdir, exist_ok=True)
    try:
      with faults.WorkdirLock(workdir, take=jax.process_index() == 0):
        write_config(config, workdir)
        train(config, workdir)
    except BaseException:
      if created and jax.process_index() == 0 and not has_checkpoint(workdir):
        shutil.rmtree(workdir, ignore_errors=True)
      raise

  cli.run(work, experiment)
