"""A sweep's report: per cell the mean +- 95% t interval of its final
metrics over seeds, the paired difference against a baseline cell, wall
time and throughput; as markdown, CSV and a figure of validation curves.

    results = report.collect(runs)               # reads the run workdirs
    rows = report.summarize(results, 'test.ppl', baseline='ptb_layernorm_short')
    report.write(root, rows, results, 'test.ppl')  # report.{md,csv,png}

A run's metrics are the numbers of its results.json, flattened to dotted
keys ('test.ppl' of the language model, 'bleu' of translation); its curve
is <run>/valid.csv (`experiments.curves`); its wall time the sum of the
sweep's recorded attempts (<run>/sweep.json; an attempt cut short by a
SIGKILL of the sweep has none); its tokens the sum of losses.csv's
`ntokens`, so tokens/s counts evaluations and compilation as time.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from collections.abc import Mapping

from experiments import curves
from experiments import faults
from experiments.sweeps import grid
from experiments.sweeps import runner
from experiments.sweeps import stats

LOWER_IS_BETTER = ('ppl', 'loss', 'nll')


@dataclasses.dataclass
class RunResult:
  """What one finished (or unfinished) run left in its workdir."""
  run: grid.Run
  status: str
  metrics: dict[str, float]
  wall_s: float | None
  tokens: float | None
  curve: dict[str, list]


def flatten(tree: Mapping, prefix: str = '') -> dict[str, float]:
  """{'test': {'ppl': 1.0}} -> {'test.ppl': 1.0} (numbers only)."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(flatten(value, f'{prefix}{key}.'))
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
      out[f'{prefix}{key}'] = float(value)
  return out


def collect_run(run: grid.Run) -> RunResult:
  """The run's status, metrics, wall time, tokens and validation curve."""
  state = runner.status(run)
  metrics, tokens, curve = {}, None, {}
  if state == 'done':
    with open(os.path.join(run.workdir, runner.RESULTS)) as f:
      metrics = flatten(json.load(f))
  losses = os.path.join(run.workdir, 'losses.csv')
  if os.path.exists(losses):
    tokens = math.fsum(float(r['ntokens'])
                       for r in faults.read_losses(losses))
  if os.path.exists(os.path.join(run.workdir, curves.FILE)):
    curve = curves.read(run.workdir)
  attempts = runner.record(run)['attempts']
  walls = [a['wall_s'] for a in attempts if a['wall_s'] is not None]
  wall = math.fsum(walls) if walls else None
  return RunResult(run, state, metrics, wall, tokens, curve)


def collect(runs: list[grid.Run]) -> list[RunResult]:
  return [collect_run(r) for r in runs]


def lower_is_better(metric: str) -> bool:
  return metric.rsplit('.', 1)[-1] in LOWER_IS_BETTER


def _by_cell(results: list[RunResult]) -> dict[str, list[RunResult]]:
  cells: dict[str, list[RunResult]] = {}
  for r in results:
    cells.setdefault(r.run.cell.name, []).append(r)
  return cells


def summarize(results: list[RunResult], metric: str,
              baseline: str | None = None, also: tuple[str, ...] = (),
              confidence: float = 0.95) -> list[dict]:
  """One row per cell: `metric` and `also` as Intervals over the finished
  seeds, the paired difference (cell - baseline) of `metric`, the unfinished
  seeds by status, the mean wall time and tokens/s. `baseline` defaults to
  the first cell."""
  cells = _by_cell(results)
  baseline = baseline or next(iter(cells))
  if baseline not in cells:
    raise ValueError(f'--baseline={baseline!r}: not a cell of this sweep; '
                     f'the cells are {", ".join(cells)}.')

  def values(rows, key):
    return {r.run.seed: r.metrics[key] for r in rows
            if r.status == 'done' and key in r.metrics}

  base = values(cells[baseline], metric)
  table = []
  for name, rows in cells.items():
    done = [r for r in rows if r.status == 'done']
    if done and metric not in done[0].metrics:
      raise ValueError(f'--metric={metric!r}: not in {done[0].run.workdir}/'
                       f'results.json; it has {", ".join(done[0].metrics)}.')
    mine = values(rows, metric)
    walls = [r.wall_s for r in done if r.wall_s]
    rates = [r.tokens / r.wall_s for r in done if r.wall_s and r.tokens]
    table.append(dict(
        cell=name, seeds=sorted(mine), of=len(rows),
        missing={r.run.seed: r.status for r in rows if r.status != 'done'},
        metric=stats.t_interval(list(mine.values()), confidence),
        also={k: stats.t_interval(list(values(rows, k).values()), confidence)
              for k in also},
        diff=(None if name == baseline else
              stats.paired(mine, base, confidence)),
        wall_s=sum(walls) / len(walls) if walls else None,
        tokens_per_s=sum(rates) / len(rates) if rates else None))
  return table


def _verdict(row: dict, metric: str) -> str:
  diff = row['diff']
  if diff is None:
    return 'baseline'
  if diff.n < 2:
    return 'too few seeds'
  if not diff.resolved:
    return 'not resolved'
  better = (diff.mean < 0) == lower_is_better(metric)
  return 'better' if better else 'worse'


