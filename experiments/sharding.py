"""Device mesh, logical axis rules, and placing data on the mesh.

The mesh has three axes, `data`, `fsdp` and `tensor`, sized by the config
(`-1` takes every remaining device). Parameters carry logical axis names
(`embed`, `mlp`, `heads`, `kv`, `vocab`) that `config.mesh.rules` maps to mesh
axes; batches are split over (`data`, `fsdp`). The same code runs on one CPU,
one GPU, or a TPU pod launched as several processes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')


class MeshError(ValueError):
  """A mesh that does not fit the devices: a user error."""


def maybe_initialize_distributed() -> None:
  """Calls `jax.distributed.initialize` when launched as several processes.

  Set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (or run
  under a cluster environment JAX detects, e.g. a TPU pod or SLURM).
  """
  if int(os.environ.get('JAX_NUM_PROCESSES', '1')) > 1:
    # CPU processes talk through gloo; accelerators use their own collectives.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(
        coordinator_address=os.environ['JAX_COORDINATOR_ADDRESS'],
        num_processes=int(os.environ['JAX_NUM_PROCESSES']),
        process_id=int(os.environ['JAX_PROCESS_ID']))


def mesh_shape(mesh_cfg: Any, num_devices: int) -> tuple[int, ...]:
  """Resolves the -1 entry of (data, fsdp, tensor) against the device count."""
  sizes = [int(mesh_cfg[a]) for a in AXES]
  if sizes.count(-1) > 1:
    raise MeshError('config.mesh: at most one of data/fsdp/tensor may be -1.')
  fixed = math.prod(s for s in sizes if s != -1)
  if fixed <= 0 or num_devices % fixed:
    raise MeshError(
        f'config.mesh: data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]} does '
        f'not divide the {num_devices} devices; choose sizes whose product '
        f'divides {num_devices} (or set one of them to -1).')
  sizes = [num_devices // fixed if s == -1 else s for s in sizes]
  if math.prod(sizes) != num_devices:
    raise MeshError(
        f'config.mesh: data*fsdp*tensor = {math.prod(sizes)} but there are '
        f'{num_devices} devices; set one axis to -1 to use them all.')
  return tuple(sizes)


def make_mesh(mesh_cfg: Any, devices: Sequence[Any] | None = None) -> Mesh:
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), AXES,
              axis_types=(AxisType.Auto,) * len(AXES))


def rules(mesh_cfg: Any) -> tuple[tuple[str, Any], ...]:
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes)
               for name, axes in mesh_cfg.rules)


def data_parallel_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def tree_shardings(abstract_tree: Any, mesh: Mesh, logical_rules) -> Any:
  """NamedShardings for a tree of (possibly logically boxed) leaves."""
  specs = nn.get_partition_spec(abstract_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, logical_rules)


def global_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict:
  """This process's rows of a global batch -> arrays sharded over the mesh.

  Every process builds the same global batch (the data order is seeded) and
  contributes its contiguous slice of rows.
  """
  sharding = batch_sharding(mesh)
  n, i = jax.process_count(), jax.process_index()
  out = {}
  for key, value in batch.items():
    rows = value.shape[0]
    if rows % data_parallel_size(mesh):
      raise MeshError(
          f'batch of {rows} rows does not divide over the data axes '
          f'({data_parallel_size(mesh)} devices); the batcher rounds batches '
          'to a multiple of it, so check config.data.max_tokens.')
    local = value[i * rows // n:(i + 1) * rows // n]
    out[key] = jax.make_array_from_process_local_data(
        sharding, local, (rows,) + value.shape[1:])
  return out
