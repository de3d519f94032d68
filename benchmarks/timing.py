"""How every benchmark call is timed: interleaved rounds on a settled machine.

`timed_rounds` calls each function once per round, each library's functions
as one block (in a shuffled order, the blocks too), and

1. before each block waits until the process's other threads are idle
   (`settle_threads`):
   torch's OpenMP workers spin for about 9 ms after each torch call (on
   this 2-core VM: 8.7 ms of CPU, /proc schedstat), longer than an eviction.
   A JAX call that followed one ran with its second thread competing for the
   second core: our centred statistics pass took 1.0-1.4 ms with torch in the
   process and 0.60-0.69 ms without it, and paired ratios against torch
   changed with how many torch rows shared the rotation (BatchNorm forward
   vs torch: 0.85-1.15x with two torch rows, 1.16-1.68x with ten). Within
   a block nothing waits, as in a training loop: settling before every
   call woke parked runtime threads in every call, and in the size sweep
   (no eviction) a LayerNorm fwd+bwd of 16 x 1024 took 74 instead of 32 us
   in normjax, 346 instead of 121 us in torch;
2. before each call evicts the caches with every core (`cache_evictor`):
   each core writes its share of twice the last-level cache. One core
   writing it left the other idle for ~5 ms, and XLA's pool threads, asleep
   by then, joined a call late or not at all (a jax.profiler trace: the
   BatchNorm statistics pass ran on one thread in 4 of 5 calls); torch's
   still-spinning workers did not pay that. With every core evicting,
   XLA's own column sum of [4096, 1024] f32 took 0.72-0.76 ms instead of
   1.02-1.17 ms, normjax's BatchNorm forward 1.63-1.78 instead of
   2.32-2.51 ms. So each call starts with cold caches and awake cores, as
   inside a training step.
"""

from __future__ import annotations

import concurrent.futures
import os
import random
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np


def last_level_cache_bytes() -> int:
  """The CPU's largest cache (sysfs), or 32 MiB where it cannot be read."""
  sizes = []
  for index in range(8):
    try:
      with open(f'/sys/devices/system/cpu/cpu0/cache/index{index}/size') as fh:
        text = fh.read().strip()
    except OSError:
      break
    unit = {'K': 1 << 10, 'M': 1 << 20}.get(text[-1:], 1)
    sizes.append(int(text.rstrip('KM')) * unit)
  return max(sizes, default=32 << 20)


def cache_evictor() -> Callable[[], None]:
  """A function that writes twice the last-level cache, a share per core
  (numpy releases the GIL), so that the next call starts with its operands
  in memory and no core idle."""
  workers = os.cpu_count() or 1
  buffer = np.ones(2 * last_level_cache_bytes() // 4, np.float32)
  shares = np.array_split(buffer, workers)
  pool = concurrent.futures.ThreadPoolExecutor(workers, 'evict')

  def evict():
    list(pool.map(lambda share: np.add(share, 1.0, out=share), shares))
  return evict


def _others_running() -> bool | None:
  """Whether a thread of this process other than the caller is running or
  runnable (state R in /proc: a spinning worker is, a parked one is not);
  None where /proc cannot be read."""
  me = threading.get_native_id()
  try:
    tids = os.listdir('/proc/self/task')
  except OSError:
    return None
  for tid in tids:
    if int(tid) == me:
      continue
    try:
      with open(f'/proc/self/task/{tid}/stat') as fh:
        state = fh.read().rsplit(')', 1)[1].split()[0]
    except (OSError, IndexError):  # the thread ended
      continue
    if state == 'R':
      return True
  return False


def settle_threads(timeout_s: float = 0.05) -> float:
  """Busy-waits until no other thread of this process is running (for two
  checks in a row), at most `timeout_s`; returns the seconds waited. Without
  /proc it returns at once."""
  start, quiet = time.perf_counter(), 0
  while quiet < 2 and time.perf_counter() - start < timeout_s:
    running = _others_running()
    if running is None:
      break
    quiet = 0 if running else quiet + 1
  return time.perf_counter() - start


def timed_rounds(fns: dict, warmup: int, reps: int,
                 evict: Callable[[], None] | None = None,
                 library: Callable[[Any], str] = lambda key: ''
                 ) -> dict[str, list[float]]:
  """ms per call and round for {key: (f, args)}; one call of each per round.

  A round times each library's functions (`library(key)`) as one block, in
  a shuffled order, the blocks in a shuffled order: calls of one library
  follow each other as in its own training loop (torch's workers still
  spinning from its previous call), and `settle_threads()` runs before
  each block, so that no library's threads run into another's calls.
  `evict()` (untimed) precedes every call if given.
  """
  for f, args in fns.values():
    for _ in range(max(warmup, 1)):  # the first call compiles
      jax.block_until_ready(f(*args))
  times, rng = {k: [] for k in fns}, random.Random(0)
  names = sorted({library(k) for k in fns})
  blocks = [[k for k in fns if library(k) == name] for name in names]
  for _ in range(reps):
    rng.shuffle(blocks)
    for block in blocks:
      rng.shuffle(block)
      settle_threads()
      for k in block:
        f, args = fns[k]
        if evict is not None:
          evict()
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        times[k].append(time.perf_counter() - t0)
  return {k: [1e3 * t for t in v] for k, v in times.items()}


def paired_ratio(a: list[float], b: list[float]) -> float:
  """Median over rounds of a/b timed in the same round (drift cancels)."""
  return statistics.median(x / y for x, y in zip(a, b))
