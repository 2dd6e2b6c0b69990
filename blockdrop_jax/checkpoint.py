"""Orbax checkpoints of a whole run: train state plus a JSON record of where the run stands.

Layout of a workdir: ``checkpoints/<global step>/{state,meta}`` keeps the last few, ``best/<step>``
keeps the best by test accuracy. Orbax writes each step to a temporary folder and renames it when
complete, so a killed run never leaves a half checkpoint that looks finished.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from blockdrop_jax.errors import BlockDropError


class RunCheckpoints:
  """The last ``keep`` checkpoints of a run, and separately the best one."""

  def __init__(self, workdir: str, keep: int = 3):
    self.workdir = os.path.abspath(workdir)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=False)
    self.last = ocp.CheckpointManager(os.path.join(self.workdir, "checkpoints"), options=options,
                                      item_names=("state", "meta"))
    best_options = ocp.CheckpointManagerOptions(
        max_to_keep=1, create=True, enable_async_checkpointing=False,
        best_fn=lambda metrics: metrics["score"], best_mode="max")
    self.best = ocp.CheckpointManager(os.path.join(self.workdir, "best"), options=best_options,
                                      item_names=("state", "meta"))

  def save(self, step: int, state: Any, meta: dict, score: Optional[float] = None) -> None:
    """Saves ``state`` (a pytree) and ``meta`` (JSON) as ``step``; also as best when it is."""
    check_finite(state, f"state at step {step}")
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    self.last.save(step, args=args, force=True)
    if score is not None:
      if step in self.best.all_steps():  # left by a run that stopped after saving it
        self.best.delete(step)
      self.best.save(step, args=args, metrics={"score": float(score)}, force=True)
    self.last.wait_until_finished()
    self.best.wait_until_finished()

  def latest_step(self) -> Optional[int]:
    return self.last.latest_step()

  def restore_meta(self, step: int, manager: Optional[ocp.CheckpointManager] = None) -> dict:
    manager = manager or self.last
    try:
      return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:
      raise corrupted(os.path.join(str(manager.directory), str(step)), e) from e

  def restore(self, step: int, abstract_state: Any,
              manager: Optional[ocp.CheckpointManager] = None) -> tuple[Any, dict]:
    """(state, meta) of ``step``; ``abstract_state`` gives structure, dtypes and shardings."""
    manager = manager or self.last
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    except Exception as e:
      raise corrupted(os.path.join(str(manager.directory), str(step)), e) from e
    return restored["state"], restored["meta"]

  def close(self) -> None:
    self.last.close()
    self.best.close()


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

