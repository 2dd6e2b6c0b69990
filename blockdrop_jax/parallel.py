"""Data parallelism: one ('data',) mesh over every device of every host.

The default path is ``jax.jit`` with shardings: batches split over the mesh, parameters and
optimiser states replicated, the step written for the global batch (BatchNorm statistics, losses
and Bernoulli draws are global, so results equal the single-device step). The same step functions
also run under ``jax.pmap`` with an axis name (``pmap_step``).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from blockdrop_jax import compilation
from blockdrop_jax.errors import BlockDropError

AXIS = "data"


def initialize_distributed(enabled: bool) -> None:
  """``jax.distributed.initialize()`` for multi-host runs (coordinator from the environment:
  Cloud TPU, SLURM, or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID)."""
  if enabled and jax.process_count() == 1:
    jax.distributed.initialize()


def data_mesh(devices=None) -> Mesh:
  return Mesh(np.asarray(devices if devices is not None else jax.devices()), (AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(AXIS))


def check_divisible(batch: int, devices: int, what: str = "batch size") -> None:
  """A batch must split into equal, non-empty parts over the devices."""
  if batch < 1 or batch % devices:
    raise BlockDropError(f"{what} = {batch} does not split over {devices} devices; use a "
                         f"multiple of {devices}")


def replicate(tree, mesh: Mesh):
  return jax.device_put(tree, replicated(mesh))


def process_rows(global_batch: int) -> slice:
  """The rows of a global batch that this process loads (hosts split it in equal parts)."""
  per_process = global_batch // jax.process_count()
  start = jax.process_index() * per_process
  return slice(start, start + per_process)


def global_batch(mesh: Mesh, *local_arrays):
  """Global arrays sharded over the mesh from each process's own rows (see ``process_rows``)."""
  sharding = batch_sharded(mesh)
  return tuple(jax.make_array_from_process_local_data(sharding, np.asarray(a)) for a in local_arrays)


def sharded_step(step: Callable, mesh: Mesh, donate: bool = True,
                 replicated_args: int = 2) -> Callable:
  """``step(state, images, labels, key, k, ...) -> (state, metrics)`` jitted over the mesh: the
  batch split, the state and the ``replicated_args`` arguments after the labels (key, k and any
  further, such as a distillation teacher) replicated."""
  rep, data = replicated(mesh), batch_sharded(mesh)
  return compilation.jit(step, in_shardings=(rep, data, data) + (rep,) * replicated_args,
                         out_shardings=(rep, rep), donate_argnums=0 if donate else ())


def pmap_step(step: Callable, devices=None) -> Callable:
  """The same step under ``jax.pmap``: state replicated with a leading device axis, batches
  reshaped to (devices, per-device batch, ...); key and k are broadcast."""
  return jax.pmap(step, axis_name=AXIS, in_axes=(0, 0, 0, None, None), devices=devices)


def split_for_pmap(array, devices: int):
  array = np.asarray(array)
  check_divisible(array.shape[0], devices)
  return array.reshape(devices, array.shape[0] // devices, *array.shape[1:])


def with_axis(nets, axis_name: Optional[str] = AXIS):
  """The networks' step options with BatchNorm/gradients averaged over ``axis_name`` (pmap)."""
  return dataclasses.replace(nets, axis_name=axis_name)


def stack_for_pmap(tree, devices: int):
  """A replicated tree with a leading device axis, as ``pmap`` takes it."""
  return jax.tree.map(lambda a: np.broadcast_to(np.asarray(a), (devices, *np.shape(a))), tree)
