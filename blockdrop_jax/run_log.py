"""A run's metrics: summed on the device between fetches, logged per epoch as JSON lines and
TensorBoard events, and summarised in one line per epoch and a final report."""

from __future__ import annotations

import json
import math
import os
import sys

import jax
import jax.numpy as jnp

from blockdrop_jax import evaluation, storage
from blockdrop_jax.errors import BlockDropError

# compilation in a stage's first epoch), so comparisons of runs leave them out.
TIMING_METRICS = ("train_seconds", "train_images_per_s")


def epoch_throughput(seconds: float, steps: int, batch_size: int) -> dict:
  """The training steps' wall-clock time in an epoch (data loading and compilation included,
  evaluation and checkpoint saves not) and the global images per second it gives."""
  return {"train_seconds": seconds, "train_images_per_s": steps * batch_size / seconds}


def epoch_summary(record: dict) -> str:
  parts = [f"{record['stage']} epoch {record['epoch']}"]
  for key, value in record.items():
    if (key.startswith(("train_", "val_", "test_")) and isinstance(value, float)
        and not key.startswith("train_keep_probability_")):  # per block: in the report's figure
      parts.append(f"{key}={value:.4g}")
  return " ".join(parts)


def final_summary(metrics: dict, workdir: str) -> str:
  """The original test report of the last evaluation and where the outputs went."""
  lines = [f"Finished {metrics.get('stage', '?')} epoch {metrics.get('epoch', '?')}"]
  if "test_blocks_mean" in metrics:
    lines.append(evaluation.format_report({
        "accuracy": metrics["test_accuracy"], "blocks_mean": metrics["test_blocks_mean"],
        "blocks_std": metrics["test_blocks_std"], "flops_mean": metrics["test_flops_mean"],
        "flops_std": metrics.get("test_flops_std", 0.0),
        "unique_policies": metrics["test_unique_policies"]}))
    if "flops_full" in metrics:
      share = metrics["test_flops_mean"] / metrics["flops_full"]
      lines.append(f"FLOPs: {100 * share:.1f}% of the full ResNet's {metrics['flops_full']:.2E} "
                   f"per image, policy network included: {100 * (1 - share):.1f}% saved")
  elif "test_accuracy" in metrics:
    lines.append(f"Accuracy: {metrics['test_accuracy']:.3f}")
  lines.append(f"Checkpoints: {os.path.join(workdir, 'checkpoints')} (the last few and the best; "
               f"evaluate.py --best); metrics: {os.path.join(workdir, 'metrics.jsonl')}; "
               f"TensorBoard: {os.path.join(workdir, 'tensorboard')}")
  return "\n".join(lines)


def _summary_writer_class():
  """tensorboardX's SummaryWriter, imported without the PyTorch that tensorboardX imports where it
  is installed (to accept torch tensors; the writer gets Python numbers here): a second of every
  run's start-up. PyTorch imported before stays as it is."""
  if "torch" in sys.modules:
    from tensorboardX import SummaryWriter
    return SummaryWriter
  sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX allows
  try:
    from tensorboardX import SummaryWriter
  finally:
    del sys.modules["torch"]
  return SummaryWriter


class MetricsLog:
  """Per-epoch metrics as JSON lines and TensorBoard events; resumed runs drop lines past the
  restored step, so each epoch is logged once."""

  def __init__(self, workdir: str, resume_step: int):
    run = storage.path(workdir)
    self.path = run / "metrics.jsonl"
    self.lines = []
    if self.path.exists():
      self.lines = [line + "\n" for line in self.path.read_text().splitlines()
                    if json.loads(line)["step"] <= resume_step]
      self.path.write_text("".join(self.lines))
    self.writer = _summary_writer_class()(os.fspath(run / "tensorboard"))

  def write(self, record: dict) -> None:
    self.lines.append(json.dumps(record) + "\n")
    if storage.is_remote(self.path):  # a bucket object cannot be appended to: write it whole
      self.path.write_text("".join(self.lines))
    else:
      with self.path.open("a") as f:
        f.write(self.lines[-1])
    for key, value in record.items():
      if isinstance(value, (int, float)) and key not in ("step", "epoch"):
        self.writer.add_scalar(f"{record['stage']}/{key}", value, record["step"])
    self.writer.flush()

  def close(self) -> None:
    self.writer.close()

class PendingMetrics:
  """The training metrics of steps not yet brought to the host: summed on the device and fetched
  every ``config.log_every_steps`` steps, before each checkpoint and at the end of each epoch, so
  that the host never waits for a step it has just dispatched. A NaN or Inf loss in any step is
  found at the next fetch, before anything is saved."""

  def __init__(self, sums: dict):
    self.sums = dict(sums)  # host sums (float64) of the epoch's fetched steps
    self._window, self._steps = None, 0

  def add(self, metrics) -> None:
    self._window = metrics if self._window is None else jax.tree.map(jnp.add, self._window, metrics)
    self._steps += 1

  def fetch(self, where: str) -> dict:
    """The mean of each metric over the steps since the last fetch (their sums join ``sums``)."""
    window = jax.device_get(self._window)
    if not math.isfinite(float(window["loss"])):
      raise BlockDropError(
          f"loss became NaN/Inf in {where}: stopped without saving this state; lower the "
          "learning rate (the last good checkpoint is kept)")
    for name, value in window.items():
      self.sums[name] = self.sums.get(name, 0.0) + float(value)
    means = {name: float(value) / self._steps for name, value in window.items()}
    self._window, self._steps = None, 0
    return means




class StepTrace:
  """``config.profile_steps`` training steps traced with ``jax.profiler`` into
  WORKDIR/tensorboard (TensorBoard's profile tab), from ``first_step`` on: a run's second step,
  after the first has compiled. Used as a context: a trace still open at the end is closed."""

  def __init__(self, workdir: str, first_step: int, steps: int):
    self.log_dir = os.fspath(storage.path(workdir) / "tensorboard")
    self.first, self.last = first_step, first_step + steps - 1
    self.active = False

  def __enter__(self) -> "StepTrace":
    return self

  def before(self, step: int) -> None:
    if step == self.first and self.last >= self.first:
      jax.profiler.start_trace(self.log_dir)
      self.active = True

  def after(self, step: int, state) -> None:
    if self.active and step == self.last:
      jax.block_until_ready(state)  # the traced steps' work, not only their dispatch
      self.__exit__()

  def __exit__(self, *exc) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
