"""Intervals over seeds: the mean with its Student-t confidence interval,
and the paired difference of two cells over their common seeds.

    t_interval([176.7, 180.2, 178.1])       # Interval(mean=178.33, half=4.4, n=3)
    paired({1: 180.7, 2: 181.0}, {1: 176.7, 2: 178.0})  # cell - baseline

With n seeds the interval is mean +- t(1 - (1 - c)/2, n - 1) * s / sqrt(n),
s the sample standard deviation (ddof 1); n = 1 has no interval (half is
NaN). A paired difference is resolved when its interval excludes 0.
Pairing by seed removes what two runs of the same seed share (the data
order and, for the same architecture, the initial weights).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

from scipy import stats


@dataclasses.dataclass(frozen=True)
class Interval:
  """mean +- half, over n values (half NaN when n < 2)."""
  mean: float
  half: float
  n: int

  @property
  def low(self) -> float:
    return self.mean - self.half

  @property
  def high(self) -> float:
    return self.mean + self.half

  @property
  def resolved(self) -> bool:
    """The interval excludes 0 (False without an interval)."""
    return self.n >= 2 and (self.low > 0 or self.high < 0)

  def format(self, digits: int = 1) -> str:
    if self.n == 0:
      return '-'
    if self.n < 2 or math.isnan(self.half):
      return f'{self.mean:.{digits}f} (n=1)'
    return f'{self.mean:.{digits}f} ± {self.half:.{digits}f}'


def t_interval(values: Sequence[float], confidence: float = 0.95
               ) -> Interval:
  """The mean of `values` and the half-width of its t interval."""
  n = len(values)
  if n == 0:
    return Interval(math.nan, math.nan, 0)
  mean = math.fsum(values) / n
  if n < 2:
    return Interval(mean, math.nan, 1)
  sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
  quantile = stats.t.ppf(1 - (1 - confidence) / 2, n - 1)
  return Interval(mean, float(quantile * sd / math.sqrt(n)), n)


def paired(cell: Mapping[int, float], baseline: Mapping[int, float],
           confidence: float = 0.95) -> Interval:
  """The t interval of cell[seed] - baseline[seed] over the common seeds."""
  common = sorted(set(cell) & set(baseline))
  return t_interval([cell[s] - baseline[s] for s in common], confidence)
