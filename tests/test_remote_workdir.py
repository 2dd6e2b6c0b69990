"""Workdirs through ``storage``: a bucket scheme needs its filesystem package, named when it is
missing, and a scheme orbax cannot checkpoint to or epath does not know is refused before anything
is written (it would otherwise become a local folder named ``bucket:``). A run in a bucket is
tests/test_train.py's, against its uninterrupted local run."""

import os

import pytest

from blockdrop_jax import BlockDropError, configs, storage, trainer


@pytest.mark.parametrize("workdir, error", [
    ("bucket://run", "bucket://run: unknown storage scheme bucket://; use a local path or gs://, "
                     "s3://, az://"),
    ("s3://bucket/run", "s3://bucket/run: orbax-checkpoint writes checkpoints to local folders and "
                        "gs:// only")])
def test_workdirs_that_cannot_hold_a_run_are_refused_before_any_write(workdir, error, tmp_path,
                                                                      monkeypatch):
  monkeypatch.chdir(tmp_path)
  config = configs.load("scratch_r20_subset" + ":smoke", [])
  with pytest.raises(BlockDropError, match=error):
    trainer.train(config, workdir, progress=False)
  assert os.listdir(tmp_path) == []


def test_missing_filesystem_package_is_named(monkeypatch):
  monkeypatch.setitem(storage.FILESYSTEMS, "gs", "no_such_filesystem_package")
  with pytest.raises(BlockDropError, match="gs:// paths need the no_such_filesystem_package "
                                           "package; pip install no_such_filesystem_package"):
    storage.path("gs://bucket/run")
