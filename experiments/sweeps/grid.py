"""A sweep's grid: cells (task, preset, overrides) times seeds, each run an
ordinary command with its own workdir.

    grid.expand('ptb_{layernorm,powernorm},small')
    # ['ptb_layernorm,small', 'ptb_powernorm,small']
    cells = grid.cells(['lm:ptb_{layernorm,powernorm},short'],
                       ['data.path=../shared/data/ptb'])
    grid.runs(cells, seeds=[1, 2, 3], root='runs/ptb')
    # Run(cell=..., seed=1, workdir='runs/ptb/ptb_layernorm_short/seed1')

Braces expand as in bash (`{a,b}`, nested and several per pattern), in
`--grid` presets and in `--set` values alike; every expanded `--set` is one
more dimension of the grid. A cell's name is its preset with ',' as '_',
followed by the overrides that vary across the grid.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import shlex

TASKS = ('lm', 'wmt', 'iwslt')  # python -m experiments.<task>


def expand(pattern: str) -> list[str]:
  """Bash brace expansion of `pattern`: 'a{b,c}d{e,f}' -> 4 strings."""
  start = pattern.find('{')
  if start < 0:
    return [pattern]
  depth, parts, begin = 0, [], start + 1
  for i in range(start, len(pattern)):
    ch = pattern[i]
    if ch == '{':
      depth += 1
    elif ch == '}':
      depth -= 1
      if depth == 0:
        parts.append(pattern[begin:i])
        head, tail = pattern[:start], pattern[i + 1:]
        return [head + choice + rest
                for part in parts for choice in expand(part)
                for rest in expand(tail)]
    elif ch == ',' and depth == 1:
      parts.append(pattern[begin:i])
      begin = i + 1
  raise ValueError(f'{pattern!r}: a "{{" without its "}}".')


@dataclasses.dataclass(frozen=True)
class Cell:
  """One point of the grid: `python -m experiments.<task> --config=<preset>
  --config.<key>=<value>...` (overrides as (key, value) pairs)."""
  task: str
  preset: str
  overrides: tuple[tuple[str, str], ...]
  name: str

  def command(self, seed: int, workdir: str,
              python: str = 'python') -> list[str]:
    return ([python, '-m', f'experiments.{self.task}',
             f'--config={self.preset}', f'--config.seed={seed}']
            + [f'--config.{k}={v}' for k, v in self.overrides]
            + [f'--workdir={workdir}'])


@dataclasses.dataclass(frozen=True)
class Run:
  """One seed of one cell, in <root>/<cell name>/seed<seed>."""
  cell: Cell
  seed: int
  workdir: str

  def command(self, python: str = 'python') -> list[str]:
    return self.cell.command(self.seed, self.workdir, python)

  def shell(self) -> str:
    """The command as one line a user (or a scheduler) can run."""
    return shlex.join(self.command())


def _split_task(spec: str) -> tuple[str, str]:
  task, sep, preset = spec.partition(':')
  if not sep or task not in TASKS or not preset:
    raise ValueError(f'--grid={spec!r}: write TASK:PRESETS with TASK one of '
                     f'{", ".join(TASKS)}, e.g. '
                     "--grid='lm:ptb_{layernorm,powernorm},short'.")
  return task, preset


def _split_override(spec: str) -> tuple[str, str]:
  key, sep, value = spec.partition('=')
  key = key.removeprefix('--').removeprefix('config.')
  if not sep or not key or key == 'seed':
    raise ValueError(f'--set={spec!r}: write KEY=VALUE with a dotted config '
                     'key, e.g. --set=data.path=../shared/data/ptb (seeds '
                     'come from --seeds).')
  return key, value


def cells(grid: list[str], overrides: list[str]) -> list[Cell]:
  """The cells of `--grid` patterns times the expanded `--set` values, in
  order, without repeats."""
  if not grid:
    raise ValueError("--grid: give at least one TASK:PRESETS, e.g. "
                     "--grid='lm:ptb_{layernorm,powernorm},short'.")
  presets = [(task, p) for spec in grid
             for task, pattern in [_split_task(spec)]
             for p in expand(pattern)]
  dims = [[(key, v) for v in expand(value)]
          for key, value in map(_split_override, overrides)]
  varying = {key for dim in dims if len(dim) > 1 for key, _ in dim}
  out, seen = [], set()
  for (task, preset), chosen in itertools.product(presets,
                                                  itertools.product(*dims)):
    name = preset.replace(',', '_') + ''.join(
        f'__{k}={v}' for k, v in chosen if k in varying)
    if len({task for task, _ in presets}) > 1:
      name = f'{task}_{name}'
    if name in seen:
      continue
    seen.add(name)
    out.append(Cell(task, preset, tuple(chosen), name.replace('/', '_')))
  return out


def parse_seeds(text: str) -> list[int]:
  """'1,2,3' or '1-5' (or a mix, '1-3,7') -> sorted distinct seeds."""
  seeds = set()
  try:
    for part in text.split(','):
      low, sep, high = part.strip().partition('-')
      seeds.update(range(int(low), int(high) + 1) if sep else [int(low)])
  except ValueError:
    raise ValueError(f'--seeds={text!r}: write integers separated by '
                     'commas, or ranges like 1-5.') from None
  if not seeds:
    raise ValueError('--seeds: give at least one seed.')
  return sorted(seeds)


def runs(grid_cells: list[Cell], seeds: list[int], root: str) -> list[Run]:
  """Every (cell, seed), seeds outermost: the first seed of every cell
  runs before any second one, so a partial sweep already pairs every cell
  with the baseline."""
  return [Run(cell, seed, os.path.join(root, cell.name, f'seed{seed}'))
          for seed in seeds for cell in grid_cells]
