"""Shared CLI plumbing: user errors become one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

from blockdrop_jax.errors import EXIT_USAGE, BlockDropError


@contextlib.contextmanager
def user_errors():
  try:
    yield
  except BlockDropError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(EXIT_USAGE)


def write_json(path: str, obj) -> None:
  """Write atomically, so a crash never leaves half a file where a good one was."""
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


def positive_int(text: str) -> int:
  """argparse type: a whole number of at least 1 (a batch size, a count)."""
  try:
    value = int(text)
  except ValueError:
    value = 0
  if value < 1:
    raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
  return value
