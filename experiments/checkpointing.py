"""Orbax checkpoints of the train state, with the metadata an exact resume needs.

A checkpoint holds the whole `TrainState` (params, optimizer state, the
norms' forward and backward statistics, the step and the rng) and a JSON
record: the data iterator position, the vocabulary fingerprint, and the
preset, so a run that resumes with another vocabulary stops with a message
instead of training on garbage.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointMismatch(ValueError):
  """The checkpoint does not belong to this run: a user error."""


def manager(directory: str, keep: int, async_save: bool = True
            ) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state: Any,
         meta: dict) -> None:
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))


def abstract_like(state: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the target shardings, for a sharded restore."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      state, shardings)


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state: Any,
            expect: dict) -> tuple[Any, dict]:
  """Restores `step`; checks `expect` (key -> value) against the metadata."""
  meta = mngr.restore(step, args=ocp.args.Composite(
      meta=ocp.args.JsonRestore()))['meta']
  for key, want in expect.items():
    got = meta.get(key)
    if got != want:
      raise CheckpointMismatch(
          f'checkpoint {mngr.directory}/{step} has {key}={got!r} but this run '
          f'has {key}={want!r}; use a new --workdir, or the settings the '
          'checkpoint was written with.')
  state = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state)))['state']
  return state, meta


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
