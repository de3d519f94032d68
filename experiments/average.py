"""Averages the last K checkpoints of a run, as fairseq's average_checkpoints.py.

    python -m experiments.average --workdir=runs/iwslt_powernorm --last=5

Every entry is averaged, the norms' running statistics included (the official
averaged PowerNorm model's phi is the mean of the checkpoints' phi). The
result is written to <workdir>/averaged, which `--mode=eval` scores by
default. Training runs this itself at the end (config.decode.average_last).
"""

import os
import sys

import orbax.checkpoint as ocp
from absl import app
from absl import flags

from experiments import checkpointing
from experiments import translation

_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory.',
                               required=True)
_LAST = flags.DEFINE_integer('last', 5, 'How many of the newest checkpoints.')


def average_last(workdir: str, last: int) -> list[int]:
  directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'--workdir={workdir}: no checkpoints/ directory; '
                            'train the run first.')
  with ocp.CheckpointManager(directory) as mngr:
    steps = sorted(mngr.all_steps())[-last:]
    if not steps:
      raise FileNotFoundError(f'--workdir={workdir}: no complete checkpoint.')
    restored = [mngr.restore(s, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
                for s in steps]
  fingerprints = {r['meta'].get('vocab_fingerprint') for r in restored}
  if len(fingerprints) > 1:
    raise ValueError(f'checkpoints {steps} disagree on the vocabulary; they '
                     'are not from one run.')
  averaged = checkpointing.average([r['state'] for r in restored])
  translation.save_averaged(workdir, averaged, dict(
      restored[-1]['meta'], steps=steps))
  return steps


def main(argv):
  del argv
  try:
    steps = average_last(_WORKDIR.value, _LAST.value)
  except (FileNotFoundError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  print(f'averaged steps {steps} into '
        f'{os.path.join(_WORKDIR.value, translation.AVERAGED)}')


if __name__ == '__main__':
  app.run(main)
