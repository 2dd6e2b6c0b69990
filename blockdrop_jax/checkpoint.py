"""Orbax checkpoints of a whole run: train state plus a JSON record of where the run stands.

Layout of a workdir: ``checkpoints/<global step>/{state,meta}``, one manager keeping the last few
steps and the best one by its score (``trainer.selection_score``). Saves are asynchronous: the
state is copied to the host, then written while the next steps run. Orbax writes each step to a
temporary folder and renames it when complete, so a killed run never leaves a half checkpoint
that looks finished.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from blockdrop_jax import parallel, steps, storage
from blockdrop_jax.errors import BlockDropError
from blockdrop_jax.models import resnet


# Fields of steps.TrainState added after runs were saved without them, with the value that keeps
# those runs' behaviour: they restore with it.
ADDED_STATE_FIELDS = {"budget_multiplier": 0.0}


def _item_handlers() -> dict:
  """A step's items and their formats, known before the first restore (for ``item_metadata``)."""
  return {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}


def _score(metrics) -> float:
  return metrics["score"]


# Steps saved without a score (mid-epoch, pretraining, the curriculum) are not candidates for
# best; orbax warns about each of them.
logging.getLogger("absl").addFilter(
    lambda record: "did not provide metrics" not in record.getMessage())


class RunCheckpoints:
  """The last ``keep`` checkpoints of a run and the best one, by the score each was saved with."""

  def __init__(self, workdir: str, keep: int = 3, asynchronous: bool = True):
    self.workdir = storage.workdir(workdir)
    policies = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
        create=True, enable_async_checkpointing=asynchronous, best_fn=_score, best_mode="max",
        preservation_policy=policies.AnyPreservationPolicy([
            policies.LatestN(n=keep),
            policies.BestN(get_metric_fn=_score, n=1, keep_checkpoints_without_metrics=False)]))
    self.manager = ocp.CheckpointManager(self.workdir / "checkpoints", options=options,
                                         item_handlers=_item_handlers())

  def save(self, step: int, state: Any, meta: dict, score: Optional[float] = None) -> None:
    """Saves ``state`` (a pytree) and ``meta`` (JSON) as ``step``, a candidate for best if it has
    a ``score``. Returns once the state is on the host; the files are written in the background
    (``wait``)."""
    check_finite(state, f"state at step {step}")
    if step in self.manager.all_steps():  # a resumed run reached the step it stopped at
      self.manager.delete(step)
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    self.manager.save(step, args=args, force=True,
                      metrics=None if score is None else {"score": float(score)})

  def wait(self) -> None:
    """Until every save has been written."""
    self.manager.wait_until_finished()

  def best_step(self) -> Optional[int]:
    """The saved step with the highest score; None if no step has one."""
    step = self.manager.best_step()
    return step if step is not None and self.manager.metrics(step) else None

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def restore_meta(self, step: int) -> dict:
    try:
      return self.manager.restore(
          step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:
      raise corrupted(f"{self.manager.directory}/{step}", e) from e

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """(state, meta) of ``step``; ``abstract_state`` gives structure, dtypes and shardings."""
    manager = self.manager
    try:
      stored = manager.item_metadata(step)["state"].keys()
      missing = {name: value for name, value in ADDED_STATE_FIELDS.items() if name not in stored}
      template = abstract_state
      if missing:
        template = {field.name: getattr(abstract_state, field.name)
                    for field in dataclasses.fields(abstract_state) if field.name not in missing}
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(template), meta=ocp.args.JsonRestore()))
    except Exception as e:
      raise corrupted(f"{manager.directory}/{step}", e) from e
    state = restored["state"]
    if missing:
      added = {name: jax.device_put(jnp.asarray(value, getattr(abstract_state, name).dtype),
                                    getattr(abstract_state, name).sharding)
               for name, value in missing.items()}
      state = type(abstract_state)(**state, **added)
    return state, restored["meta"]

  def close(self) -> None:
    """Waits for the saves in flight, then closes."""
    self.manager.close()


def corrupted(path: str, error: Exception) -> BlockDropError:
  return BlockDropError(
      f"checkpoint {path} cannot be read ({type(error).__name__}: {str(error)[:160]}); it is "
      "damaged or from another configuration. Delete that step folder to resume from the one "
      "before it, or start in a new --workdir")


def check_finite(tree: Any, what: str) -> None:
  leaves = [np.asarray(x) for x in jax.tree.leaves(tree)
            if np.issubdtype(np.asarray(x).dtype, np.floating)]
  if not all(np.isfinite(x).all() for x in leaves):
    raise BlockDropError(f"{what} contains NaN or Inf: not saved. Lower the learning rate or check "
                         "the inputs; the last good checkpoint is kept")


def abstract(tree: Any) -> Any:
  """Shape/dtype/sharding skeleton of ``tree`` for restoring into."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)



def load_run(workdir: str, best: bool = False) -> tuple[steps.Nets, dict, dict, dict]:
  """(nets, params, batch_stats, meta) of a run's latest (or best) checkpoint."""
  if not (storage.workdir(workdir) / "checkpoints").is_dir():
    raise BlockDropError(f"{workdir} is not a training workdir (no checkpoints/ inside)")
  ckpts = RunCheckpoints(workdir)
  try:
    step = ckpts.best_step() if best else ckpts.latest_step()
    if step is None:
      raise BlockDropError(f"{workdir} has no {'best ' if best else ''}checkpoint yet")
    meta = ckpts.restore_meta(step)
    config = ml_collections.ConfigDict(json.loads(meta["config"]))
    nets = steps.Nets(resnet.ResNetSpec.from_json(meta["resnet_spec"]),
                      resnet.ResNetSpec.from_json(meta["policy_spec"]))
    stage = meta["stage"]
    tx = steps.make_optimizer(stage, config[stage], 1)
    # Replicated over every device of every process, whatever topology saved it.
    everywhere = parallel.replicated(parallel.data_mesh())
    template = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=everywhere),
        jax.eval_shape(lambda: steps.create_state(*_initial_params(nets), tx)))
    state, meta = ckpts.restore(step, template)
  finally:
    ckpts.close()
  return nets, state.params, state.batch_stats, meta


def static_keep(meta: Optional[dict]) -> Optional[np.ndarray]:
  """The fixed blocks (K,) of a static run's checkpoint; None for BlockDrop runs."""
  keep = (meta or {}).get("static_keep")
  return None if keep is None else np.asarray(keep, np.float32)


def _initial_params(nets: steps.Nets) -> tuple[dict, dict]:
  """(params, batch_stats) of freshly initialised networks: the structure to restore into."""
  key = jax.random.key(0)
  base, policy = resnet.init(nets.resnet, key), resnet.init(nets.policy, key)
  return ({"resnet": base["params"], "policy": policy["params"]},
          {"resnet": base["batch_stats"], "policy": policy["batch_stats"]})
