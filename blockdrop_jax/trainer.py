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
import time
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh
from tqdm import tqdm

from blockdrop_jax import (checkpoint, compact, curriculum, evaluation, flops, multihost,
                           parallel, references, run_checks, run_inputs, run_log, steps, storage)
from blockdrop_jax.data import Dataset, epoch_order, prefetched
from blockdrop_jax.errors import BlockDropError
from blockdrop_jax.models import resnet
from blockdrop_jax.steps import Nets, PolicyLoss, TrainState, create_state


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
# The steps


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


def compiled_step(run: Run, stage: str, tx, mesh, finetune_passes: str = "masked"):
  """The step of ``stage``, (state, images, labels, stage_key, step, k) -> (state, metrics),
  jitted over the data-parallel ``mesh``: pretraining, the curriculum, BlockDrop's joint
  finetuning (its passes ``finetune_passes``), or the static reference's finetuning under
  ``run.static_keep``. Its random key, ``fold_in(stage_key, step)``, is drawn inside the compiled
  step."""
  nets, config = run.nets, run.config
  options = steps.StepOptions(augment=config.data.augment,
                              curriculum_passes=config.curriculum.passes,
                              finetune_passes=finetune_passes, mesh=mesh)
  distill = distillation(config, stage)
  if stage == "pretrain":
    fn = lambda s, x, y, key, k, teacher: steps.pretrain_step(nets, tx, s, x, y, key,
                                                              options=options)
  elif stage == "curriculum":
    loss = policy_loss(config, stage)
    fn = lambda s, x, y, key, k, teacher: steps.curriculum_step(nets, loss, tx, s, x, y, key, k,
                                                                options)
  elif run.static_keep is not None:
    keep = jnp.asarray(run.static_keep)
    fn = lambda s, x, y, key, k, teacher: steps.pretrain_step(nets, tx, s, x, y, key, keep,
                                                              teacher, distill, options)
  else:
    loss = policy_loss(config, stage)
    fn = lambda s, x, y, key, k, teacher: steps.finetune_step(nets, loss, tx, s, x, y, key,
                                                              teacher, options)
  keyed = lambda s, x, y, stage_key, step, k, teacher: fn(
      s, x, y, jax.random.fold_in(stage_key, step), k, teacher)
  compiled = parallel.sharded_step(keyed, mesh, replicated_args=4)
  teacher = parallel.replicate(run.starting_resnet, mesh) if distill.weight else None
  return lambda s, x, y, stage_key, step, k: compiled(s, x, y, stage_key, step, k, teacher)


