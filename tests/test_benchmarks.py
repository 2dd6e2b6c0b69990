"""The benchmarks run end to end at toy sizes (their numbers are not checked here)."""

import os

import numpy as np
import pytest

from conftest import load_benchmark


def test_speed_benchmark_prints_every_inference_mode(shared_data, capsys):
  speed = load_benchmark("speed")
  assert speed.main(["--nets", "cifar_resnet20", "--images", "8", "--batch-1-images", "2",
                     "--repeats", "1", "--unique-policies", "2", "--curriculum-keep",
                     "--imagenet-nets"]) == 0
  inference = [line for line in capsys.readouterr().out.splitlines()
               if line.startswith("| cifar_resnet20 | ")]
  modes = {batch: {line.split(" | ")[2].split(" (")[0] for line in inference
                   if line.split(" | ")[1] == batch} for batch in ("1", "8")}
  full = {"full", "full, masked with all kept"}
  assert modes["1"] == full | {"masked", "batch_skip", "looped", "compact"}
  assert modes["8"] == full | {"full, batches of 16, 2 in flight", "masked", "batch_skip",
                               "looped", "compact", "compact, batches of 4, 2 in flight",
                               "grouped"}
  # Speedups are over the faster way of running the full network, so that one reads 1.00.
  full_rows = [line.split(" | ") for line in inference if line.split(" | ")[2].startswith("full")]
  assert sorted(row[5] for row in full_rows if row[1] == "8")[-1] == "1.00"
  # ... and paired with itself in every repeat it is exactly 1.
  assert "1.00 (1.00-1.00)" in {row[7] for row in full_rows if row[1] == "8"}


def test_paired_ratio_is_the_median_and_quartiles_of_ratios_within_each_repeat():
  speed = load_benchmark("speed")
  full, mode = [2.0, 4.0, 6.0, 8.0, 10.0], [2.0, 2.0, 2.0, 2.0, 2.0]
  assert speed.paired_ratio(full, mode) == (2.0, 3.0, 4.0)
  # A slowdown of the machine that hits both timings of a repeat alike changes nothing, however
  # large, while the ratio of the medians moves with it.
  drift = [1.0, 3.0, 1.0, 0.5, 0.5]
  slowed_full = [t * d for t, d in zip(full, drift)]
  slowed_mode = [t * d for t, d in zip(mode, drift)]
  assert speed.paired_ratio(slowed_full, slowed_mode) == (2.0, 3.0, 4.0)
  assert np.median(slowed_full) / np.median(slowed_mode) == 2.5
  assert speed.paired_ratio([3.0], [2.0]) == (1.5, 1.5, 1.5)
  with pytest.raises(ValueError):
    speed.paired_ratio([1.0, 2.0], [1.0])


def test_speed_benchmark_refuses_a_mode_no_table_has(shared_data, capsys):
  speed = load_benchmark("speed")
  with pytest.raises(SystemExit) as exit_info:
    speed.main(["--nets", "cifar_resnet20", "--images", "8", "--modes", "batch_skip", "blockwise"])
  assert exit_info.value.code == 2
  message = capsys.readouterr().err
  assert "no table has 'blockwise'" in message and "'grouped'" in message


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, shared_data):
  """A seconds-long BlockDrop run on a ResNet-8 (pretraining, then the curriculum)."""
  from blockdrop_jax import configs, trainer
  config = configs.load("scratch_r20_subset" + ":smoke",
                        ["--config.stages=pretrain,curriculum"])
  workdir = str(tmp_path_factory.mktemp("speed") / "run")
  trainer.train(config, workdir, progress=False)
  return workdir


def test_speed_benchmark_times_a_trained_runs_policies(trained_run, capsys):
  """The run's own net under the policies its policy network picks, only the modes asked for,
  the curriculum step with its policy network, and ImageNet nets at batch 1 when asked."""
  from blockdrop_jax import data, flops, registry
  speed = load_benchmark("speed")
  assert speed.main(["--checkpoint", trained_run, "--images", "8", "--batch-1-images", "2",
                     "--repeats", "1", "--curriculum-batch", "8", "--curriculum-points", "2",
                     "--curriculum-keep", "trained", "--modes", "batch_skip",
                     "--imagenet-nets", "imagenet_resnet10", "--imagenet-images", "1"]) == 0
  lines = capsys.readouterr().out.splitlines()
  run = speed.TrainedRun(trained_run)
  images, _ = data.read_cifar_records(os.path.join(
      registry.shared_data_dir(), "cifar10", "subset", "test_batch_first1000.bin"))
  policies = run.policies(images[:8])
  table = flops.flops_table(run.nets.resnet)
  distinct = len(np.unique(policies, axis=0))
  assert any(f"{distinct} distinct vectors" in line for line in lines)
  rows = [line.split(" | ") for line in lines if line.startswith("| cifar_resnet8 | ")]
  inference = [row for row in rows if row[1] in ("1", "8")]
  assert {(row[1], row[2]) for row in inference} == {
      (batch, mode) for batch in ("1", "8") for mode in ("full", "full, masked with all kept",
                                                         "batch_skip")} | {
      ("8", "full, batches of 16, 2 in flight")}
  # The inference rows run the run's own net under the policies its policy network picks.
  skip = {row[1]: row for row in inference if row[2] == "batch_skip"}
  assert skip["8"][4] == f"{table.full / np.mean(table.under(policies)):.2f}"
  assert skip["1"][4] == f"{table.full / np.mean(table.under(policies[:2])):.2f}"
  curriculum = [row for row in rows if row[1] not in ("1", "8")]
  assert [row[1:3] for row in curriculum] == [[run.name, "masked"], [run.name, "compact"]]
  assert curriculum[0][7] == "1.00x (1.00-1.00)"  # the masked step paired with itself
  imagenet = [line.split(" | ") for line in lines if line.startswith("| imagenet_resnet10 | ")]
  assert {(row[1], row[2]) for row in imagenet} == {
      ("1", "full"), ("1", "full, masked with all kept"), ("1", "batch_skip")}


@pytest.mark.parametrize("args, message", [
    (["--checkpoint", "RUN", "--nets", "cifar_resnet20"], "leave out --nets"),
    (["--curriculum-keep", "trained"], "needs --checkpoint"),
    (["--curriculum-keep", "1.5"], "expected a keep rate in (0, 1) or 'trained'"),
    (["--checkpoint", "nowhere"], "nowhere is not a training workdir")])
def test_speed_benchmark_refuses_bad_checkpoint_or_policy_arguments(trained_run, capsys, args,
                                                                    message):
  speed = load_benchmark("speed")
  with pytest.raises(SystemExit) as exit_info:
    speed.main([trained_run if arg == "RUN" else arg for arg in args])
  assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_train_speed_benchmark_times_every_stage_beside_the_original(shared_data, capsys):
  pytest.importorskip("torch")
  train_speed = load_benchmark("train_speed")
  assert train_speed.main(["--nets", "cifar_resnet8", "--batches", "4", "--keep", "0.2",
                           "--repeats", "1"]) == 0
  rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines()
          if line.startswith("| cifar_resnet8 | ")]
  assert [(row[2], row[4]) for row in rows] == [
      ("0.2", stage) for stage in ("pretrain", "curriculum", "finetune", "compact_finetune")]
  assert all(float(row[5]) > 0 and float(row[6]) > 0 for row in rows)
  # Finetuning rows say how many blocks the policies kept: the same for both passes.
  assert rows[0][3] == "-" and rows[2][3] == rows[3][3] != "-"
