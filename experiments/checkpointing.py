"""Orbax checkpoints of the train state, with the metadata an exact resume needs.

A checkpoint holds the whole `TrainState` (params, optimizer state, the
norms' forward and backward statistics, the step and the rng) and a JSON
record: the data iterator position, the vocabulary fingerprint, the preset
and the settings that define the run (`run_identity`: seed, model, data), so
a run that resumes with another vocabulary or model stops with a message
naming what differs instead of training on garbage.

A checkpoint counts only when it is complete (`problem`: orbax's commit
marker and metadata present), restores, and its state has the checksum its
record holds (`checksum`, `restore_newest`): a truncated, half-written or
corrupted one is moved aside, never deleted, and the run falls back to the
next older valid one.

Each record says why the checkpoint was written (`kind`): on the cadence,
at the end of the run, or on a preemption signal. `prune` keeps the newest
`keep` cadence/final checkpoints plus the newest of all, deleting old ones
only once a newer one is committed, so a preemption checkpoint never
displaces a cadence one nor enters the averaging set (`averaging_steps`):
a preempted and resumed run ends with the files of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import shutil
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp


class CheckpointMismatch(ValueError):
  """The checkpoint does not belong to this run: a user error."""


class CheckpointCorrupt(ValueError):
  """No checkpoint of the run can be restored."""


# Settings that define a run; the others (steps, cadence, learning rate,
# mesh) may change on resume. Paths may move between machines.
IDENTITY = ('seed', 'model', 'data')
MOVABLE = ('data.path', 'data.tfds_data_dir')
# Settings added since some checkpoints were written: their value then.
ADDED = {'model.dtype': 'float32'}
COMMIT_MARKER = 'commit_success.txt'
INVALID_DIR = 'invalid_checkpoints'
# Why a checkpoint was written (its record's 'kind').
CADENCE, FINAL, PREEMPTED = 'cadence', 'final', 'preempted'


def run_identity(config: Any) -> dict[str, Any]:
  """{'config': {dotted key: value}} of the settings a resume must keep."""
  flat: dict[str, Any] = {}

  def walk(prefix, value):
    if hasattr(value, 'items'):
      for k, v in value.items():
        walk(f'{prefix}.{k}' if prefix else k, v)
    elif prefix not in MOVABLE:
      flat[prefix] = value
  for section in IDENTITY:
    walk(section, config[section])
  # JSON round trip: tuples become lists, as they come back from a checkpoint.
  return {'config': json.loads(json.dumps(flat, default=str))}


def manager(directory: str, keep: int | None = None,
            async_save: bool = True) -> ocp.CheckpointManager:
  """A manager of `directory`; half-written temporary directories of a
  killed save (never complete, never restored) are removed on start.

  Orbax keeps everything: `prune(mngr, keep)` (called by the training loop
  before each save) decides which old checkpoints go. `keep` is accepted
  for callers that write a single checkpoint and ignored.
  """
  del keep
  options = ocp.CheckpointManagerOptions(
      max_to_keep=None, enable_async_checkpointing=async_save, create=True,
      cleanup_tmp_directories=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state: Any,
         meta: dict) -> None:
  """Saves `state` with `meta` plus the state's `checksum`."""
  meta = dict(meta, checksum=checksum(state))
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))


def _bits(x: jax.Array) -> jax.Array:
  """The raw bits of `x` as uint32 (64-bit values give two words each)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[
      x.dtype.itemsize]
  return jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32)


def _leaf_checksum(x: jax.Array) -> jax.Array:
  """sum(bits) and sum(bits * (position-dependent odd weight)), mod 2^32."""
  bits = _bits(jnp.asarray(x))
  position = jnp.zeros(bits.shape, jnp.uint32)
  for dim in range(bits.ndim):
    position = (position * jnp.uint32(bits.shape[dim])
                + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, dim))
  weight = position * jnp.uint32(2654435761) + jnp.uint32(1)
  return (jnp.sum(bits, dtype=jnp.uint32) ^
          jnp.sum(bits * weight, dtype=jnp.uint32))


@jax.jit
def _checksum(leaves):
  return sum((_leaf_checksum(x) for x in leaves), jnp.uint32(0))


def checksum(state: Any) -> str:
  """A checksum of every array of `state`, independent of the containers
  (a TrainState and the nested dicts it restores as agree): the sum over
  leaves of each leaf's position-weighted sum of its bits, mod 2^32."""
  leaves = jax.tree.leaves(state)
  return f'{int(_checksum(leaves)):08x}/{len(leaves)}'


