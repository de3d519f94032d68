"""What the training entry points share: flags, distributed start-up, and
`cli.run`'s error reporting."""

from __future__ import annotations

import os
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
  holds the workdir (`faults.WorkdirLock`) from before its data is read.
  """

  def work():
    runtime.tune_malloc()
    config = validate.checked(config_flag.value)
    workdir = WORKDIR.value or os.path.join(
        'runs', f'{experiment}_{config.preset.replace(",", "_")}')
    sharding.maybe_initialize_distributed()
    os.makedirs(workdir, exist_ok=True)
    if MODE.value == 'train':
      with faults.WorkdirLock(workdir, take=jax.process_index() == 0):
        train(config, workdir)
    else:
      evaluate(config, workdir, CHECKPOINT.value or default_checkpoint,
               SPLIT.value)

  cli.run(work, experiment)
