"""What an option's value may be: one `Rule` per option, declared in its record.

`Option(name, default, doc, check=rule)` states the rule once; the record
(`NormDefinition.check_options`) applies it to every call of the function,
the linen module and the nnx module, and to state creation, raising

    power_norm: `alpha_fwd` must be a number in [0, 1], got 2.

Options are static Python values, so rules run at trace time. A traced value
(an option passed through `jax.jit` without `static_argnames`) cannot be
checked and is let through.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np


class Rule(NamedTuple):
  """`accepts(value)` tells whether `value` is valid; `expected` says what is.

  `expected` completes the sentence "`name` must be ...".
  """
  accepts: Callable[[Any], bool]
  expected: str


def _traced(value: Any) -> bool:
  return isinstance(value, jax.core.Tracer)


def _as_real(value: Any) -> float | None:
  """`value` as a float when it is a real number (not a bool), else None."""
  if isinstance(value, (bool, np.bool_)):
    return None
  if isinstance(value, numbers.Real):
    return float(value)
  if (isinstance(value, (np.ndarray, jax.Array)) and value.shape == ()
      and np.issubdtype(value.dtype, np.number)
      and not np.issubdtype(value.dtype, np.complexfloating)):
    return float(value)
  return None


def _shown(bound: float) -> str:
  return f'{bound:g}' if math.isfinite(bound) else ('inf' if bound > 0
                                                    else '-inf')


def number(low: float, high: float, *, low_open: bool = False,
           high_open: bool = False) -> Rule:
  """A real number (not a bool, not NaN) in the interval from low to high.

  Bounds are closed unless said open; an infinite closed bound admits that
  infinity (`number(1, math.inf)` accepts inf).
  """
  def accepts(value):
    if _traced(value):
      return True
    v = _as_real(value)
    if v is None or math.isnan(v):
      return False
    above = v > low if low_open else v >= low
    below = v < high if high_open else v <= high
    return above and below

  return Rule(accepts, f"a number in {'(' if low_open else '['}"
              f"{_shown(low)}, {_shown(high)}{')' if high_open else ']'}")


def integer(low: int) -> Rule:
  """A Python or NumPy int (not a bool) >= low."""
  def accepts(value):
    if _traced(value):
      return True
    return (isinstance(value, (int, np.integer))
            and not isinstance(value, (bool, np.bool_)) and value >= low)
  return Rule(accepts, 'a positive int' if low == 1 else f'an int >= {low}')


def boolean() -> Rule:
  """True or False (a Python or NumPy bool)."""
  return Rule(lambda v: _traced(v) or isinstance(v, (bool, np.bool_)),
              'a bool')


def one_of(*choices: Any) -> Rule:
  """One of `choices` (compared with ==; types must match for None)."""
  def accepts(value):
    return any(value is c if c is None else
               (isinstance(value, str) and value == c) for c in choices)
  return Rule(accepts, f'one of {list(choices)}')


def either(first: Rule, second: Rule) -> Rule:
  """A value that satisfies `first` or `second`."""
  return Rule(lambda v: first.accepts(v) or second.accepts(v),
              f'{first.expected}, or {second.expected}')


def positive_int_or_pair() -> Rule:
  """A positive int, or a pair (forward, backward) of positive ints."""
  one = integer(1)

  def accepts(value):
    if one.accepts(value):
      return True
    return (isinstance(value, (tuple, list)) and len(value) == 2
            and all(one.accepts(v) for v in value))
  return Rule(accepts, 'a positive int or a pair (forward, backward) of '
              'positive ints')


# The rules shared by many norms.
EPS = number(0, math.inf, high_open=True)
"""eps >= 0 and finite. 0 is exact normalisation (the scale-invariance
tests use it); a negative eps makes sqrt(s + eps) NaN for small s."""

DECAY = number(0, 1)
"""An EMA decay m in s <- m s + (1 - m) batch. Both ends are well defined:
0 keeps only the latest batch, 1 freezes the statistic at its initial (or,
for PowerNorm's phi, its warmup) value; outside [0, 1] the average
extrapolates and can change sign."""

STEPS = integer(0)
"""A step count (warmup, delay): 0 turns the phase off."""

COUNT = integer(1)
"""A number of groups: at least one."""

FLAG = boolean()
