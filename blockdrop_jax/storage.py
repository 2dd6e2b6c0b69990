"""Workdirs and reports anywhere ``etils.epath`` reaches: a local folder, or a bucket
(``gs://bucket/run``, ``s3://``, ``az://``) as on a TPU pod. Every read and write of a run goes
through ``path()``; orbax writes the checkpoints through the same paths (tensorstore's own
drivers), TensorBoard through tensorboardX's."""

from __future__ import annotations

import importlib.util
import os

from etils import epath

from blockdrop_jax.errors import BlockDropError

# Remote schemes -> the fsspec package epath reads and writes them with.
FILESYSTEMS = {"gs": "gcsfs", "s3": "s3fs", "az": "adlfs"}


def is_remote(location: str) -> bool:
  return "://" in os.fspath(location)


def path(location) -> epath.Path:
  """``location`` as an ``epath.Path``: local ones absolute, remote ones checked for their
  filesystem package. A scheme epath does not know is refused rather than written as a local
  folder named after it (``gs:``)."""
  location = os.fspath(location)
  if not is_remote(location):
    return epath.Path(os.path.abspath(location))
  scheme = location.split("://", 1)[0]
  if scheme not in FILESYSTEMS:
    raise BlockDropError(f"{location}: unknown storage scheme {scheme}://; use a local path or "
                         f"{', '.join(f'{s}://' for s in FILESYSTEMS)}")
  if importlib.util.find_spec(FILESYSTEMS[scheme]) is None:
    raise BlockDropError(f"{location}: {scheme}:// paths need the {FILESYSTEMS[scheme]} package; "
                         f"pip install {FILESYSTEMS[scheme]}")
  # epath would use TensorFlow's gfile where TensorFlow is installed; it no longer knows s3://,
  # and the packages named above are what is checked, so fsspec serves every scheme.
  os.environ.setdefault("EPATH_USE_TF", "false")
  return epath.Path(location)
