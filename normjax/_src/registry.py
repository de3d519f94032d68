"""Norms by name, for configs: `get_norm('powernorm')`, `init_state(...)`."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp

from normjax._src import batch_norm as bn_lib
from normjax._src import common
from normjax._src import conditional_norm as cond_lib
from normjax._src import dyt as dyt_lib
from normjax._src import group_norm as gn_lib
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
    'dyt': dyt_lib.dyt,
    'crmsnorm': ln_lib.crms_norm,
    'groupnorm': gn_lib.group_norm,
    'evonorm_s0': gn_lib.evonorm_s0,
    'layernorm_scaling': ln_lib.layer_norm_scaling,
}

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
