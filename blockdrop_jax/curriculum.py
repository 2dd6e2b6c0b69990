"""Curriculum learning: at epoch e the policy decides only the last k blocks; the rest run."""

from __future__ import annotations

import jax.numpy as jnp


def controlled_blocks(epoch: int, num_blocks: int, epochs_per_block: int = 1, step: int = 0,
                      steps_per_block: int = 0) -> int:
  """k = min(e // epochs_per_block + 1, K): one more block handed to the policy every
  ``epochs_per_block`` epochs (the original: every epoch) or, with ``steps_per_block``, every that
  many steps (``step``: steps since the curriculum began), so that a short run hands over all K."""
  if steps_per_block:
    return min(step // steps_per_block + 1, num_blocks)
  return min(epoch // epochs_per_block + 1, num_blocks)


def controlled_mask(k, num_blocks: int):
  """(K,) float mask, 1 where the policy decides (the last k blocks). ``k`` may be traced."""
  return (jnp.arange(num_blocks) >= num_blocks - k).astype(jnp.float32)


def force_prefix(policy, mask):
  """Blocks outside the policy's control are forced on."""
  return jnp.where(mask > 0, policy, 1.0)
