"""The one trainer: runs a chain of stages (pretrain, curriculum, finetune), resumable at any step.

Where a run stands (stage, epoch, batch within the epoch, global step) is saved with every
checkpoint. Batches come from ``data.epoch_order(seed, epoch)`` and step keys from
``fold_in(seed key, global step)``, so a resumed run replays exactly the batches and random draws
the uninterrupted run would have made.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh
from tqdm import tqdm

from blockdrop_jax import (checkpoint, configs, convert, curriculum, evaluation, flops, parallel,
                           references, registry, steps, storage)
from blockdrop_jax.data import Dataset, epoch_order, load_dataset, prefetched, split_validation
from blockdrop_jax.errors import BlockDropError
from blockdrop_jax.models import resnet
from blockdrop_jax.steps import Nets, PolicyLoss, TrainState, create_state

STAGES = ("pretrain", "curriculum", "finetune")


@dataclasses.dataclass
class Run:
  """What a run needs besides its train state."""

  config: ml_collections.ConfigDict
  nets: Nets
  train: Dataset
  validation: Optional[Dataset]  # held out from the training images (config.data.validation)
  test: Dataset
  # The ResNet the run starts from ({'params', 'batch_stats'}): finetuning's distillation teacher.
  starting_resnet: dict
  # The static reference's fixed subset of blocks (K,), once chosen; None for BlockDrop.
  static_keep: Optional[np.ndarray] = None


# ---------------------------------------------------------------------------------------------
# Set-up


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
      passes = ("auto", *steps.CURRICULUM_PASSES)
      if stage == "curriculum" and cfg.passes not in passes:
        raise BlockDropError(f"config.curriculum.passes = {cfg.passes!r}; use one of {passes}")
      if not 0.5 < cfg.alpha <= 1.0:
        raise BlockDropError(f"config.{stage}.alpha = {cfg.alpha} must be in (0.5, 1]")
    if cfg.epochs < 1 or cfg.lr <= 0:
      raise BlockDropError(f"config.{stage}: epochs ({cfg.epochs}) and lr ({cfg.lr}) must be positive")
    parallel.check_divisible(cfg.batch_size, n_devices, f"config.{stage}.batch_size")
    if n_train is not None and cfg.batch_size > n_train:
      raise BlockDropError(f"config.{stage}.batch_size = {cfg.batch_size} is larger than the "
                           f"{n_train} training images; lower it")


def load_data(config) -> tuple[Dataset, Optional[Dataset], Dataset]:
  """(training, validation or None, test) datasets of ``config``."""
  d = config.data
  if not d.train or not d.test:
    raise BlockDropError("config.data.train / config.data.test is empty: give a CIFAR file, folder "
                         "or name, or an image folder such as ImageNet's (<split>/<class>/*.JPEG)")
  kwargs = dict(dataset=d.dataset, data_dir=d.data_dir or None, download=d.download)
  train = load_dataset(d.train, d.train_split, **kwargs)
  test = load_dataset(d.test, d.test_split, **kwargs)
  train, validation = split_validation(train.head(d.train_limit) if d.train_limit else train,
                                       d.validation, config.seed)
  return train, validation, test.head(d.test_limit) if d.test_limit else test


def initial_variables(config, key) -> tuple[Nets, dict, dict]:
  """Specs and (params, batch_stats) of the base ResNet and the policy network: from
  ``config.init_from`` (an earlier run's workdir, or a checkpoint of the original code, whose
  ResNet comes from ``config.base.checkpoint`` if it holds the policy alone), else a base file
  plus a fresh policy."""
  options = dict(augment=config.data.augment, curriculum_passes=config.curriculum.passes)
  if config.init_from and os.path.isfile(config.init_from):  # the original's BlockDrop checkpoint
    nets, params, stats = convert.load_blockdrop_checkpoint(
        config.init_from, config.base.checkpoint or None, config.base.input_mean or None,
        config.base.input_std or None)
    return dataclasses.replace(nets, **options), params, stats
  if config.init_from:
    nets, params, stats, _ = checkpoint.load_run(config.init_from)
    return dataclasses.replace(nets, **options), params, stats
  if config.base.checkpoint:
    spec, base = convert.load_pretrained(config.base.checkpoint, config.base.arch or None,
                                         config.base.shortcut or None)
  else:
    spec = resnet.make_spec(config.base.arch, config.base.num_classes, config.base.shortcut or None)
    base = resnet.init(spec, jax.random.fold_in(key, 1))
  if config.base.input_mean or config.base.input_std:
    spec = dataclasses.replace(spec, input_mean=tuple(config.base.input_mean or spec.input_mean),
                               input_std=tuple(config.base.input_std or spec.input_std))
  policy_spec = resnet.policy_spec(spec, config.policy_arch or None,
                                   config.policy_input_pool or None)
  policy = resnet.init(policy_spec, jax.random.fold_in(key, 2))
  if config.policy_init:
    policy = convert.policy_from_resnet(policy_spec, policy, config.policy_init)
  if config.policy_init_bias:
    policy = resnet.with_policy_bias(policy, config.policy_init_bias)
  nets = Nets(spec, policy_spec, **options)
  params = {"resnet": base["params"], "policy": policy["params"]}
  stats = {"resnet": base["batch_stats"], "policy": policy["batch_stats"]}
  return nets, jax.tree.map(jnp.asarray, params), jax.tree.map(jnp.asarray, stats)


def selection_images(config) -> Dataset:
  """The images a run's choices are made on, never the test set: its validation split, or,
  without one, its first 500 training images (the run trained on them)."""
  train, validation, _ = load_data(config)
  return validation if validation is not None else train.head(500)


def run_references(nets: Nets, params, stats, meta: Optional[dict], dataset: Dataset,
                   mean_blocks: float, batch_size: int = 250,
                   more_static: tuple[int, ...] = ()) -> dict:
  """``references.references`` of a run's checkpoint (``meta``): against the ResNet it started
  from, with its static subsets and mode chosen on its ``selection_images``. Without ``meta``
  (the original's checkpoint, no config): the full network, FirstK and RandomK."""
  if meta is None:
    return references.references(nets, params, stats, dataset, mean_blocks,
                                 batch_size=batch_size)
  config = configs.from_json(meta["config"])
  return references.references(nets, params, stats, dataset, mean_blocks,
                               selection=selection_images(config),
                               pretrained=starting_resnet(config), batch_size=batch_size,
                               more_static=more_static,
                               mode=checkpoint.static_keep(meta) is None)


def starting_resnet(config) -> Optional[tuple[resnet.ResNetSpec, dict]]:
  """(spec, variables) of the ResNet a run of ``config`` starts from, before any of its training:
  its base file or its ``init_from`` run; None if it pretrains its own."""
  if "pretrain" in tuple(config.stages):
    return None
  nets, params, stats = initial_variables(config, jax.random.key(config.seed))
  return nets.resnet, {"params": params["resnet"], "batch_stats": stats["resnet"]}


def policy_loss(config, stage: str) -> PolicyLoss:
  cfg = config[stage]
  return PolicyLoss(alpha=cfg.alpha, beta=cfg.get("beta", 0.0), penalty=cfg.penalty,
                    block_budget=config.block_budget.fraction, budget_lr=config.block_budget.lr,
                    distillation=distillation(config, stage),
                    resnet_learns_greedy=cfg.get("resnet_learns_greedy", False),
                    **config.quirks.to_dict())


def distillation(config, stage: str) -> steps.Distillation:
  """Finetuning's distillation settings (none in the other stages)."""
  if stage != "finetune":
    return steps.Distillation()
  return steps.Distillation(config.finetune.distill_weight, config.finetune.distill_temperature)


def compiled_step(run: Run, stage: str, tx, mesh):
  """The step of ``stage``, (state, images, labels, key, k) -> (state, metrics), jitted over the
  data-parallel ``mesh``: pretraining, the curriculum, BlockDrop's joint finetuning, or the
  static reference's finetuning under ``run.static_keep``."""
  nets = dataclasses.replace(run.nets, mesh=mesh)
  distill = distillation(run.config, stage)
  if stage == "pretrain":
    fn = lambda s, x, y, key, k, teacher: steps.pretrain_step(nets, tx, s, x, y, key)
  elif stage == "curriculum":
    loss = policy_loss(run.config, stage)
    fn = lambda s, x, y, key, k, teacher: steps.curriculum_step(nets, loss, tx, s, x, y, key, k)
  elif run.static_keep is not None:
    keep = jnp.asarray(run.static_keep)
    fn = lambda s, x, y, key, k, teacher: steps.pretrain_step(nets, tx, s, x, y, key, keep,
                                                              teacher, distill)
  else:
    loss = policy_loss(run.config, stage)
    fn = lambda s, x, y, key, k, teacher: steps.finetune_step(nets, loss, tx, s, x, y, key,
                                                              teacher)
  step = parallel.sharded_step(fn, mesh, replicated_args=3)
  teacher = parallel.replicate(run.starting_resnet, mesh) if distill.weight else None
  return lambda s, x, y, key, k: step(s, x, y, key, k, teacher)


def choose_static_subset(run: Run, fraction: float) -> np.ndarray:
  """The best fixed subset of round(fraction K) of the starting ResNet's blocks, by greedy
  backward elimination on the validation images (``references.greedy_elimination``)."""
  K = run.nets.resnet.num_blocks
  k = max(1, int(round(fraction * K)))
  params = {"resnet": run.starting_resnet["params"]}
  stats = {"resnet": run.starting_resnet["batch_stats"]}
  return references.greedy_elimination(run.nets, params, stats, run.validation, k,
                                       run.config.eval_batch_size)[k]


# ---------------------------------------------------------------------------------------------
# Evaluation during training


def evaluate_stage(run: Run, stage: str, state: TrainState, k: Optional[int]) -> dict:
  """Validation (``val_*``, where the run holds images out) and test (``test_*``) metrics: plain
  accuracy for pretraining, the BlockDrop report otherwise.

  Runs on one device of each process with host copies of the (replicated) weights."""
  params, stats = jax.device_get((state.params, state.batch_stats))
  splits = {"val": run.validation, "test": run.test}
  metrics = {"flops_full": float(flops.flops_table(run.nets.resnet).full)}
  for prefix, dataset in splits.items():
    if dataset is None:
      continue
    if stage == "pretrain":
      result = evaluation.evaluate_resnet(
          run.nets.resnet, {"params": params["resnet"], "batch_stats": stats["resnet"]},
          dataset, run.config.eval_batch_size, progress=False)
      metrics[f"{prefix}_accuracy"] = result["accuracy"]
      continue
    forced = k if stage == "curriculum" and k < run.nets.resnet.num_blocks else None
    report = evaluation.blockdrop_report(run.nets, params, stats, dataset,
                                         run.config.eval_batch_size, k=forced, progress=False,
                                         static_keep=run.static_keep)
    metrics.update({f"{prefix}_{key}": value for key, value in report.items()
                    if key in ("accuracy", "blocks_mean", "blocks_std", "flops_mean", "flops_std",
                               "unique_policies")})
  return metrics


def selection_score(record: dict) -> float:
  """What ``best/`` keeps the highest of: validation accuracy, or, without a validation split,
  test accuracy (the original's choice)."""
  return record.get("val_accuracy", record["test_accuracy"])


# ---------------------------------------------------------------------------------------------
# Logging


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
    from tensorboardX import SummaryWriter
    self.writer = SummaryWriter(os.fspath(run / "tensorboard"))

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


# ---------------------------------------------------------------------------------------------
# The loop


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



@dataclasses.dataclass
class Position:
  """Where a run stands, as each checkpoint records it and a resumed run continues from it."""

  stage_index: int = 0
  epoch: int = 0
  batch: int = 0  # within the epoch
  global_step: int = 0
  epoch_sums: dict = dataclasses.field(default_factory=dict)  # a half-done epoch's metric sums
  last_metrics: dict = dataclasses.field(default_factory=dict)  # the last epoch's record


def _meta(run: Run, at: Position) -> dict:
  """A checkpoint's JSON: ``at``, the networks, the config and, for a static run, its blocks."""
  config, nets = run.config, run.nets
  static_keep = None if run.static_keep is None else [float(v) for v in run.static_keep]
  return {"stage_index": at.stage_index, "stage": tuple(config.stages)[at.stage_index],
          "epoch": at.epoch, "batch": at.batch, "global_step": at.global_step,
          "seed": config.seed, "epoch_sums": at.epoch_sums,
          "resnet_spec": nets.resnet.to_json(), "policy_spec": nets.policy.to_json(),
          "config": config.to_json(), "metrics": at.last_metrics, "static_keep": static_keep}


def _policy_starting_at_static_subset(run: Run, params: dict) -> dict:
  """``config.policy_init_static``: the policy's bias +b on the best static subset's blocks at the
  block budget, -b on the others."""
  bias = run.config.policy_init_bias or 3.0
  keep = choose_static_subset(run, run.config.block_budget.fraction)
  policy = resnet.with_policy_bias({"params": params["policy"]}, np.where(keep > 0.5, bias, -bias))
  return {**params, "policy": policy["params"]}


def _steps_per_epoch(run: Run, stage: str) -> int:
  return len(run.train) // run.config[stage].batch_size


def _fresh_state(run: Run, stage: str, params, stats, budget_multiplier=0.0):
  tx = steps.make_optimizer(stage, run.config[stage], _steps_per_epoch(run, stage))
  return create_state(params, stats, tx, budget_multiplier), tx


# What a resumed run may change: how long stages run (to extend a finished run) and settings that
# do not change results. Anything else would silently mix two experiments in one workdir.
RESUMABLE_CHANGES = ("pretrain.epochs", "curriculum.epochs", "finetune.epochs", "curriculum.passes",
                     "eval_every", "keep_checkpoints", "checkpoint_every_epochs",
                     "checkpoint_every_steps", "eval_batch_size", "log_every_steps")


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


def train(config: ml_collections.ConfigDict, workdir: str, progress: bool = True) -> dict:
  """Runs (or resumes) every stage of ``config`` in ``workdir``; returns the final test metrics.

  Data-parallel over every device of every process; each process loads its own rows of each
  global batch, and only process 0 writes logs and shows progress. The checkpoints and logs are
  closed however the run ends: left to interpreter exit, TensorBoard's writer printed a traceback
  under Python 3.12 after a run stopped on an error."""
  with contextlib.ExitStack() as closing:
    return _train(config, workdir, progress, closing)


@dataclasses.dataclass
class Loop:
  """What the training loop works with besides the train state and its position."""

  run: Run
  mesh: Mesh
  ckpts: checkpoint.RunCheckpoints
  log: Optional[MetricsLog]  # process 0's
  progress: bool
  key: jax.Array  # the run's base key: stage keys fold in the stage, step keys the global step


def _train(config: ml_collections.ConfigDict, workdir: str, progress: bool,
           closing: contextlib.ExitStack) -> dict:
  validate(config)
  parallel.initialize_distributed(config.distributed)
  mesh = parallel.data_mesh()
  chief = jax.process_index() == 0
  storage.workdir(workdir).mkdir(parents=True, exist_ok=True)
  train_ds, validation_ds, test_ds = load_data(config)
  validate(config, len(train_ds), jax.device_count())
  key = jax.random.key(config.seed)
  nets, params, stats = initial_variables(config, key)
  run = Run(config, nets, train_ds, validation_ds, test_ds,  # a host copy: steps donate their state
            jax.device_get({"params": params["resnet"], "batch_stats": stats["resnet"]}))
  ckpts = checkpoint.RunCheckpoints(workdir, config.keep_checkpoints)
  closing.callback(ckpts.close)
  at, state, tx, params = _start(run, ckpts, mesh, workdir, params, stats)
  log = MetricsLog(workdir, at.global_step) if chief else None
  if log:
    closing.callback(log.close)
  loop = Loop(run, mesh, ckpts, log, progress and chief, key)
  stages, budget_multiplier = tuple(config.stages), 0.0  # the multiplier carries across stages
  for at.stage_index in range(at.stage_index, len(stages)):
    stage = stages[at.stage_index]
    if state is None:  # a new stage: from the last one's weights and budget multiplier
      state, tx = _fresh_state(run, stage, params, stats, budget_multiplier)
      if stage == "finetune" and config.finetune.static:
        run.static_keep = choose_static_subset(run, config.block_budget.fraction)
    state = parallel.replicate(state, mesh)
    step_fn = compiled_step(run, stage, tx, mesh)
    for at.epoch in range(at.epoch, config[stage].epochs):
      state = _train_epoch(loop, step_fn, state, at)
    at.epoch = 0
    params, stats, budget_multiplier = state.params, state.batch_stats, state.budget_multiplier
    state = None
  return at.last_metrics


def _start(run: Run, ckpts: checkpoint.RunCheckpoints, mesh: Mesh, workdir: str, params, stats):
  """(position, train state or None, its optimiser, params): the latest checkpoint's, if the
  workdir has one (with the same config), else the start of the first stage."""
  config, stages = run.config, tuple(run.config.stages)
  latest = ckpts.latest_step()
  if latest is None:
    if config.policy_init_static:
      params = _policy_starting_at_static_subset(run, params)
    return Position(), None, None, params
  meta = ckpts.restore_meta(latest)
  changed = config_changes(json.loads(meta["config"]), config.to_dict())
  if changed:
    raise BlockDropError(f"{workdir} holds a run with a different config ({', '.join(changed)}); "
                         "resume it with the same config, or use a new --workdir")
  at = Position(meta["stage_index"], meta["epoch"], meta["batch"], meta["global_step"],
                meta["epoch_sums"], meta["metrics"])
  if meta.get("static_keep") is not None:
    run.static_keep = np.asarray(meta["static_keep"], np.float32)
  template, tx = _fresh_state(run, stages[at.stage_index], params, stats)
  state, _ = ckpts.restore(latest, checkpoint.abstract(parallel.replicate(template, mesh)))
  return at, state, tx, state.params


def _controlled_blocks(run: Run, stage: str, epoch: int, batch: int) -> int:
  """k, the blocks the policy controls at ``batch`` of ``epoch`` (all of them after the
  curriculum)."""
  K, cfg = run.nets.resnet.num_blocks, run.config[stage]
  if stage != "curriculum":
    return K
  return curriculum.controlled_blocks(epoch, K, cfg.epochs_per_block,
                                      epoch * _steps_per_epoch(run, stage) + batch,
                                      cfg.steps_per_block)


def _train_epoch(loop: Loop, step_fn, state: TrainState, at: Position) -> TrainState:
  """The steps of epoch ``at.epoch`` from batch ``at.batch`` on (``at`` moves with them), with
  checkpoints inside the epoch where configured, then ``_end_epoch``."""
  run, config = loop.run, loop.run.config
  stage = tuple(config.stages)[at.stage_index]
  cfg = config[stage]
  steps_per_epoch = _steps_per_epoch(run, stage)
  order = epoch_order(config.seed + 1000 * at.stage_index, at.epoch, len(run.train))
  stage_key = jax.random.fold_in(loop.key, at.stage_index)
  pending = PendingMetrics(at.epoch_sums)

  def load_batch(b):  # this process's rows of batch b
    idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
    idx = idx[parallel.process_rows(len(idx))]
    return run.train.images[idx], run.train.labels[idx]

  first_batch, started = at.batch, time.perf_counter()
  batches = prefetched(load_batch, range(first_batch, steps_per_epoch))
  bar = tqdm(range(first_batch, steps_per_epoch), desc=f"{stage} {at.epoch + 1}/{cfg.epochs}",
             disable=not loop.progress, leave=False, unit="step")
  for b in bar:
    images, labels = parallel.global_batch(loop.mesh, *next(batches))
    state, metrics = step_fn(state, images, labels, jax.random.fold_in(stage_key, at.global_step),
                             jnp.int32(_controlled_blocks(run, stage, at.epoch, b)))
    pending.add(metrics)
    at.global_step += 1
    every = config.checkpoint_every_steps
    save = every and at.global_step % every == 0 and b + 1 < steps_per_epoch
    if save or (b + 1) % config.log_every_steps == 0 or b + 1 == steps_per_epoch:
      shown = pending.fetch(f"{stage}, epoch {at.epoch + 1}, by step {at.global_step}")
      bar.set_postfix({n: f"{shown[n]:.3f}" for n in ("reward", "accuracy", "accuracy_sampled",
                                                     "blocks_sampled") if n in shown})
    if save:
      saving = time.perf_counter()
      at.batch, at.epoch_sums = b + 1, pending.sums
      loop.ckpts.save(at.global_step, state, _meta(run, at))
      started += time.perf_counter() - saving  # not step time
  _end_epoch(loop, state, at, pending.sums,
             epoch_throughput(time.perf_counter() - started, steps_per_epoch - first_batch,
                              cfg.batch_size))
  return state


def _end_epoch(loop: Loop, state: TrainState, at: Position, sums: dict, throughput: dict) -> None:
  """The epoch's record (training means, throughput, evaluation where due), logged and printed,
  and its checkpoint (also as best when it is); ``at`` moves to the next epoch's start."""
  run, config = loop.run, loop.run.config
  stage = tuple(config.stages)[at.stage_index]
  steps_per_epoch = _steps_per_epoch(run, stage)
  k = _controlled_blocks(run, stage, at.epoch, steps_per_epoch - 1)  # as the epoch ended
  record = {"stage": stage, "epoch": at.epoch + 1, "step": at.global_step, "k": k,
            **{f"train_{n}": v / steps_per_epoch for n, v in sums.items()}, **throughput}
  evaluated = (at.epoch + 1) % config.eval_every == 0 or at.epoch + 1 == config[stage].epochs
  score = None
  if evaluated:
    record.update(evaluate_stage(run, stage, state, k))
    # Only full-control (k = K) BlockDrop policies compete for "best".
    score = selection_score(record) if k == run.nets.resnet.num_blocks else None
  at.batch, at.epoch_sums, at.last_metrics = 0, {}, record
  if loop.log:
    loop.log.write(record)
  if evaluated or (at.epoch + 1) % config.checkpoint_every_epochs == 0:
    saved = dataclasses.replace(at, epoch=at.epoch + 1)
    loop.ckpts.save(at.global_step, state, _meta(run, saved),
                    score if stage != "pretrain" else None)
  if jax.process_index() == 0:
    tqdm.write(_summary(record))


# Wall-clock fields of a metrics record: they differ between runs of the same config (and include
# compilation in a stage's first epoch), so comparisons of runs leave them out.
TIMING_METRICS = ("train_seconds", "train_images_per_s")


def epoch_throughput(seconds: float, steps: int, batch_size: int) -> dict:
  """The training steps' wall-clock time in an epoch (data loading and compilation included,
  evaluation and checkpoint saves not) and the global images per second it gives."""
  return {"train_seconds": seconds, "train_images_per_s": steps * batch_size / seconds}


def _summary(record: dict) -> str:
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
  lines.append(f"Checkpoints: {os.path.join(workdir, 'checkpoints')} (best: "
               f"{os.path.join(workdir, 'best')}); metrics: {os.path.join(workdir, 'metrics.jsonl')}; "
               f"TensorBoard: {os.path.join(workdir, 'tensorboard')}")
  return "\n".join(lines)
