"""Workdirs through ``storage``: a run in a bucket equals the local run (an offline Cloud Storage
server), a bucket scheme needs its filesystem package, named when it is missing, and a scheme orbax
cannot checkpoint to or epath does not know is refused before anything is written (it would
otherwise become a local folder named ``bucket:``)."""

import json
import os
import subprocess

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


def test_a_run_in_a_bucket_equals_the_local_run(test_records, tmp_path, monkeypatch):
  """train.py and evaluate.py with ``--workdir gs://bucket/run`` against an offline Cloud Storage
  server: checkpoints, metrics, TensorBoard and the report land in the bucket, the run is the
  local run value for value, evaluate.py reads it back, and nothing local is named after it."""
  import gcs_emulator
  import jax
  import numpy as np
  from etils import epath
  from test_evaluate_cli import evaluate_in_process
  from test_train import ENV, _final, train_cmd

  with gcs_emulator.serving("bucket") as bucket_env:
    for name, value in bucket_env.items():
      monkeypatch.setenv(name, value)
    runs = {"local": str(tmp_path / "local"), "bucket": "gs://bucket/run"}
    for name, workdir in runs.items():
      report = ("--report",) if name == "bucket" else ()
      proc = subprocess.run(train_cmd(workdir, *report), cwd=tmp_path, capture_output=True,
                            text=True, timeout=600, env=dict(ENV, **bucket_env))
      assert proc.returncode == 0, proc.stderr
    assert os.listdir(tmp_path) == ["local"]
    local, bucket = _final(runs["local"]), _final(runs["bucket"])
    jax.tree.map(np.testing.assert_array_equal, bucket[:2], local[:2])
    assert bucket[2:] == local[2:]
    assert list(epath.Path("gs://bucket/run/tensorboard").glob("events.out.tfevents.*"))
    assert "Accuracy" in epath.Path("gs://bucket/run/report/report.md").read_text()
    evaluated = {}
    for name, workdir in runs.items():
      out = tmp_path / f"{name}.json"
      assert evaluate_in_process("--checkpoint", workdir, "--data", test_records,
                                 "--json", str(out)) == 0
      evaluated[name] = json.loads(out.read_text())
  assert evaluated["bucket"]["predictions"] == evaluated["local"]["predictions"]
  assert evaluated["bucket"]["policies"] == evaluated["local"]["policies"]
