"""Norms by name, for configs: `get_norm('powernorm')`, `init_state(...)`."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp

from normjax._src import batch_norm as bn_lib
from normjax._src import common
from normjax._src import layer_norm as ln_lib
from normjax._src import power_norm as pn_lib
from normjax._src import unified_norm as un_lib

FUNCTIONS: dict[str, Callable[..., Any]] = {
    'layernorm': ln_lib.layer_norm,
    'rmsnorm': ln_lib.rms_norm,
    'batchnorm': bn_lib.batch_norm,
    'powernorm': pn_lib.power_norm,
    'pn_v': pn_lib.pn_v,
    'unified': un_lib.unified_norm,
    'group_scaling': ln_lib.group_scaling,
}


def get_norm(kind: str) -> Callable[..., Any]:
  """The pure function of norm `kind` (a key of `FUNCTIONS`)."""
  if kind not in FUNCTIONS:
    raise ValueError(f'get_norm: unknown norm kind {kind!r}; choose from '
                     f'{sorted(FUNCTIONS)}.')
  return FUNCTIONS[kind]


def init_state(kind: str, features: int, dtype=jnp.float32,
               **options: Any) -> Any:
  """A fresh state for norm `kind`; `EmptyState()` for stateless norms.

  `options` may hold any keyword of the norm function; those the state depends
  on (`window_size`, `num_batch_groups`) are used and the rest ignored, so
  the same options dict serves both calls.
  """
  get_norm(kind)
  groups = options.get('num_batch_groups', 1)
  if kind == 'batchnorm':
    return bn_lib.init_batch_norm_state(features, dtype, groups)
  if kind == 'powernorm':
    return pn_lib.init_power_norm_state(features, dtype, groups)
  if kind == 'pn_v':
    return pn_lib.init_pn_v_state(features, dtype, groups)
  if kind == 'unified':
    window = options.get(
        'window_size',
        inspect.signature(un_lib.unified_norm).parameters['window_size']
        .default)
    return un_lib.init_unified_norm_state(features, window, dtype, groups)
  return common.EmptyState()
