"""Shared CLI plumbing (absl): a user error is one line on stderr and exit code 2."""

from __future__ import annotations

import json
import os
import sys
from typing import Callable, Sequence

from absl import app, flags, logging

from blockdrop_jax import configs
from blockdrop_jax.errors import EXIT_USAGE, BlockDropError


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
  """``main`` with a ``BlockDropError`` as one line and exit code 2."""

  def run_main(argv):
    try:
      return main(argv)
    except BlockDropError as e:
      _fail(str(e))

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