def epoch_finetune_passes(run: Run, stage: str, last_record: dict) -> Optional[str]:
  """How BlockDrop's finetuning runs its passes in the next epoch (None in other stages):
  config.finetune.passes, "auto" resolved from the sampled policies' share of the blocks in
  ``last_record`` (the last epoch's, restored with a checkpoint, so a resumed run chooses alike)."""
  if stage != "finetune" or run.static_keep is not None:
    return None
  blocks = last_record.get("train_blocks_sampled")
  keep = None if blocks is None else blocks / run.nets.resnet.num_blocks
  return compact.finetune_passes(run.config.finetune.passes, keep)


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

  Sharded over every device of every process (``evaluation.batched``)."""
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
  """What the best checkpoint has the highest of: validation accuracy, or, without a validation split,
  test accuracy (the original's choice)."""
  return record.get("val_accuracy", record["test_accuracy"])


# ---------------------------------------------------------------------------------------------
# The loop


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


def train(config: ml_collections.ConfigDict, workdir: str, progress: bool = True) -> dict:
  """Runs (or resumes) every stage of ``config`` in ``workdir``; returns the final test metrics.

  Data-parallel over every device of every process; each process loads its own rows of each
  global batch, and only process 0 writes logs and shows progress. On SIGTERM every process saves
  the same step and raises ``multihost.Preempted``. The checkpoints and logs are closed however
  the run ends: left to interpreter exit, TensorBoard's writer printed a traceback under Python
  3.12 after a run stopped on an error."""
  with contextlib.ExitStack() as closing:
    return _train(config, workdir, progress, closing)


@dataclasses.dataclass
class Loop:
  """What the training loop works with besides the train state and its position."""

  run: Run
  mesh: Mesh
  ckpts: checkpoint.RunCheckpoints
  log: Optional[run_log.MetricsLog]  # process 0's
  progress: bool
  key: jax.Array  # the run's base key: stage keys fold in the stage, step keys the global step
  preemption: multihost.Preemption
  trace: run_log.StepTrace
  workdir: str


def _train(config: ml_collections.ConfigDict, workdir: str, progress: bool,
           closing: contextlib.ExitStack) -> dict:
  run_checks.validate(config)
  mesh = parallel.data_mesh()
  chief = multihost.is_chief()
  storage.workdir(workdir).mkdir(parents=True, exist_ok=True)
  multihost.check_shared(storage.workdir(workdir))
  train_ds, validation_ds, test_ds = multihost.process_0_first(
      "datasets ready", lambda: run_inputs.load_data(config))
  run_checks.validate(config, len(train_ds), jax.device_count())
  key = jax.random.key(config.seed)
  nets, params, stats = multihost.process_0_first(
      "weights ready", lambda: run_inputs.initial_variables(config, key))
  run = Run(config, nets, train_ds, validation_ds, test_ds,  # a host copy: steps donate their state
            jax.device_get({"params": params["resnet"], "batch_stats": stats["resnet"]}))
  ckpts = checkpoint.RunCheckpoints(workdir, config.keep_checkpoints)
  closing.callback(ckpts.close)
  at, state, tx, params = _start(run, ckpts, mesh, workdir, params, stats)
  log = run_log.MetricsLog(workdir, at.global_step) if chief else None
  if log:
    closing.callback(log.close)
  trace = closing.enter_context(run_log.StepTrace(
      workdir, at.global_step + 1, config.profile_steps if chief else 0))
  preemption = closing.enter_context(multihost.Preemption())
  if chief:
    tqdm.write(f"Training in {workdir} on {jax.device_count()} device(s) of "
               f"{jax.process_count()} process(es), from step {at.global_step}")
  loop = Loop(run, mesh, ckpts, log, progress and chief, key, preemption, trace, workdir)
  stages, budget_multiplier = tuple(config.stages), 0.0  # the multiplier carries across stages
  for at.stage_index in range(at.stage_index, len(stages)):
    stage = stages[at.stage_index]
    if state is None:  # a new stage: from the last one's weights and budget multiplier
      state, tx = _fresh_state(run, stage, params, stats, budget_multiplier)
      if stage == "finetune" and config.finetune.static:
        run.static_keep = choose_static_subset(run, config.block_budget.fraction)
    state = parallel.replicate(state, mesh)
    step_fns = {}  # compiled per finetune_passes: "auto" may change them between epochs
    for at.epoch in range(at.epoch, config[stage].epochs):
      passes = epoch_finetune_passes(run, stage, at.last_metrics)
      if passes not in step_fns:
        step_fns[passes] = compiled_step(run, stage, tx, mesh, passes or "masked")
      state = _train_epoch(loop, step_fns[passes], state, at, passes)
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
  changed = run_checks.config_changes(json.loads(meta["config"]), config.to_dict())
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


def _train_epoch(loop: Loop, step_fn, state: TrainState, at: Position,
                 finetune_passes: Optional[str] = None) -> TrainState:
  """The steps of epoch ``at.epoch`` from batch ``at.batch`` on (``at`` moves with them), with
  checkpoints inside the epoch where configured, then ``_end_epoch`` (which records
  ``finetune_passes``, the finetuning passes the steps ran)."""
  run, config = loop.run, loop.run.config
  stage = tuple(config.stages)[at.stage_index]
  cfg = config[stage]
  steps_per_epoch = _steps_per_epoch(run, stage)
  order = epoch_order(config.seed + 1000 * at.stage_index, at.epoch, len(run.train))
  stage_key = jax.random.fold_in(loop.key, at.stage_index)
  pending = run_log.PendingMetrics(at.epoch_sums)

  def load_batch(b):  # this process's rows of batch b
    idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
    idx = idx[parallel.process_rows(loop.mesh, cfg.batch_size)]
    return run.train.images[idx], run.train.labels[idx]

  first_batch, started = at.batch, time.perf_counter()
  batches = prefetched(load_batch, range(first_batch, steps_per_epoch))
  bar = tqdm(range(first_batch, steps_per_epoch), desc=f"{stage} {at.epoch + 1}/{cfg.epochs}",
             disable=not loop.progress, leave=False, unit="step")
  for b in bar:
    images, labels = parallel.global_batch(loop.mesh, cfg.batch_size, *next(batches))
    loop.trace.before(at.global_step)
    state, metrics = step_fn(state, images, labels, stage_key, jnp.int32(at.global_step),
                             jnp.int32(_controlled_blocks(run, stage, at.epoch, b)))
    loop.trace.after(at.global_step, state)
    pending.add(metrics)
    at.global_step += 1
    every = config.checkpoint_every_steps
    preempted = loop.preemption.reached(at.global_step)
    save = preempted or (every and at.global_step % every == 0 and b + 1 < steps_per_epoch)
    if save or (b + 1) % config.log_every_steps == 0 or b + 1 == steps_per_epoch:
      shown = pending.fetch(f"{stage}, epoch {at.epoch + 1}, by step {at.global_step}")
      bar.set_postfix({n: f"{shown[n]:.3f}" for n in ("reward", "accuracy", "accuracy_sampled",
                                                     "blocks_sampled") if n in shown})
    if save:
      saving = time.perf_counter()
      at.batch, at.epoch_sums = b + 1, pending.sums
      loop.ckpts.save(at.global_step, state, _meta(run, at))
      started += time.perf_counter() - saving  # not step time
    if preempted:
      loop.ckpts.wait()
      raise multihost.Preempted(at.global_step, loop.workdir)
  about = run_log.epoch_throughput(time.perf_counter() - started, steps_per_epoch - first_batch,
                                   cfg.batch_size)
  if finetune_passes:
    about["finetune_passes"] = finetune_passes
  _end_epoch(loop, state, at, pending.sums, about)
  return state


def _end_epoch(loop: Loop, state: TrainState, at: Position, sums: dict, about: dict) -> None:
  """The epoch's record (training means, ``about`` the epoch: its throughput and how its steps
  ran; evaluation where due), logged and printed,
  and its checkpoint (also as best when it is); ``at`` moves to the next epoch's start."""
  run, config = loop.run, loop.run.config
  stage = tuple(config.stages)[at.stage_index]
  steps_per_epoch = _steps_per_epoch(run, stage)
  k = _controlled_blocks(run, stage, at.epoch, steps_per_epoch - 1)  # as the epoch ended
  record = {"stage": stage, "epoch": at.epoch + 1, "step": at.global_step, "k": k,
            **{f"train_{n}": v / steps_per_epoch for n, v in sums.items()}, **about}
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
  if multihost.is_chief():
    tqdm.write(run_log.epoch_summary(record))


# Wall-clock fields of a metrics record: they differ between runs of the same config (and include