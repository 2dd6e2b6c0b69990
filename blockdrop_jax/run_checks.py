"""A run's config checked before any work: bad values get one message naming the key and the
fix, and a resumed run may change only what keeps its results the same."""

from __future__ import annotations

import json
import os
from typing import Optional

import ml_collections

from blockdrop_jax import configs, parallel, registry, steps
from blockdrop_jax.errors import BlockDropError

STAGES = ("pretrain", "curriculum", "finetune")


def validate(config: ml_collections.ConfigDict, n_train: Optional[int] = None, n_devices: int = 1):
  """Bad values get one message naming the key and the fix, before any work is done."""
  stages = tuple(config.stages)
  unknown = [s for s in stages if s not in STAGES]
  if unknown or not stages:
    raise BlockDropError(f"config.stages {stages} has unknown stages {unknown}; use {STAGES}")
  if "pretrain" not in stages and not (config.base.checkpoint or config.init_from):
    raise BlockDropError("config.base.checkpoint is empty: give a pretrained ResNet file, an "
                         "earlier run in config.init_from, or add 'pretrain' to config.stages")
  ft = config.finetune
  if "pretrain" in stages and (ft.distill_weight or ft.static or config.policy_init_static):
    raise BlockDropError("config.finetune.distill_weight, finetune.static and "
                         "policy_init_static start from a trained ResNet: pretrain in one run, "
                         "then continue it with --config.init_from=RUN")
  if "pretrain" in stages and not config.base.arch:
    raise BlockDropError("config.base.arch is empty: pretraining needs an architecture, e.g. "
                         "--config.base.arch=cifar_resnet32")
  if (config.base.checkpoint and not os.path.isfile(config.base.checkpoint)
      and config.base.checkpoint not in registry.WEIGHTS):
    raise BlockDropError(f"base checkpoint not found: {config.base.checkpoint} (config.base.checkpoint;"
                         f" a file, or one of {', '.join(registry.WEIGHTS)})")
  for key, unit in (("eval_every", "epochs"), ("checkpoint_every_epochs", "epochs"),
                    ("log_every_steps", "steps")):
    if not isinstance(config[key], int) or config[key] < 1:
      raise BlockDropError(f"config.{key} = {config[key]!r} must be a positive number of {unit}")
  if not 0.0 <= ft.distill_weight <= 1.0 or ft.distill_temperature <= 0:
    raise BlockDropError(f"config.finetune: distill_weight ({ft.distill_weight}) must be in [0, 1] "
                         f"(0: no distillation) and distill_temperature ({ft.distill_temperature}) "
                         "positive")
  if config.policy_init_static and not (config.block_budget.fraction and config.data.validation):
    raise BlockDropError("config.policy_init_static starts the policy at the best static subset "
                         "of the block budget's size, chosen on validation images: set "
                         "config.block_budget.fraction and config.data.validation")
  if ft.static and not (config.block_budget.fraction and config.data.validation):
    raise BlockDropError("config.finetune.static keeps block_budget.fraction of the blocks, chosen "
                         "on validation images: set config.block_budget.fraction and "
                         "config.data.validation (e.g. 500)")
  budget = config.block_budget
  if not 0.0 <= budget.fraction < 1.0 or budget.lr <= 0:
    raise BlockDropError(f"config.block_budget: fraction ({budget.fraction}) must be in [0, 1) "
                         f"(0: no budget) and lr ({budget.lr}) positive")
  for stage in stages:
    cfg = config[stage]
    if stage != "pretrain":
      if cfg.penalty >= 0:
        raise BlockDropError(
            f"config.{stage}.penalty = {cfg.penalty} must be negative: it is the reward of a wrong "
            f"prediction, below any correct one (did you mean {-abs(cfg.penalty) or -1}?)")
      passes = ("auto", *(steps.FINETUNE_PASSES if stage == "finetune"
                          else steps.CURRICULUM_PASSES))
      if cfg.passes not in passes:
        raise BlockDropError(f"config.{stage}.passes = {cfg.passes!r}; use one of {passes}")
      if not 0.5 < cfg.alpha <= 1.0:
        raise BlockDropError(f"config.{stage}.alpha = {cfg.alpha} must be in (0.5, 1]")
    if cfg.epochs < 1 or cfg.lr <= 0:
      raise BlockDropError(f"config.{stage}: epochs ({cfg.epochs}) and lr ({cfg.lr}) must be positive")
    parallel.check_divisible(cfg.batch_size, n_devices, f"config.{stage}.batch_size")
    if n_train is not None and cfg.batch_size > n_train:
      raise BlockDropError(f"config.{stage}.batch_size = {cfg.batch_size} is larger than the "
                           f"{n_train} training images; lower it")

# do not change results. Anything else would silently mix two experiments in one workdir.
RESUMABLE_CHANGES = ("pretrain.epochs", "curriculum.epochs", "finetune.epochs", "curriculum.passes",
                     "eval_every", "keep_checkpoints", "checkpoint_every_epochs",
                     "checkpoint_every_steps", "eval_batch_size", "log_every_steps",
                     "profile_steps")


def config_changes(saved: dict, current: dict) -> list[str]:
  """Dotted keys whose values differ between a saved and the current config, beyond those a
  resumed run may change. Keys added since the run was saved read as their defaults."""
  saved = configs.from_json(json.dumps(saved)).to_dict()
  def flat(tree, prefix=""):
    out = {}
    for key, value in tree.items():
      out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else
                 {f"{prefix}{key}": list(value) if isinstance(value, (list, tuple)) else value})
    return out

  saved, current = flat(saved), flat(current)
  return sorted(key for key in saved.keys() | current.keys()
                if key not in RESUMABLE_CHANGES and saved.get(key) != current.get(key))

