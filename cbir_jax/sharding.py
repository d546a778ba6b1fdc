"""Data parallelism on a one-axis mesh: parameters replicated, batches split on "data".

No pmap (maintenance mode since JAX 0.8): one `jax.jit` with NamedSharding
covers one device, all local devices and several processes alike.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh with one "data" axis over `devices` (default: every device of every process)."""
  devices = list(jax.devices() if devices is None else devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places a pytree (parameters) on every device of the mesh."""
  return jax.device_put(tree, replicated(mesh))


def local_batch_size(per_device: int, mesh: Mesh) -> int:
  """Rows this process feeds per step: per-device batch times its devices in the mesh."""
  local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
  return per_device * len(local)


def shard_batch(local: np.ndarray, mesh: Mesh) -> jax.Array:
  """Builds the global batch from this process' rows, split over the "data" axis.

  Every process passes the same local shape; the global batch is the
  concatenation in process order.
  """
  return jax.make_array_from_process_local_data(batch_sharding(mesh), local)


def host_local(x: jax.Array) -> np.ndarray:
  """This process' rows of a batch-sharded array, in order, without gathering others'."""
  if jax.process_count() == 1:
    return np.asarray(x)
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
  seen, parts = set(), []
  for s in shards:
    start = s.index[0].start or 0
    if start in seen:  # a replicated copy on another local device
      continue
    seen.add(start)
    parts.append(np.asarray(s.data))
  return np.concatenate(parts, axis=0)
