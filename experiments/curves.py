"""A run's validation curve: <workdir>/valid.csv, one row per evaluation.

    log = curves.ValidLog(workdir, resume_step=1000)  # process 0 only
    log.write(1200, {'loss': 5.1, 'ppl': 164.0})
    curves.read(workdir)  # {'step': [..], 'loss': [..], 'ppl': [..]}

The columns are `step` and the metrics of the first row written. A resumed
run drops the rows after the checkpoint it resumed from (written by a run
killed after its last checkpoint), so the file of an interrupted and
resumed run equals that of an uninterrupted one. `experiments.sweep` draws
these curves with bands over seeds.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping

FILE = 'valid.csv'


class ValidLog:
  """Appends evaluation rows to <workdir>/valid.csv, flushed at once."""

  def __init__(self, workdir: str, resume_step: int = 0):
    self.path = os.path.join(workdir, FILE)
    self._rows = []
    if os.path.exists(self.path):
      kept = read(self.path)
      self._rows = [dict(zip(kept, values)) for values in zip(*kept.values())
                    if values[0] <= resume_step]
    self._columns = list(self._rows[0]) if self._rows else None
    self._rewrite()

  def _rewrite(self) -> None:
    tmp = self.path + '.tmp'
    with open(tmp, 'w', newline='') as f:
      if self._columns:
        writer = csv.DictWriter(f, self._columns)
        writer.writeheader()
        writer.writerows(self._rows)
    os.replace(tmp, self.path)  # a kill here leaves the old or the new file

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    row = {'step': step, **{k: float(v) for k, v in metrics.items()
                            if isinstance(v, (int, float))}}
    if self._columns is None:
      self._columns = list(row)
    elif list(row) != self._columns:
      raise ValueError(f'{self.path}: metrics {list(row)} differ from the '
                       f'columns {self._columns} of the earlier rows.')
    self._rows.append(row)
    self._rewrite()


def read(path: str) -> dict[str, list[float]]:
  """The columns of valid.csv (or of <path>/valid.csv); {} when it has no
  rows. `step` holds ints."""
  if os.path.isdir(path):
    path = os.path.join(path, FILE)
  with open(path, newline='') as f:
    rows = list(csv.DictReader(f))
  if not rows:
    return {}
  columns = {k: [float(r[k]) for r in rows] for k in rows[0]}
  columns['step'] = [int(s) for s in columns['step']]
  return columns
