"""What every command-line tool of the experiments shares: absl start-up,
flag errors and user errors in one line, and the exit codes.

    from experiments import cli

    _OUT = flags.DEFINE_string('out', None, 'Output directory.', required=True)

    def main():
      ...  # raise ValueError / FileNotFoundError for what the user got wrong

    if __name__ == '__main__':
      cli.run(main)
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from absl import app
from absl import flags
from absl import logging

from experiments import configs
from experiments import faults

# What a user can fix: a flag, config, data (missing or unreadable), a
# checkpoint of another run, a full disk.
USER_ERRORS = (faults.NonFiniteError, faults.SaveError, ValueError,
               FileNotFoundError, PermissionError, KeyError)
# Exit codes beyond 2 (a user error): the run stopped for these.
EXIT_CODES = {faults.NonFiniteError: 3, faults.SaveError: 4}


def workdir_flag(help_text: str) -> flags.FlagHolder:
  """The --workdir flag, defined once per process whichever tool asks."""
  if 'workdir' not in flags.FLAGS:
    return flags.DEFINE_string('workdir', None, help_text)
  return flags.FlagHolder(flags.FLAGS, flags.FLAGS['workdir'])


def run(work: Callable[[], object], experiment: str | None = None,
        argv: list[str] | None = None) -> None:
  """Parses the flags and calls `work()`; a user error ends in one line.

  `experiment` names experiments/configs/<experiment>.py, whose presets
  `--config=<preset>` stands for (None: no such flag). A flag error, or a
  ValueError, FileNotFoundError, PermissionError or KeyError from `work`,
  prints one `error: ...` line and exits with code 2; a non-finite or
  diverging step (faults.NonFiniteError) exits with 3, a failed checkpoint
  save (faults.SaveError) with 4, a SIGTERM or SIGINT stop after its
  checkpoint (faults.Preempted) with 143 or 130, a SIGINT before training
  started with 130. NORMJAX_TRACEBACK=1 shows the traceback instead.
  """

  def main(argv):
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    if len(argv) > 1:
      raise app.UsageError(f'unexpected arguments {argv[1:]}')
    try:
      work()
    except faults.Preempted as e:
      print(f'preempted: {e}', file=sys.stderr, flush=True)
      sys.exit(e.exit_code)
    except KeyboardInterrupt:
      if os.environ.get('NORMJAX_TRACEBACK'):
        raise
      print('interrupted (SIGINT) before a checkpoint was due: nothing new '
            'was saved; rerun the same command to start or resume.',
            file=sys.stderr, flush=True)
      sys.exit(130)
    except USER_ERRORS as e:
      if os.environ.get('NORMJAX_TRACEBACK'):
        raise
      message = e.args[0] if isinstance(e, KeyError) and e.args else e
      print(f'error: {message}  (set NORMJAX_TRACEBACK=1 for the traceback)',
            file=sys.stderr, flush=True)
      sys.exit(next((code for kind, code in EXIT_CODES.items()
                     if isinstance(e, kind)), 2))

  app.run(main, argv=argv,
          flags_parser=lambda args: configs.parse_flags(experiment, args))
