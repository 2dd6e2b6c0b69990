"""train.py refuses bad input with one clear message and loses nothing (separate from
test_train.py so that the two files run in parallel workers)."""

import os
import threading

import pytest

from test_train import SMOKE, _one_line_error, run_train


def _config_error(*overrides):
  """The message train.py would print, checked in-process (the CLI path is tested below)."""
  from blockdrop_jax import configs, run_checks
  from blockdrop_jax.errors import BlockDropError
  with pytest.raises(BlockDropError) as err:
    config = configs.load(SMOKE, list(overrides))
    run_checks.validate(config)
    run_checks.validate(config, n_train=config.data.train_limit, n_devices=1)
  return str(err.value)


def test_unknown_config_key(shared_data):
  assert "unknown config key config.finetune.pneality" in _config_error("--config.finetune.pneality=-5")


def test_positive_penalty_is_refused(shared_data):
  assert "must be negative" in _config_error("--config.finetune.penalty=5")


def test_block_budget_must_be_a_fraction(shared_data):
  assert "config.block_budget: fraction (24.0) must be in [0, 1)" in _config_error(
      "--config.block_budget.fraction=24")


@pytest.mark.parametrize("overrides, message", [
    (("--config.stages=finetune", "--config.init_from=run", "--config.finetune.distill_weight=2"),
     "distill_weight (2.0) must be in [0, 1]"),
    (("--config.stages=finetune", "--config.init_from=run", "--config.finetune.static=true",
      "--config.block_budget.fraction=0.5"), "set config.block_budget.fraction and "
     "config.data.validation"),
    (("--config.finetune.distill_weight=0.5",), "start from a trained ResNet: pretrain in one run"),
])
def test_switches_beyond_the_original_say_what_they_need(shared_data, overrides, message):
  assert message in _config_error(*overrides)


def test_validation_split_must_leave_training_images(tmp_path, shared_data):
  _one_line_error(run_train(tmp_path, "--config.data.validation=48"),
                  "config.data.validation = 48 must be between 0 and the 48 training images")


def test_batch_larger_than_data(shared_data):
  assert "larger than the 48 training images" in _config_error("--config.curriculum.batch_size=128")


def test_checkpoint_cadence_must_be_positive(shared_data):
  assert "config.checkpoint_every_epochs = 0 must be a positive" in _config_error(
      "--config.checkpoint_every_epochs=0")


def test_missing_base_checkpoint_from_the_command_line(tmp_path, shared_data):
  _one_line_error(run_train(tmp_path, "--config.base.checkpoint=/nope/resnet.th"),
                  "base checkpoint not found: /nope/resnet.th")


# A learning rate that makes the loss NaN within the first pretraining steps.
NAN_OVERRIDES = ("--config.stages=pretrain", "--config.pretrain.lr=1e30")


def test_nan_stops_without_saving_it_and_closes_the_logs(tmp_path, shared_data):
  """The loss is NaN from the first fetch on (step 1): no checkpoint is written. A TensorBoard
  writer left open until interpreter exit printed a traceback under the error message on Python
  3.12, where threads can no longer start at exit."""
  from blockdrop_jax import configs, trainer
  from blockdrop_jax.errors import BlockDropError
  config = configs.load(SMOKE, list(NAN_OVERRIDES))
  before = set(threading.enumerate())
  with pytest.raises(BlockDropError, match="NaN"):
    trainer.train(config, str(tmp_path), progress=False)
  started = [t for t in threading.enumerate() if t not in before and t.is_alive()]
  # tqdm's monitor is one thread per process, started by the first progress bar.
  assert [t for t in started if t.name != "tqdm_monitor"] == []
  assert not [d for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()]


def test_metrics_come_to_the_host_in_windows_and_a_nan_in_one_is_found():
  """The trainer keeps steps in flight: their metrics are summed on the device and fetched every
  config.log_every_steps steps (and before any checkpoint), where a NaN loss stops the run."""
  import jax.numpy as jnp
  from blockdrop_jax import run_log
  from blockdrop_jax.errors import BlockDropError
  pending = run_log.PendingMetrics({"loss": 1.0})
  for loss in (1.0, 2.0, 3.0):
    pending.add({"loss": jnp.float32(loss), "accuracy": jnp.float32(0.5)})
  assert pending.fetch("here") == {"loss": 2.0, "accuracy": 0.5}
  assert pending.sums == {"loss": 7.0, "accuracy": 1.5}
  for loss in (1.0, float("nan"), 2.0):
    pending.add({"loss": jnp.float32(loss), "accuracy": jnp.float32(0.5)})
  with pytest.raises(BlockDropError, match="NaN/Inf in epoch 2, by step 9"):
    pending.fetch("epoch 2, by step 9")