def markdown(rows: list[dict], metric: str, confidence: float = 0.95
             ) -> str:
  """The table: cell, seeds, metric, also-metrics, paired difference and
  verdict, wall time, tokens/s; unfinished seeds under it."""
  also = list(rows[0]['also']) if rows else []
  pct = f'{100 * confidence:g}%'
  head = (['cell', 'seeds', f'**{metric}** (mean ± {pct} CI)'] + also
          + [f'{metric} − baseline (paired, {pct} CI)', 'reading',
             'wall time / run', 'tokens/s'])
  lines = ['| ' + ' | '.join(head) + ' |', '|' + ' --- |' * len(head)]
  for row in rows:
    diff = row['diff']
    lines.append('| ' + ' | '.join(
        [row['cell'], f"{len(row['seeds'])}/{row['of']}",
         f"**{row['metric'].format()}**"]
        + [row['also'][k].format() for k in also]
        + ['—' if diff is None else
           ('-' if diff.n == 0 else
            f"{diff.mean:+.1f}" + (f" ± {diff.half:.1f}" if diff.n > 1
                                   else ' (n=1)')),
           _verdict(row, metric),
           '-' if row['wall_s'] is None else f"{row['wall_s'] / 60:.1f} min",
           '-' if row['tokens_per_s'] is None else
           f"{row['tokens_per_s']:,.0f}"]) + ' |')
  notes = [f"{row['cell']} seed {seed}: {state}"
           for row in rows for seed, state in row['missing'].items()]
  if notes:
    lines += ['', 'Not finished: ' + '; '.join(notes) + '.']
  return '\n'.join(lines) + '\n'


CSV_COLUMNS = ('cell', 'n', 'of', 'seeds', 'mean', 'ci_low', 'ci_high',
               'diff_mean', 'diff_low', 'diff_high', 'diff_n', 'reading',
               'wall_s', 'tokens_per_s')


def write_csv(path: str, rows: list[dict], metric: str) -> None:
  """One line per cell with the interval ends as numbers."""
  also = list(rows[0]['also']) if rows else []
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(CSV_COLUMNS + tuple(f'{k}_{part}' for k in also
                                        for part in ('mean', 'low', 'high')))
    for row in rows:
      m, d = row['metric'], row['diff']
      writer.writerow(
          [row['cell'], m.n, row['of'], ' '.join(map(str, row['seeds'])),
           m.mean, m.low, m.high]
          + ([None] * 4 if d is None else [d.mean, d.low, d.high, d.n])
          + [_verdict(row, metric), row['wall_s'], row['tokens_per_s']]
          + [v for k in also for v in (row['also'][k].mean,
                                       row['also'][k].low,
                                       row['also'][k].high)])


def curve_bands(results: list[RunResult], key: str,
                confidence: float = 0.95) -> dict[str, tuple]:
  """Per cell: (steps, means, half-widths) of curve `key` over the seeds
  whose curves have that step (every seed that got there)."""
  bands = {}
  for name, rows in _by_cell(results).items():
    by_step: dict[int, list[float]] = {}
    for r in rows:
      for step, value in zip(r.curve.get('step', []), r.curve.get(key, [])):
        by_step.setdefault(step, []).append(value)
    steps = sorted(by_step)
    intervals = [stats.t_interval(by_step[s], confidence) for s in steps]
    bands[name] = (steps, [i.mean for i in intervals],
                   [0.0 if i.n < 2 else i.half for i in intervals])
  return bands


def figure(path: str, results: list[RunResult], key: str, title: str,
           confidence: float = 0.95) -> bool:
  """Validation `key` against the step per cell, mean with its t band;
  False (nothing written) when no run has a curve."""
  bands = curve_bands(results, key, confidence)
  if not any(steps for steps, _, _ in bands.values()):
    return False
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for name, (steps, means, halves) in bands.items():
    if not steps:
      continue
    line, = ax.plot(steps, means, marker='o', ms=3, label=name)
    ax.fill_between(steps, [m - h for m, h in zip(means, halves)],
                    [m + h for m, h in zip(means, halves)],
                    color=line.get_color(), alpha=0.2)
  if lower_is_better(key) and key.endswith('ppl'):
    ax.set_yscale('log')
  ax.set_xlabel('step')
  ax.set_ylabel(f'validation {key}')
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def write(root: str, rows: list[dict], results: list[RunResult],
          metric: str, curve_key: str, confidence: float = 0.95
          ) -> list[str]:
  """<root>/report.md, report.csv and (if any run has a curve) report.png;
  returns the paths written."""
  paths = [os.path.join(root, 'report.md'), os.path.join(root, 'report.csv')]
  with open(paths[0], 'w') as f:
    f.write(markdown(rows, metric, confidence))
  write_csv(paths[1], rows, metric)
  png = os.path.join(root, 'report.png')
  title = (f'validation {curve_key}: mean over seeds, '
           f'{100 * confidence:g}% t band')
  if figure(png, results, curve_key, title, confidence):
    paths.append(png)
  return paths
