"""Norms by name, for configs: `get_norm('powernorm')`, `init_state(...)`.

Everything here is read from the norm definitions
(`normjax._src.definition.REGISTRY`); importing this module registers the
built-in norms.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax.numpy as jnp

# Importing a norm's file registers its definition.
from normjax._src import batch_norm  # noqa: F401  # pylint: disable=unused-import
from normjax._src import bcn  # noqa: F401  # pylint: disable=unused-import
from normjax._src import conditional_norm as cond_lib
from normjax._src import definition as nd
from normjax._src import derf  # noqa: F401  # pylint: disable=unused-import
from normjax._src import dyt  # noqa: F401  # pylint: disable=unused-import
from normjax._src import evonorm_b0  # noqa: F401  # pylint: disable=unused-import
from normjax._src import group_norm  # noqa: F401  # pylint: disable=unused-import
from normjax._src import layer_norm  # noqa: F401  # pylint: disable=unused-import
from normjax._src import power_norm  # noqa: F401  # pylint: disable=unused-import
from normjax._src import seednorm  # noqa: F401  # pylint: disable=unused-import
from normjax._src import unified_norm  # noqa: F401  # pylint: disable=unused-import


class _Functions(Mapping):
  """The pure function of every registered norm, by kind (live)."""

  def __getitem__(self, kind: str) -> Callable[..., Any]:
    return nd.REGISTRY[kind].function

  def __iter__(self) -> Iterator[str]:
    return iter(nd.REGISTRY)

  def __len__(self) -> int:
    return len(nd.REGISTRY)


FUNCTIONS: Mapping[str, Callable[..., Any]] = _Functions()

# Norms that also need a conditioning input, a required keyword: adaLN-Zero
# the modulation (`shift`, `scale`), TD-LN the time `tau`. Same signature
# otherwise, stateless; kept apart because they cannot fill a plain norm slot.
CONDITIONAL_FUNCTIONS: dict[str, Callable[..., Any]] = {
    'adaln_zero': cond_lib.ada_ln_zero,
    'td_layernorm': cond_lib.td_layer_norm,
    'td_rmsnorm': cond_lib.td_rms_norm,
}


def get_norm(kind: str) -> Callable[..., Any]:
  """The pure function of norm `kind` (a key of `FUNCTIONS` or
  `CONDITIONAL_FUNCTIONS`)."""
  if kind in FUNCTIONS:
    return FUNCTIONS[kind]
  if kind in CONDITIONAL_FUNCTIONS:
    return CONDITIONAL_FUNCTIONS[kind]
  raise ValueError(f'get_norm: unknown norm kind {kind!r}; choose from '
                   f'{sorted(FUNCTIONS)} or the conditional '
                   f'{sorted(CONDITIONAL_FUNCTIONS)}.')


def get_definition(kind: str) -> nd.NormDefinition:
  """The `NormDefinition` of a registered norm."""
  return nd.lookup(kind, 'get_definition')


def init_state(kind: str, features: int, dtype=jnp.float32,
               **options: Any) -> Any:
  """A fresh state for norm `kind`; `EmptyState()` for stateless norms.

  `options` are the norm's options (those the state depends on, such as
  `window_size` and `num_batch_groups`, are used; unknown ones raise), so
  the same options dict serves both calls.
  """
  get_norm(kind)
  if kind in CONDITIONAL_FUNCTIONS:
    return nd.common.EmptyState()
  return nd.REGISTRY[kind].new_state(features, dtype, **options)


PROPERTY_COLUMNS = ('stateful', 'batch_dependent', 'causal_safe', 'foldable')


def properties_table() -> str:
  """A markdown table of every registered norm: kind, function, module and
  `PROPERTY_COLUMNS` (yes/no), as the README lists them."""
  head = ['kind', 'function', 'module', 'stateful', 'batch-dependent',
          'causal-safe in training', 'foldable']
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for kind in sorted(nd.REGISTRY):
    d = nd.REGISTRY[kind]
    marks = ['yes' if getattr(d, c) else 'no' for c in PROPERTY_COLUMNS]
    lines.append(f'| `{kind}` | `{d.name}` | `{d.module}` | '
                 + ' | '.join(marks) + ' |')
  return '\n'.join(lines)