def abstract_like(state: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the target shardings, for a sharded restore."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      state, shardings)


def check_meta(where: str, meta: dict, expect: dict) -> None:
  """Raises CheckpointMismatch naming the first settings that differ."""
  for key, want in expect.items():
    got = meta.get(key)
    if key == 'config':
      if got is None:  # written before run identities were recorded
        continue
      got = {**ADDED, **got}
      diff = [k for k in sorted(set(got) | set(want))
              if got.get(k, '<absent>') != want.get(k, '<absent>')]
      if diff:
        shown = '; '.join(
            f'{k}={got.get(k, "<absent>")!r} there, {want.get(k, "<absent>")!r}'
            ' here' for k in diff[:3])
        more = f' (and {len(diff) - 3} more)' if len(diff) > 3 else ''
        raise CheckpointMismatch(
            f'checkpoint {where} was written by another config: {shown}{more}; '
            'use a new --workdir, or the settings the checkpoint was written '
            'with.')
    elif got != want:
      raise CheckpointMismatch(
          f'checkpoint {where} has {key}={got!r} but this run '
          f'has {key}={want!r}; use a new --workdir, or the settings the '
          'checkpoint was written with.')


def restore(mngr: ocp.CheckpointManager, step: int,
            abstract_state: Any = None, expect: dict | None = None
            ) -> tuple[Any, dict]:
  """(state, meta) of `step`; checks `expect` (key -> value) against the
  metadata first. The state takes the structure, dtypes and shardings of
  `abstract_state` (`abstract_like`), or without it comes as saved: nested
  dicts of arrays."""
  meta = mngr.restore(step, args=ocp.args.Composite(
      meta=ocp.args.JsonRestore()))['meta']
  meta = dict(meta or {})
  where = f'{mngr.directory}/{step}'
  check_meta(where, meta, expect or {})
  state = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state)))['state']
  verify_checksum(where, state, meta)
  return state, meta


def verify_checksum(where: str, state: Any, meta: dict) -> None:
  """Raises CheckpointCorrupt if `state` is not what was saved at `where`
  (records written before checksums existed are accepted)."""
  want = meta.get('checksum')
  if want is not None and checksum(state) != want:
    raise CheckpointCorrupt(
        f'checkpoint {where}: its data does not match the checksum saved '
        f'with it ({want}); the files were altered or damaged after saving.')


def steps(directory: str) -> list[int]:
  """The steps of the complete checkpoints in `directory`, oldest first.

  Raises FileNotFoundError if there is no such directory or it holds none.
  """
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'no checkpoint directory {directory}; train the '
                            'run first (same --workdir).')
  with ocp.CheckpointManager(os.path.abspath(directory)) as mngr:
    found = sorted(mngr.all_steps())
  if not found:
    raise FileNotFoundError(f'{directory} holds no complete checkpoint; '
                            'train the run first.')
  return found


def read(directory: str, step: int | None = None, *,
         abstract_state: Any = None, expect: dict | None = None
         ) -> tuple[Any, dict, int]:
  """(state, meta, step) of checkpoint `step` of `directory` (None: the newest).

  The one way to read a checkpoint outside a training run (evaluation,
  averaging, folding, tests). Without `abstract_state` the state comes as
  saved (nested dicts of arrays: 'step', 'params', 'opt_state',
  'batch_stats', 'grad_stats', 'rng'); `expect` is checked as in `restore`.
  Raises FileNotFoundError if there is no such directory or step.
  """
  available = steps(directory)
  if step is None:
    step = available[-1]
  elif step not in available:
    raise FileNotFoundError(f'{directory} has no step {step}; it has '
                            f'{available}.')
  with ocp.CheckpointManager(os.path.abspath(directory)) as mngr:
    state, meta = restore(mngr, step, abstract_state, expect)
  return state, meta, step


def problem(directory: str, step: int) -> str | None:
  """Why `directory/step` is not a complete checkpoint, or None."""
  path = os.path.join(str(directory), str(step))
  for name in (COMMIT_MARKER, '_CHECKPOINT_METADATA',
               os.path.join('state', COMMIT_MARKER),
               os.path.join('meta', 'metadata')):
    if not os.path.exists(os.path.join(path, name)):
      return f'{name} is missing'
  return None


def restore_newest(mngr: ocp.CheckpointManager, abstract_state: Any,
                   expect: dict) -> tuple[Any, dict] | None:
  """The newest checkpoint that is complete and restores, or None if there
  is none at all.

  An incomplete or unreadable checkpoint is moved to <workdir>/
  invalid_checkpoints/<step> (a warning says why) and the next older one is
  tried; a checkpoint of another run (CheckpointMismatch) stops at once.
  Raises CheckpointCorrupt if checkpoints exist but none restores.
  """
  directory = str(mngr.directory)
  bad = []
  for step in sorted(mngr.all_steps(), reverse=True):
    reason = problem(directory, step)
    if reason is None:
      with quiet_asyncio():
        try:
          state, meta = restore(mngr, step, abstract_state, expect)
          at = int(state['step'] if isinstance(state, dict) else state.step)
          if int(meta.get('step', step)) != step or at != step:
            reason = (f'its state is at step {at}, its record at '
                      f'{meta.get("step")}')
        except CheckpointMismatch:
          raise
        except CheckpointCorrupt:
          reason = 'its data does not match its checksum'
        except Exception as e:  # pylint: disable=broad-except
          reason = f'{type(e).__name__}: {str(e).splitlines()[0][:200]}'
    if reason is None:
      for bad_step, why in bad:
        _move_aside(directory, bad_step, why)
      if bad:
        mngr.reload()
      return state, meta
    bad.append((step, reason))
  if bad:
    raise CheckpointCorrupt(
        f'no checkpoint in {directory} can be restored ('
        + '; '.join(f'step {s}: {why}' for s, why in bad)
        + '); move the directory away to start afresh, or restore a copy.')
  return None


