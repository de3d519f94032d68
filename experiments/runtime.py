"""Process set-up that makes XLA:CPU fast: the glibc allocator settings.

XLA:CPU allocates each call's temporary buffers (tens of MiB) with `malloc`,
and glibc's defaults return such blocks to the kernel after every call and
map them afresh on the next: a page fault per 4 KiB, which made a LayerNorm
training step 2-4x slower here. `tune_malloc` tells glibc to keep and reuse
them (one arena, no mmap, no trim). The entry points and benchmarks call it
before JAX computes; in your own programs call it first, or preload tcmalloc
(`LD_PRELOAD=.../libtcmalloc_minimal.so.4`).
"""

from __future__ import annotations

import ctypes
import os

# malloc.h: M_ARENA_MAX = -8, M_MMAP_MAX = -4, M_TRIM_THRESHOLD = -1.
_MALLOPT = ((-8, 1), (-4, 0), (-1, 1 << 30))


def tune_malloc(skip: bool = False) -> str:
  """Makes glibc keep and reuse big blocks; returns what is in effect."""
  if 'tcmalloc' in os.environ.get('LD_PRELOAD', ''):
    return 'tcmalloc (LD_PRELOAD)'
  if skip or os.environ.get('NORMJAX_NO_MALLOC_TUNING'):
    return 'glibc default'
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):  # not glibc (macOS, musl)
    return 'system default'
  if not all(mallopt(k, v) for k, v in _MALLOPT):
    return 'glibc default'
  return 'glibc + mallopt (1 arena, no mmap, no trim)'
