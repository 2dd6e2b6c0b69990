"""Workdirs through ``storage``: a bucket scheme needs its filesystem package, named when it is
missing, and a scheme epath does not know is refused before anything is written (it would
otherwise become a local folder named ``bucket:``)."""

import os

import pytest

from blockdrop_jax import BlockDropError, configs, storage, trainer
from conftest import REPO


def test_unknown_scheme_is_refused_and_writes_nothing(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  config = configs.load(os.path.join(REPO, "configs", "scratch_r20_subset.py") + ":smoke", [])
  with pytest.raises(BlockDropError, match="bucket://run: unknown storage scheme bucket://; use a "
                                           "local path or gs://, s3://, az://"):
    trainer.train(config, "bucket://run", progress=False)
  assert os.listdir(tmp_path) == []


def test_missing_filesystem_package_is_named(monkeypatch):
  monkeypatch.setitem(storage.FILESYSTEMS, "gs", "no_such_filesystem_package")
  with pytest.raises(BlockDropError, match="gs:// paths need the no_such_filesystem_package "
                                           "package; pip install no_such_filesystem_package"):
    storage.path("gs://bucket/run")

