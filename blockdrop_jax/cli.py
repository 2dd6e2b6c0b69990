"""Shared CLI plumbing (absl): a user error is one line on stderr and exit code 2."""

from __future__ import annotations

import json
import os
import sys
from typing import Callable, Sequence

from absl import app, flags, logging

from blockdrop_jax import configs, multihost
from blockdrop_jax.errors import EXIT_USAGE, BlockDropError

# Joining a multi-process run (multihost.py), common to both commands; the defaults come from the
# environment variables that ``python -m blockdrop_jax.launch`` sets.
_ENV = multihost.ENVIRONMENT
COORDINATOR = flags.DEFINE_string(
    "coordinator_address", os.environ.get(_ENV["coordinator_address"], ""),
    f"multi-process: host:port of process 0's coordinator (default ${_ENV['coordinator_address']})")
NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", os.environ.get(_ENV["num_processes"], "0"),
    f"multi-process: how many processes join (default ${_ENV['num_processes']})")
PROCESS_ID = flags.DEFINE_integer(
    "process_id", os.environ.get(_ENV["process_id"], "-1"),
    f"multi-process: this process's id, 0 on the coordinator's host (default ${_ENV['process_id']})")
DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "multi-process: let jax detect the cluster and this process's place in "
    "it (Cloud TPU, SLURM, Open MPI, Kubernetes)")
COORDINATOR_TIMEOUT = flags.DEFINE_integer(
    "coordinator_timeout", multihost.Launch.timeout_s,
    "multi-process: seconds to reach the coordinator and for all processes to join")


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(EXIT_USAGE)


def _parse(argv: Sequence[str]) -> list[str]:
  try:
    remaining = configs.parse_flags(flags.FLAGS, argv)
  except BlockDropError as e:
    _fail(str(e))
  if not flags.FLAGS["verbosity"].present:  # absl would log JAX's and Orbax's INFO lines
    logging.set_verbosity(logging.WARNING)
  return remaining


def guarded(main: Callable[[list[str]], int]) -> Callable[[list[str]], int]:
  """``main`` after joining the other processes (if any), with a ``BlockDropError`` as one line
  and exit code 2, and a preemption as one line and ``multihost.PREEMPTED_EXIT_CODE``."""

  def run_main(argv):
    try:
      multihost.initialize(multihost.Launch(COORDINATOR.value, NUM_PROCESSES.value,
                                            PROCESS_ID.value, DISTRIBUTED.value,
                                            COORDINATOR_TIMEOUT.value))
      return main(argv)
    except BlockDropError as e:
      _fail(str(e))
    except multihost.Preempted as e:
      print(str(e), file=sys.stderr)
      sys.exit(multihost.PREEMPTED_EXIT_CODE)

  return run_main


def run(main: Callable[[list[str]], int]) -> None:
  """``absl.app.run(main)``: flag errors and ``BlockDropError`` become one line and exit 2."""
  app.run(guarded(main), flags_parser=_parse)


def no_positional_arguments(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise BlockDropError(f"unexpected arguments {' '.join(argv[1:])}; options look like "
                         "--name=value (see --help)")


def write_json(path: str, obj) -> None:
  """Write atomically, so a crash never leaves half a file where a good one was."""
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)
