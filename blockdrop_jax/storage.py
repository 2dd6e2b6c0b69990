"""Workdirs and reports in a local folder or a bucket, as on a TPU pod: workdirs in
``gs://bucket/run`` (where orbax writes checkpoints), reports also in ``s3://`` and ``az://``.
Every read and write of a run goes through ``path()`` (``etils.epath``); orbax writes the
checkpoints through the same paths (tensorstore's own drivers), TensorBoard through
tensorboardX's."""

from __future__ import annotations

import importlib.util
import os

from etils import epath

from blockdrop_jax.errors import BlockDropError

# Remote schemes -> the fsspec package epath reads and writes them with.
FILESYSTEMS = {"gs": "gcsfs", "s3": "s3fs", "az": "adlfs"}
# The remote schemes orbax-checkpoint writes checkpoints to (its tensorstore specs know gs://
# besides local folders); a workdir in another would fail at its first checkpoint.
CHECKPOINT_SCHEMES = ("gs",)

# epath would use TensorFlow's gfile where TensorFlow is installed (decided once, at the first path
# the process makes, local ones included); gfile no longer knows s3://, and the packages named above
# are what is checked, so fsspec serves every scheme.
os.environ.setdefault("EPATH_USE_TF", "false")


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
  return epath.Path(location)


def workdir(location) -> epath.Path:
  """``path(location)`` for a run's folder, which holds checkpoints: refused up front where orbax
  cannot write them."""
  scheme = os.fspath(location).split("://", 1)[0]
  if is_remote(location) and scheme in FILESYSTEMS and scheme not in CHECKPOINT_SCHEMES:
    raise BlockDropError(f"{location}: orbax-checkpoint writes checkpoints to local folders and "
                         f"{', '.join(f'{s}://' for s in CHECKPOINT_SCHEMES)} only; use one of "
                         "those (or a mounted bucket) as the workdir")
  return path(location)