@contextlib.contextmanager
def quiet_asyncio():
  """A failed orbax read leaves futures whose errors asyncio would print at
  garbage collection, pages of them; the one-line reason is reported."""
  logger = logging.getLogger('asyncio')
  level = logger.level
  logger.setLevel(logging.CRITICAL + 1)
  try:
    yield
  finally:
    gc.collect()
    logger.setLevel(level)


def _move_aside(directory: str, step: int, why: str) -> None:
  target = os.path.join(os.path.dirname(directory), INVALID_DIR)
  os.makedirs(target, exist_ok=True)
  dest = os.path.join(target, str(step))
  n = 1
  while os.path.exists(dest):
    dest, n = os.path.join(target, f'{step}.{n}'), n + 1
  shutil.move(os.path.join(directory, str(step)), dest)
  print(f'warning: checkpoint {directory}/{step} is invalid ({why}); moved to '
        f'{dest}, resuming from an older one.', file=sys.stderr, flush=True)


def kind(directory: str, step: int) -> str:
  """Why checkpoint `step` was written (CADENCE for records without)."""
  path = os.path.join(str(directory), str(step), 'meta', 'metadata')
  try:
    with open(path) as f:
      return json.load(f).get('kind', CADENCE)
  except (OSError, ValueError):
    return CADENCE


def prune(mngr: ocp.CheckpointManager, keep: int) -> None:
  """Deletes the complete checkpoints that are neither among the newest
  `keep` cadence/final ones nor the newest of all (the one to resume from).

  Call it when no save is in flight, or before `mngr.save` (which first
  waits for the previous save): only committed checkpoints are considered.
  """
  directory = str(mngr.directory)
  complete = [s for s in sorted(mngr.all_steps())
              if problem(directory, s) is None]
  regular = [s for s in complete if kind(directory, s) != PREEMPTED]
  wanted = set(regular[-keep:]) | set(complete[-1:])
  # orbax's delete is a collective: every process deletes what process 0
  # (which writes the commit markers) decided.
  for step in process_0s([s for s in complete if s not in wanted]):
    mngr.delete(step)


def averaging_steps(directory: str, last: int,
                    available: list[int] | None = None) -> list[int]:
  """The newest `last` cadence/final checkpoints of `directory` (never a
  preemption checkpoint): the set an uninterrupted run would average.
  `available`: the steps to choose from (default: `steps(directory)`)."""
  found = steps(directory) if available is None else sorted(available)
  regular = [s for s in found if kind(directory, s) != PREEMPTED]
  return process_0s(regular[-last:])


def process_0s(values: list[int], size: int = 256) -> list[int]:
  """Process 0's `values` (non-negative ints, at most `size`) on every
  process of a multi-process run; `values` itself on one process."""
  if jax.process_count() == 1:
    return values
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  padded = np.full((size,), -1, np.int64)
  padded[:len(values)] = values
  agreed = multihost_utils.broadcast_one_to_all(padded)
  return [int(v) for v in np.asarray(agreed) if v >= 0]


def write_single(path: str, state: Any, meta: dict) -> None:
  """Writes `state` and `meta` as the only checkpoint (step 0) of `path`,
  replacing what is there only once the new one is complete: it is written
  to <path>.tmp, then swapped in (by process 0; every process calls this,
  as the save is collective)."""
  path = os.path.abspath(path)
  tmp, old = path + '.tmp', path + '.old'
  primary = jax.process_index() == 0
  if primary:
    for leftover in (tmp, old):
      shutil.rmtree(leftover, ignore_errors=True)
  _sync('write_single:clean')
  with ocp.CheckpointManager(tmp, options=ocp.CheckpointManagerOptions(
      create=True, enable_async_checkpointing=False)) as m:
    save(m, 0, state, meta)
    m.wait_until_finished()
  _sync('write_single:saved')
  if primary:
    if os.path.exists(path):
      os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
  _sync('write_single:swapped')


def _sync(name: str) -> None:
  """A barrier of every process (nothing on one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def average(states: list[Any]) -> Any:
  """Leafwise mean of several states, as fairseq's average_checkpoints.py.

  Every entry is averaged, running statistics included (the official
  averaged model's PowerNorm phi is the mean of the checkpoints' phi).
  Integer leaves (step counters) are averaged and rounded down.
  """
  def mean(*leaves):
    stacked = np.stack([np.asarray(x, np.float64) for x in leaves])
    value = stacked.mean(0)
    dtype = np.asarray(leaves[0]).dtype
    if np.issubdtype(dtype, np.integer):
      return np.floor(value).astype(dtype)
    return value.astype(dtype)
  return jax.tree.map(mean, *states)
