"""The experiments' own dependencies (setup.cfg's `experiments` extra),
checked when the package is imported: a missing one ends in one line with
the `pip install` that fixes it, instead of a ModuleNotFoundError from deep
inside a run. `importlib.util.find_spec` only looks; nothing is imported.
"""

from __future__ import annotations

import importlib.util
import sys

# import name -> distribution name (setup.cfg [options.extras_require]).
REQUIRED = {
    'absl': 'absl-py', 'ml_collections': 'ml-collections', 'optax': 'optax',
    'orbax.checkpoint': 'orbax-checkpoint',
    'tensorflow_datasets': 'tensorflow-datasets',
    'array_record': 'array-record', 'sentencepiece': 'sentencepiece',
    'sacrebleu': 'sacrebleu', 'tensorboardX': 'tensorboardX', 'tqdm': 'tqdm',
    'matplotlib': 'matplotlib',
}
FIX = ("pip install -e '.[experiments]' from the checkout (or pip install "
       '-r requirements.txt for the pinned versions)')


def _found(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except ModuleNotFoundError:  # the parent package of a dotted name
    return False


def missing(required: dict[str, str] | None = None) -> list[str]:
  """The distributions of `required` (default REQUIRED) not installed."""
  return [dist for module, dist in (required or REQUIRED).items()
          if not _found(module)]


def check(required: dict[str, str] | None = None) -> None:
  """Exits with code 2 and one line on stderr if something is missing."""
  absent = missing(required)
  if absent:
    print(f'error: the experiments need {", ".join(absent)}, which '
          f'{"is" if len(absent) == 1 else "are"} not installed: {FIX}.',
          file=sys.stderr)
    raise SystemExit(2)
