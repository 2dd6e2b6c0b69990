"""Pretrained weights and datasets by name, checked against their sha256 before use.

Resolution order for a name: a file or folder the user gives; the offline data folder
(``$BLOCKDROP_SHARED_DATA``, default ``../shared/data``); the cache (``$BLOCKDROP_CACHE``, default
``~/.cache/blockdrop_jax``); then a download into the cache. Downloads go to a temporary file that
is renamed into the cache only once complete and verified, so a failed or partial download never
leaves anything the next run would trust.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from typing import Optional

from blockdrop_jax.errors import BlockDropError

CACHE_ENV = "BLOCKDROP_CACHE"
SHARED_DATA_ENV = "BLOCKDROP_SHARED_DATA"


def shared_data_dir() -> str:
  """The offline data folder: $BLOCKDROP_SHARED_DATA, default ``../shared/data`` beside the repo."""
  default = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..",
                         "shared", "data")
  return os.path.abspath(os.environ.get(SHARED_DATA_ENV, default))


_AKAMASTER = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models"


@dataclasses.dataclass(frozen=True)
class Artifact:
  filename: str
  url: str
  sha256: str  # the whole digest, or its first hex digits where only those are published
  shared_path: str  # where the offline data folder keeps it, relative to that folder
  extract: bool = False  # a .tar.gz archive unpacked into a folder of the cache


WEIGHTS = {
    f"akamaster/resnet{depth}": Artifact(
        f"resnet{depth}-{sha[:8]}.th", f"{_AKAMASTER}/resnet{depth}-{sha[:8]}.th", sha,
        f"pretrained/akamaster_cifar10/resnet{depth}-{sha[:8]}.th")
    for depth, sha in (
        (20, "12fca82f0bebc4135bf1f32f6e3710e61d5108578464b84fd6d7f5c1b04036c8"),
        (32, "d509ac1820d7f25398913559d7e81a13229b1e7adc5648e3bfa5e22dc137f850"),
        (44, "014dd6541728a1c700b1642ab640e211dc6eb8ed507d70697458dc8f8a0ae2e4"),
        (56, "4bfd97631478d6b638d2764fd2baff3edb1d7d82252d54439343b6596b9b5367"))
}

# The ImageNet ResNet-18 whose layers start the original's ImageNet policy network: torchvision's
# IMAGENET1K_V1 weights (torchvision publishes the first 8 hex digits of their sha256).
WEIGHTS["torchvision/resnet18"] = Artifact(
    "resnet18-f37072fd.pth", "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "f37072fd", "pretrained/torchvision/resnet18-f37072fd.pth")

# The official binary archives (what TFDS's cifar10/cifar100 builders download and read).
DATASETS = {
    "cifar10": Artifact("cifar-10-binary.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
                        "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd",
                        "cifar10/cifar-10-batches-bin", extract=True),
    "cifar100": Artifact("cifar-100-binary.tar.gz",
                         "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
                         "58a81ae192c23a4be8b1804d68e518ed807d710a4eb253b1f2a199162a40d8ec",
                         "cifar100/cifar-100-binary", extract=True),
}


def cache_dir() -> str:
  return os.environ.get(CACHE_ENV, os.path.join(os.path.expanduser("~"), ".cache", "blockdrop_jax"))


def sha256_of(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def _verified(path: str, artifact: Artifact, where: str) -> str:
  actual = sha256_of(path)
  if not actual.startswith(artifact.sha256):  # a prefix where only that is published
    raise BlockDropError(
        f"{path} ({where}) has sha256 {actual[:16]}..., expected {artifact.sha256[:16]}... for "
        f"{artifact.filename}: the file is damaged or a different version. Delete it, or download "
        f"{artifact.url} by hand into {cache_dir()}")
  return path


def resolve_weights(name_or_path: str, url: Optional[str] = None) -> str:
  """A local path to the weights ``name_or_path`` (a path, or a name of ``WEIGHTS``)."""
  if os.path.isfile(name_or_path):
    return name_or_path
  if name_or_path not in WEIGHTS:
    raise BlockDropError(f"unknown weights {name_or_path!r}: not a file, nor a known name "
                         f"({', '.join(WEIGHTS)})")
  return fetch(WEIGHTS[name_or_path], url)


def resolve_dataset(name: str, url: Optional[str] = None) -> str:
  """A local folder holding the official binary batches of ``name`` (cifar10, cifar100)."""
  if name not in DATASETS:
    raise BlockDropError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
  return fetch(DATASETS[name], url)


def fetch(artifact: Artifact, url: Optional[str] = None) -> str:
  """The local path of ``artifact``: offline data folder, cache, else downloaded (from ``url``
  if given, e.g. a mirror) into the cache and verified."""
  shared = os.path.join(shared_data_dir(), artifact.shared_path)
  if os.path.exists(shared):
    return shared if artifact.extract else _verified(shared, artifact, "offline data folder")
  cached = os.path.join(cache_dir(), artifact.filename)
  unpacked = cached[:-len(".tar.gz")] if artifact.extract else cached
  if os.path.exists(unpacked):
    return unpacked if artifact.extract else _verified(cached, artifact, "cache")
  _download(url or artifact.url, cached, artifact)
  if artifact.extract:
    _extract(cached, unpacked)
  return unpacked


def _download(url: str, destination: str, artifact: Artifact) -> None:
  os.makedirs(os.path.dirname(destination), exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".partial-", dir=os.path.dirname(destination))
  try:
    with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
      shutil.copyfileobj(response, out)
    _verified(tmp, artifact, f"downloaded from {url}")
    os.replace(tmp, destination)
  except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
    raise BlockDropError(
        f"could not download {artifact.filename} from {url} ({e}); put the file there by hand: "
        f"{destination} (sha256 {artifact.sha256})") from e
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _extract(archive: str, folder: str) -> None:
  """Unpacks the archive's one top folder as ``folder``, atomically (temporary folder + rename)."""
  tmp = tempfile.mkdtemp(prefix=".partial-", dir=os.path.dirname(folder))
  try:
    with tarfile.open(archive) as tar:
      tar.extractall(tmp, filter="data")
    (top,) = os.listdir(tmp)
    os.replace(os.path.join(tmp, top), folder)
  except (tarfile.TarError, ValueError) as e:
    raise BlockDropError(f"{archive} is not a CIFAR archive with one top folder ({e})") from e
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
