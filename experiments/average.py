"""Averages the last K checkpoints of a run, as fairseq's average_checkpoints.py.

    python -m experiments.average --workdir=runs/iwslt_powernorm --last=5

Every entry is averaged, the norms' running statistics included (the official
averaged PowerNorm model's phi is the mean of the checkpoints' phi). The
result is written to <workdir>/averaged, which `--mode=eval` scores by
default. Training runs this itself at the end (config.decode.average_last).
"""

import os

from absl import flags

from experiments import checkpointing
from experiments import cli
from experiments import translation

_WORKDIR = cli.workdir_flag('Run directory.')
_LAST = flags.DEFINE_integer('last', 5, 'How many of the newest checkpoints.')


def average_last(workdir: str, last: int) -> list[int]:
  """Averages the newest `last` cadence checkpoints of <workdir>/checkpoints
  (`checkpointing.averaging_steps`: never a preemption checkpoint) into
  <workdir>/averaged, replacing it; returns their steps."""
  if last < 1:
    raise ValueError(f'--last={last}: average 1 or more checkpoints.')
  directory = os.path.join(workdir, 'checkpoints')
  steps = checkpointing.averaging_steps(directory, last)
  restored = [checkpointing.read(directory, s)[:2] for s in steps]
  fingerprints = {meta.get('vocab_fingerprint') for _, meta in restored}
  if len(fingerprints) > 1:
    raise ValueError(f'checkpoints {steps} disagree on the vocabulary; they '
                     'are not from one run.')
  averaged = checkpointing.average([state for state, _ in restored])
  translation.save_averaged(workdir, averaged, dict(restored[-1][1],
                                                    steps=steps))
  return steps


def main() -> None:
  if not _WORKDIR.value:
    raise ValueError('--workdir is required: the run directory to average.')
  steps = average_last(_WORKDIR.value, _LAST.value)
  print(f'averaged steps {steps} into '
        f'{os.path.join(_WORKDIR.value, translation.AVERAGED)}')


if __name__ == '__main__':
  cli.run(main)
