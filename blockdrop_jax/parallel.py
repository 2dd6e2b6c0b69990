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


def data_mesh(devices=None) -> Mesh:
  return Mesh(np.asarray(devices if devices is not None else jax.devices()), (AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(AXIS))


def check_divisible(batch: int, devices: int, what: str = "batch size") -> None:
  """A batch must split into equal, non-empty parts over the devices."""
  if batch < 1 or batch % devices:
    processes = f" of {jax.process_count()} processes" if jax.process_count() > 1 else ""
    raise BlockDropError(f"{what} = {batch} does not split over {devices} devices{processes}; "
                         f"use a multiple of {devices}")


def replicate(tree, mesh: Mesh):
  return jax.device_put(tree, replicated(mesh))


def process_rows(mesh: Mesh, size: int) -> np.ndarray:
  """The rows of a global batch of ``size`` that this process loads, ascending: those the batch
  sharding places on its devices, read from the sharding's own device-to-index map (one block
  per process only where the mesh lists each process's devices together)."""
  index_map = batch_sharded(mesh).addressable_devices_indices_map((size,))
  return np.unique(np.concatenate([np.arange(size)[index[0]] for index in index_map.values()]))


def global_batch(mesh: Mesh, size: int, *local_arrays):
  """Global arrays of ``size`` rows sharded over the mesh, from this process's rows of each
  (``process_rows``, in that order)."""
  sharding, rows = batch_sharded(mesh), process_rows(mesh, size)

  def assemble(local):
    local = np.asarray(local)
    return jax.make_array_from_callback(
        (size, *local.shape[1:]), sharding,
        lambda index: local[np.searchsorted(rows, np.arange(size)[index[0]])])

  return tuple(assemble(a) for a in local_arrays)


def sharded_step(step: Callable, mesh: Mesh, donate: bool = True,
                 replicated_args: int = 2) -> Callable:
  """``step(state, images, labels, ...) -> (state, metrics)`` jitted over the mesh: the batch
  split, the state and the ``replicated_args`` arguments after the labels (key, k and any
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


def with_axis(options, axis_name: Optional[str] = AXIS):
  """``steps.StepOptions`` with BatchNorm, gradients and metrics averaged over ``axis_name``
  (pmap)."""
  return dataclasses.replace(options, axis_name=axis_name)


def stack_for_pmap(tree, devices: int):
  """A replicated tree with a leading device axis, as ``pmap`` takes it."""
  return jax.tree.map(lambda a: np.broadcast_to(np.asarray(a), (devices, *np.shape(a))), tree)
