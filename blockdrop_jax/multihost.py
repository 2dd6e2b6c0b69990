"""One run over several processes (one per host): joining them, the work that process 0 does for
all, and preemption.

Processes join through ``jax.distributed``: detected on Cloud TPU, SLURM, Open MPI and
Kubernetes (``--distributed``), or given explicitly (``--coordinator_address``,
``--num_processes``, ``--process_id``, or the ``BLOCKDROP_*`` environment variables of
``ENVIRONMENT``), with CPU collectives through gloo. ``python -m blockdrop_jax.launch`` starts
several processes on one machine this way.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import threading
import time
import uuid
from typing import Callable, TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils

from blockdrop_jax.errors import BlockDropError

T = TypeVar("T")

# The environment variables of an explicit launch, as ``launch`` sets them.
ENVIRONMENT = {"coordinator_address": "BLOCKDROP_COORDINATOR_ADDRESS",
               "num_processes": "BLOCKDROP_NUM_PROCESSES", "process_id": "BLOCKDROP_PROCESS_ID"}

# The exit code of a run that saved a checkpoint and stopped on SIGTERM (128 + SIGTERM, what a
# shell reports for a process that SIGTERM ended): running the same command again resumes it.
PREEMPTED_EXIT_CODE = 143


@dataclasses.dataclass(frozen=True)
class Launch:
  """How this process joins the others; the default is a single process."""

  coordinator_address: str = ""  # host:port of process 0
  num_processes: int = 0
  process_id: int = -1
  detect: bool = False  # let jax find the cluster (Cloud TPU, SLURM, Open MPI, Kubernetes)
  timeout_s: int = 120  # to reach the coordinator and for every process to join


def initialize(launch: Launch) -> None:
  """``jax.distributed.initialize`` for a multi-process ``launch``; must come before any other
  JAX call. An unreachable coordinator or a bad process id is one ``BlockDropError`` within
  ``launch.timeout_s``: jax itself aborts the process with a stack trace instead."""
  if not (launch.detect or launch.coordinator_address):
    return
  # CPU collectives between processes; GPUs and TPUs use their own.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if launch.coordinator_address:
    if not 0 <= launch.process_id < launch.num_processes:
      raise BlockDropError(
          f"process id {launch.process_id} is not in [0, {launch.num_processes}): give each of "
          f"the --num_processes processes its own --process_id (or "
          f"{ENVIRONMENT['process_id']}), 0 for the coordinator's host")
    if launch.process_id == 0:
      _check_port_free(launch.coordinator_address)
    else:
      _wait_until_reachable(launch.coordinator_address, launch.timeout_s)
  try:
    jax.distributed.initialize(launch.coordinator_address or None, launch.num_processes or None,
                               launch.process_id if launch.process_id >= 0 else None,
                               initialization_timeout=launch.timeout_s)
  except (ValueError, RuntimeError) as e:
    raise BlockDropError(f"jax.distributed could not start ({str(e).splitlines()[0][:200]}); "
                         "outside a detected cluster give --coordinator_address, --num_processes "
                         "and --process_id") from e


def _split_address(address: str) -> tuple[str, int]:
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit():
    raise BlockDropError(f"coordinator address {address!r} is not host:port (e.g. "
                         "10.0.0.2:8476)")
  return host, int(port)


def _check_port_free(address: str) -> None:
  host, port = _split_address(address)
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    try:
      s.bind(("", port))
    except OSError as e:
      raise BlockDropError(f"process 0 cannot serve the coordinator on port {port} ({e.strerror});"
                           " pick a free port in --coordinator_address") from e


def _wait_until_reachable(address: str, timeout_s: float) -> None:
  """Process 0 may start later than the others: retry until ``timeout_s``."""
  host, port = _split_address(address)
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host, port), timeout=min(5.0, timeout_s)):
        return
    except OSError as e:
      if time.monotonic() > deadline:
        raise BlockDropError(
            f"the coordinator {address} did not answer within {timeout_s:g} s ({e.strerror or e});"
            " start process 0 there, or fix --coordinator_address") from e
      time.sleep(0.5)


def is_chief() -> bool:
  """Process 0 prints, shows progress and writes logs, figures and reports."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Every process waits here until all have arrived (a no-op for one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def process_0_first(name: str, fn: Callable[[], T]) -> T:
  """``fn()`` on process 0, then on the others: downloads, cache extraction and dataset
  preparation happen once where the hosts share a disk, and each host's own otherwise."""
  if is_chief():
    try:
      return fn()
    finally:  # also on an error, which the others then meet themselves instead of waiting
      barrier(name)
  barrier(name)
  return fn()


def all_agree(ok: bool) -> bool:
  """Whether ``ok`` holds on every process."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def check_shared(workdir) -> None:
  """Orbax saves each array from the host that holds it into one checkpoint: every process must
  see what process 0 writes into ``workdir`` (a shared filesystem or a bucket)."""
  if jax.process_count() == 1:
    return
  token = multihost_utils.broadcast_one_to_all(
      np.frombuffer(uuid.uuid4().bytes, np.uint8)).tobytes().hex()
  marker = workdir / f".shared-{token}"
  if is_chief():
    marker.write_text(token)
  barrier("workdir marker written")
  seen = marker.exists() and marker.read_text() == token
  everywhere = all_agree(seen)
  barrier("workdir marker read")
  if is_chief():
    marker.unlink()
  if not everywhere:
    raise BlockDropError(
        f"{os.fspath(workdir)} is not shared: {'this process' if not seen else 'another process'}"
        " cannot see what process 0 writes there; use a shared filesystem or a bucket (gs://...)"
        " for --workdir")


class Preemption:
  """Whether to stop for a preemption (SIGTERM) at a step: every process agrees on the same one.

  Several processes use jax's preemption sync (its notifier catches SIGTERM); a single process
  catches SIGTERM itself. Used as a context: the signal's previous handler comes back after."""

  def __init__(self):
    self.signalled = False
    self._previous = None

  def __enter__(self) -> "Preemption":
    # Python lets only the main thread set handlers: elsewhere (a notebook's worker thread)
    # SIGTERM keeps its default and ends the run.
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
    return self

  def _on_sigterm(self, signum, frame) -> None:
    self.signalled = True

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def reached(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self.signalled
    import orbax.checkpoint as ocp
    return ocp.multihost.reached_preemption(step)


class Preempted(Exception):
  """The run saved ``step`` and stopped on a preemption; the same command resumes it."""

  def __init__(self, step: int, workdir: str):
    super().__init__(f"preempted (SIGTERM): saved step {step} in {workdir}; run the same command "
                     "again to resume from it")
    self.step = step

