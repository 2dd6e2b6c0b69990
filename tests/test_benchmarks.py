"""The benchmarks run end to end at toy sizes (their numbers are not checked here)."""

import importlib.util
import os

import pytest

from conftest import REPO


def _load(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "benchmarks", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_speed_benchmark_prints_both_tables(shared_data, capsys):
  speed = _load("speed")
  assert speed.main(["--nets", "cifar_resnet20", "--images", "8", "--batch-1-images", "2",
                     "--repeats", "1", "--unique-policies", "2", "--curriculum-batch", "8",
                     "--curriculum-points", "2", "--curriculum-keep", "0.5",
                     "--imagenet-nets", "imagenet_resnet10", "--imagenet-images", "1"]) == 0
  lines = capsys.readouterr().out.splitlines()
  inference = [line for line in lines if line.startswith("| cifar_resnet20 | ")
               and "bias logit" not in line]
  modes = {line.split(" | ")[2].split(" (")[0] for line in inference}
  assert modes >= {"full", "full, masked with all kept", "full, batches of 16, 2 in flight",
                   "masked", "batch_skip", "looped", "compact",
                   "compact, batches of 4, 2 in flight", "blockwise",
                   "grouped, looped inside, 2 in flight", "grouped, looped inside, 1 in flight",
                   "grouped, batch_skip inside, 2 in flight", "grouped, blockwise inside"}
  # Speedups are over the faster way of running the full network, so that one reads 1.00.
  full_rows = [line.split(" | ") for line in inference if line.split(" | ")[2].startswith("full")]
  assert sorted(row[5] for row in full_rows if row[1] == "8")[-1] == "1.00"
  imagenet = [line.split(" | ") for line in lines if line.startswith("| imagenet_resnet10 | ")]
  assert {row[1] for row in imagenet} == {"1"} and "batch_skip" in {row[2] for row in imagenet}
  curriculum = [line for line in lines if "bias logit(0.5)" in line]
  assert [line.split(" | ")[2] for line in curriculum] == ["masked", "compact"]


def test_speed_benchmark_times_only_the_modes_asked_for(shared_data, capsys):
  speed = _load("speed")
  assert speed.main(["--nets", "cifar_resnet20", "--images", "8", "--batch-1-images", "2",
                     "--repeats", "1", "--unique-policies", "2", "--curriculum-keep",
                     "--imagenet-nets", "--modes", "batch_skip",
                     "grouped, looped inside, 2 in flight"]) == 0
  rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines()
          if line.startswith("| cifar_resnet20 | ")]
  modes = {batch: {row[2].split(" (")[0] for row in rows if row[1] == batch} for batch in ("1", "8")}
  assert modes["1"] == {"full", "full, masked with all kept", "batch_skip"}
  assert modes["8"] == {"full", "full, masked with all kept", "full, batches of 16, 2 in flight",
                        "batch_skip", "grouped, looped inside, 2 in flight"}


def test_speed_benchmark_refuses_a_mode_no_table_has(shared_data, capsys):
  speed = _load("speed")
  with pytest.raises(SystemExit) as exit_info:
    speed.main(["--nets", "cifar_resnet20", "--images", "8", "--modes", "batch_skip", "grouped"])
  assert exit_info.value.code == 2
  message = capsys.readouterr().err
  assert "no table has 'grouped'" in message and "'grouped, looped inside, 2 in flight'" in message


def test_train_steps_benchmark_times_every_stage(shared_data, capsys):
  train_steps = _load("train_steps")
  assert train_steps.main(["--nets", "cifar_resnet8", "--batch", "4", "--repeats", "1"]) == 0
  rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines()
          if line.startswith("| cifar_resnet8 | ")]
  assert [row[1] for row in rows] == ["pretrain", "curriculum, compact passes, k = K",
                                      "curriculum, masked passes, k = K", "finetune"]
  assert all(float(row[2]) > 0 for row in rows)
