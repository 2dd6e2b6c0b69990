"""Checkpoints written before a TrainState field existed restore with the value that keeps those
runs' behaviour, on the template's devices; the rest of the state restores unchanged."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from blockdrop_jax import checkpoint, parallel, steps


def test_a_state_saved_before_the_block_budget_restores_without_one(tmp_path):
  params = {"resnet": {"kernel": jnp.arange(6.0).reshape(2, 3)}}
  stats = {"resnet": {"mean": jnp.ones(3)}}
  tx = optax.sgd(0.1, momentum=0.9)
  state = steps.create_state(params, stats, tx, budget_multiplier=0.5)
  state = steps.TrainState(jnp.asarray(7, jnp.int32), params, stats,
                           jax.tree.map(lambda x: x + 1.0, state.opt_state), state.budget_multiplier)
  assert set(checkpoint.ADDED_STATE_FIELDS) == {"budget_multiplier"}
  before_the_budget = {field.name: getattr(state, field.name) for field in dataclasses.fields(state)
                       if field.name != "budget_multiplier"}
  runs = checkpoint.RunCheckpoints(str(tmp_path))
  runs.save(1, before_the_budget, {"stage": "finetune"})
  runs.save(2, state, {"stage": "finetune"})
  runs.close()
  runs = checkpoint.RunCheckpoints(str(tmp_path))  # as a resumed run or evaluate.py opens them
  mesh = parallel.data_mesh()
  template = checkpoint.abstract(parallel.replicate(state, mesh))
  old, meta = runs.restore(1, template)
  new, _ = runs.restore(2, template)
  runs.close()
  assert isinstance(old, steps.TrainState) and meta == {"stage": "finetune"}
  assert float(old.budget_multiplier) == 0.0 and float(new.budget_multiplier) == 0.5
  assert old.budget_multiplier.dtype == jnp.float32
  assert old.budget_multiplier.sharding.is_equivalent_to(parallel.replicated(mesh), 0)
  for restored in (old, new):
    jax.tree.map(np.testing.assert_array_equal,
                 dataclasses.replace(restored, budget_multiplier=state.budget_multiplier), state)
