"""What the entry points share: flags, distributed start-up, error reporting."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from absl import app
from absl import flags
from absl import logging

from experiments import configs
from experiments import faults
from experiments import runtime
from experiments import sharding

WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory: checkpoints, '
                              'TensorBoard events, vocabulary, results. '
                              'Default: runs/<experiment>_<preset>.')
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
  """Parses flags and runs; user errors end in one line and exit code 2.

  Exit codes: 2 a user error (bad flag, config, data, or a checkpoint of
  another run), 3 a non-finite step (faults.NonFiniteError), 143 stopped by
  SIGTERM after a final checkpoint (faults.Preempted). NORMJAX_TRACEBACK=1
  shows the traceback instead.
  """

  def main(argv):
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    runtime.tune_malloc()
    if len(argv) > 1:
      raise app.UsageError(f'unexpected arguments {argv[1:]}')
    config = config_flag.value
    workdir = WORKDIR.value or os.path.join(
        'runs', f'{experiment}_{config.preset.replace(",", "_")}')
    sharding.maybe_initialize_distributed()
    os.makedirs(workdir, exist_ok=True)
    try:
      if MODE.value == 'train':
        train(config, workdir)
      else:
        evaluate(config, workdir, CHECKPOINT.value or default_checkpoint,
                 SPLIT.value)
    except faults.Preempted as e:
      print(f'preempted: {e}', file=sys.stderr, flush=True)
      sys.exit(143)
    except (faults.NonFiniteError, ValueError, FileNotFoundError,
            KeyError) as e:
      if os.environ.get('NORMJAX_TRACEBACK'):
        raise
      message = e.args[0] if isinstance(e, KeyError) and e.args else e
      print(f'error: {message}  (set NORMJAX_TRACEBACK=1 for the traceback)',
            file=sys.stderr, flush=True)
      sys.exit(3 if isinstance(e, faults.NonFiniteError) else 2)

  app.run(main, flags_parser=lambda argv: configs.parse_flags(experiment,
                                                               argv))
