"""CIFAR-10 through TFDS, for real and offline: a dataset prepared in TFDS's own format from the
lossless subset, read by train.py and evaluate.py with ``--data tfds:cifar10``."""

import json

import numpy as np
import pytest

from blockdrop_jax import BlockDropError, data
from conftest import akamaster_file
from test_evaluate_cli import EXPECTED_CORRECT, evaluate_in_process
from test_train import _one_line_error, run_train


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory, train_records, test_records):
  import tfds_offline
  return tfds_offline.prepare_cifar10({"train": train_records, "test": test_records},
                                      str(tmp_path_factory.mktemp("tfds")))


def test_tfds_gives_the_record_files_arrays(tfds_dir, train_records, test_records):
  """TFDS stores the examples shuffled; the loader puts them back in the record files' order."""
  import tensorflow_datasets as tfds
  stored = tfds.data_source("cifar10", split="test", data_dir=tfds_dir, download=False)
  assert [stored[i]["id"] for i in range(3)] != [b"test_00000", b"test_00001", b"test_00002"]
  for split, records in (("train", train_records), ("test", test_records)):
    dataset = data.load_dataset("tfds:cifar10", split, data_dir=tfds_dir)
    images, labels = data.read_cifar_records(records)
    assert (dataset.images.dtype, dataset.labels.dtype, dataset.num_classes) == (
        np.uint8, np.int32, 10)
    np.testing.assert_array_equal(dataset.images, images)
    np.testing.assert_array_equal(dataset.labels, labels)


def test_akamaster_resnet32_through_tfds_is_the_record_files_accuracy(tfds_dir, shared_data,
                                                                     tmp_path):
  out = tmp_path / "r32.json"
  assert evaluate_in_process("--checkpoint", akamaster_file(shared_data, 32), "--data",
                             "tfds:cifar10", "--data_dir", tfds_dir, "--json", str(out)) == 0
  assert json.loads(out.read_text())["correct"] == EXPECTED_CORRECT[32] == 928


def test_train_py_smoke_run_on_tfds_then_evaluate(tfds_dir, test_records, tmp_path):
  """Trained on tfds:cifar10, evaluated through TFDS and through the record file alike."""
  workdir = tmp_path / "run"
  proc = run_train(workdir, "--config.data.train=tfds:cifar10", "--config.data.test=tfds:cifar10",
                   f"--config.data.data_dir={tfds_dir}")
  assert proc.returncode == 0 and "Accuracy" in proc.stdout, proc.stderr
  results = []
  for source in (("--data", "tfds:cifar10", "--data_dir", tfds_dir), ("--data", test_records)):
    out = tmp_path / f"evaluated{len(results)}.json"
    assert evaluate_in_process("--checkpoint", str(workdir), *source, "--json", str(out)) == 0
    results.append(json.loads(out.read_text()))
  assert results[0]["predictions"] == results[1]["predictions"]
  assert results[0]["policies"] == results[1]["policies"]


def test_missing_or_unprepared_datasets_are_one_line(tfds_dir, tmp_path):
  _one_line_error(run_train(tmp_path / "run", "--config.data.train=tfds:cifar10",
                            f"--config.data.data_dir={tmp_path / 'nowhere'}"),
                  f"TFDS data_dir {tmp_path / 'nowhere'} does not exist; create it")
  with pytest.raises(BlockDropError, match=(
      r"tfds:cifar100 is not prepared in .*; prepare it with `tfds build cifar100 --data_dir "
      r".* --file_format array_record`")):
    data.load_dataset("tfds:cifar100", "test", data_dir=tfds_dir)
  with pytest.raises(BlockDropError, match="tfds:cifar10 has no split 'validation'; it has test, "
                                           "train"):
    data.load_dataset("tfds:cifar10", "validation", data_dir=tfds_dir)
