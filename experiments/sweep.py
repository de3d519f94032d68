"""A grid of ordinary runs (presets x overrides x seeds), resumable, then a
report with 95% confidence intervals over seeds.

    python -m experiments.sweep --grid='lm:ptb_{layernorm,powernorm},short' \
        --seeds=1,2,3 --set=data.path=../shared/data/ptb --workdir=runs/ptb
    python -m experiments.sweep ... --parallel=2       # two runs at a time
    python -m experiments.sweep ... --print-commands   # for a scheduler
    python -m experiments.sweep ... --estimate         # FLOPs, device-hours
    python -m experiments.sweep --workdir=runs/ptb --report-only

Each run is `python -m experiments.<task> --config=<preset> --config.seed=S
--config.<key>=<value>... --workdir=<workdir>/<cell>/seed<S>`. Re-running
the same command skips finished runs and resumes interrupted ones
(`sweeps.runner`). The report (`sweeps.report`: <workdir>/report.md,
report.csv, report.png) is written after the runs, and by --report-only
from whatever runs have finished, however they were launched.
"""

from __future__ import annotations

import json
import os

from absl import flags

from experiments import cli
from experiments import configs
from experiments.sweeps import cost
from experiments.sweeps import grid
from experiments.sweeps import report
from experiments.sweeps import runner

_GRID = flags.DEFINE_multi_string(
    'grid', [], "TASK:PRESETS with bash braces, e.g. "
    "'lm:ptb_{layernorm,powernorm},short' (TASK: lm, wmt or iwslt); repeat "
    'for more.')
_SET = flags.DEFINE_multi_string(
    'set', [], 'KEY=VALUE config override for every cell, e.g. '
    'data.path=../shared/data/ptb; braces make it a grid dimension '
    "('optim.peak_lr={1e-3,2e-3}').")
_SEEDS = flags.DEFINE_string('seeds', '1', "Seeds: '1,2,3' or '1-5'.")
_WORKDIR = cli.workdir_flag('Root of the sweep: one <cell>/seed<S> run '
                            'directory per run, grid.json and the report.')
_PARALLEL = flags.DEFINE_integer(
    'parallel', 1, 'Runs at a time (on a CPU they share its cores).')
_PRINT = flags.DEFINE_bool('print_commands', False,
                           'Print one command per run and exit.')
_REPORT_ONLY = flags.DEFINE_bool(
    'report_only', False, 'Write the report from the finished runs; with no '
    '--grid, of the grid last run in --workdir.')
_BASELINE = flags.DEFINE_string(
    'baseline', None, 'The cell the paired differences are against '
    '(default: the first).')
_METRIC = flags.DEFINE_string(
    'metric', None, "results.json key to compare (dotted): default 'test.ppl' "
    "for lm, 'bleu' for translation.")
_RETRY = flags.DEFINE_bool('retry_diverged', False,
                           'Run diverged runs again (they resume).')
_ESTIMATE = flags.DEFINE_bool(
    'estimate', False, 'Print the training FLOPs and device-hours of the '
    'grid (sweeps.cost) and exit.')
_PEAK = flags.DEFINE_float('peak_tflops', 989.0, '--estimate: the device\'s '
                           'peak TFLOP/s (default: an H100 SXM, bf16 dense).')
_MFU = flags.DEFINE_float('mfu', 0.4, '--estimate: the model FLOP '
                          'utilisation to assume.')
_STEP_SECONDS = flags.DEFINE_float(
    'step_seconds', 0.0, '--estimate: a measured seconds per step (then '
    'device-hours = steps x this; --peak_tflops and --mfu are unused).')
flags.DEFINE_alias('print-commands', 'print_commands')
flags.DEFINE_alias('report-only', 'report_only')

GRID_FILE = 'grid.json'
# Per task: the report's metric, its companions, and the curve's key.
DEFAULTS = {'lm': ('test.ppl', ('valid.ppl',), 'ppl'),
            'wmt': ('bleu', ('ppl',), 'bleu'),
            'iwslt': ('bleu', ('ppl',), 'bleu')}


def _grid_spec(root: str) -> dict:
  """This invocation's grid, or (--report-only without --grid) the last."""
  if _GRID.value:
    return dict(grid=_GRID.value, set=_SET.value, seeds=_SEEDS.value)
  path = os.path.join(root, GRID_FILE)
  if not os.path.exists(path):
    raise ValueError(f'--grid is required ({path} records no earlier grid).')
  with open(path) as f:
    return json.load(f)


def _configs(cells: list[grid.Cell]) -> list:
  """Every cell's config, built as its run will build it: typos fail here,
  before anything runs."""
  out = []
  for cell in cells:
    args = cell.command(seed=0, workdir='')[3:-1]
    try:
      out.append(configs.from_args(cell.task, args))
    except (flags.Error, ValueError, KeyError, AttributeError,
            TypeError) as e:
      raise ValueError(f'cell {cell.name}: '
                       f'{configs.one_line(str(e), args)}') from None
  return out


def _estimate(cells: list[grid.Cell], seeds: int) -> str:
  rows = [dict(cell=cell.name, **cost.estimate(
      cell.task, cell.preset, config, _PEAK.value, _MFU.value,
      _STEP_SECONDS.value)) for cell, config in zip(cells, _configs(cells))]
  return cost.markdown(rows, seeds, _PEAK.value, _MFU.value,
                       _STEP_SECONDS.value)


def main() -> None:
  root = _WORKDIR.value
  if not root:
    raise ValueError('--workdir is required: the root of the sweep.')
  spec = _grid_spec(root)
  cells = grid.cells(spec['grid'], spec['set'])
  runs = grid.runs(cells, grid.parse_seeds(spec['seeds']), root)
  if _PRINT.value:
    print('\n'.join(run.shell() for run in runs))
    return
  if _ESTIMATE.value:
    print(_estimate(cells, len(grid.parse_seeds(spec['seeds']))), end='')
    return
  metric, also, curve_key = DEFAULTS[cells[0].task]
  metric = _METRIC.value or metric
  exit_code = 0
  if not _REPORT_ONLY.value:
    _configs(cells)
    with runner.lock(root):
      runner.check_commands(runs)
      with open(os.path.join(root, GRID_FILE), 'w') as f:
        json.dump(spec, f, indent=2)
      exit_code = runner.Runner(
          runs, _PARALLEL.value, _RETRY.value,
          describe=lambda run: _describe(run, metric)).run()
  results = report.collect(runs)
  rows = report.summarize(results, metric, _BASELINE.value, also)
  paths = report.write(root, rows, results, metric, curve_key)
  print(report.markdown(rows, metric) + 'report: ' + ', '.join(paths))
  if exit_code:
    raise SystemExit(exit_code)


def _describe(run: grid.Run, metric: str) -> str:
  metrics = report.collect_run(run).metrics
  return f'{metric} {metrics[metric]:.4g}' if metric in metrics else ''


if __name__ == '__main__':
  cli.run(main)
