"""How the blocks of a gated ResNet run: the same outputs, different costs.

- ``masked``: every block runs for every image and ``jnp.where`` keeps or drops it. Static
  shapes, needed for per-example training; no time saved.
- ``batch_skip``: a block runs only if some image of the batch keeps it. The predicate is one
  scalar for the whole batch, so ``lax.cond`` really branches (a per-example ``cond`` under
  ``vmap`` becomes a ``select`` that runs both sides).
- ``grouped``: images are grouped by policy vector and each group runs with ``batch_skip``, so
  each group runs exactly its own blocks. Groups are padded to a few bucket sizes, so the number
  of compilations is bounded by the number of buckets, not by the number of distinct policies.
- batch 1 is ``batch_skip`` on a single image: it runs exactly that image's blocks.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from blockdrop_jax.models import resnet
from blockdrop_jax.models.resnet import ResNetSpec

MODES = ("masked", "batch_skip", "grouped")


def _stem(spec, variables, x, train=False):
  return resnet.ResNet(spec).apply(variables, x, train, method=lambda m, x, tr: m.stem(x, tr))


def _block(spec, variables, t, x):
  return resnet.ResNet(spec).apply(variables, x, method=lambda m, x: m.run_block(t, x))


def _head(spec, variables, x):
  return resnet.ResNet(spec).apply(variables, x, method=lambda m, x: m.head(x))


def gated_block(spec: ResNetSpec, variables, t: int, x, keep):
  """Block t under a per-example ``keep`` (batch,), computed only if any image keeps it."""

  def run(x):
    dropped, kept = _block(spec, variables, t, x)
    return jnp.where(keep[:, None, None, None] > 0.5, kept, dropped)

  def skip(x):
    return resnet.ResNet(spec).apply(
        variables, x, method=lambda m, x: m.blocks[t].shortcut(x, False))

  return jax.lax.cond(jnp.any(keep > 0.5), run, skip, x)


def batch_skip_apply(spec: ResNetSpec, variables, images, policy):
  """Logits of [0, 1] images under ``policy`` (batch, K), skipping blocks no image runs."""
  resnet.check_policy(policy, images.shape[0], spec.num_blocks)
  x = _stem(spec, variables, images)
  for t in range(spec.num_blocks):
    x = gated_block(spec, variables, t, x, policy[:, t])
  return _head(spec, variables, x)


def shared_prefix_pair(spec: ResNetSpec, variables, images, greedy, sampled, num_forced):
  """Logits under two policies that agree on their first ``num_forced`` blocks (all kept), as in
  the curriculum's greedy and sampled passes: the stem and the forced prefix run once; after it
  each pass skips the blocks that none of its images keeps (greedy policies often agree).

  ``num_forced`` may be traced, so one compilation serves the whole curriculum."""
  x = _stem(spec, variables, images)
  pair = (x, x)
  for t in range(spec.num_blocks):
    def forced(pair, t=t):
      kept = _block(spec, variables, t, pair[0])[1]
      return kept, kept

    def decided(pair, t=t):
      return (gated_block(spec, variables, t, pair[0], greedy[:, t]),
              gated_block(spec, variables, t, pair[1], sampled[:, t]))

    pair = jax.lax.cond(t < num_forced, forced, decided, pair)
  return _head(spec, variables, pair[0]), _head(spec, variables, pair[1])


def masked_apply(spec: ResNetSpec, variables, images, policy):
  return resnet.apply(spec, variables, images, policy)


def bucket_sizes(max_batch: int, smallest: int = 1, growth: int = 4) -> tuple[int, ...]:
  """``smallest`` times powers of ``growth`` below ``max_batch``, then ``max_batch``: few sizes
  (few compilations) at the price of some padding."""
  sizes, size = [], smallest
  while size < max_batch:
    sizes.append(size)
    size *= growth
  return tuple(sizes) + (max_batch,)


def group_by_policy(policies: np.ndarray) -> list[np.ndarray]:
  """Indices of the images sharing each distinct policy vector, largest group first."""
  _, inverse, counts = np.unique(policies > 0.5, axis=0, return_inverse=True, return_counts=True)
  inverse = inverse.reshape(-1)
  return [np.flatnonzero(inverse == g) for g in np.argsort(-counts, kind="stable")]


def plan_batches(groups: Sequence[np.ndarray], buckets: Sequence[int]) -> list[tuple[np.ndarray, int]]:
  """Cuts each group into chunks of at most the largest bucket; each chunk gets the smallest
  bucket that holds it. Returns (indices, padded size) pairs."""
  largest = buckets[-1]
  plan = []
  for group in groups:
    for start in range(0, len(group), largest):
      chunk = group[start:start + largest]
      plan.append((chunk, next(b for b in buckets if b >= len(chunk))))
  return plan


class GroupedExecutor:
  """Policy-grouped batched inference with a bounded number of compilations.

  ``__call__(variables, images, policies)`` returns the logits of every image in input order,
  equal to masked execution. ``trace_count`` counts how often the group function was traced.
  """

  def __init__(self, spec: ResNetSpec, max_batch: int = 256, smallest_bucket: int = 1,
               growth: int = 4):
    self.spec = spec
    self.buckets = bucket_sizes(max_batch, smallest_bucket, growth)
    self.trace_count = 0
    self._run = jax.jit(self._group_logits)

  def _group_logits(self, variables, images, policy_row):
    self.trace_count += 1  # Python side effect: runs once per trace, not per call
    policy = jnp.broadcast_to(policy_row, (images.shape[0], policy_row.shape[0]))
    return batch_skip_apply(self.spec, variables, images, policy)

  def __call__(self, variables, images: np.ndarray, policies: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    policies = np.asarray(policies, np.float32)
    out: Optional[np.ndarray] = None
    pending = []
    for indices, size in plan_batches(group_by_policy(policies), self.buckets):
      batch = images[indices]
      if size > len(indices):
        batch = np.concatenate([batch, np.repeat(batch[:1], size - len(indices), axis=0)])
      pending.append((indices, self._run(variables, batch, policies[indices[0]])))
    for indices, logits in pending:  # dispatch everything first, then wait
      logits = np.asarray(logits)[:len(indices)]
      if out is None:
        out = np.empty((len(images), logits.shape[-1]), logits.dtype)
      out[indices] = logits
    return out


@functools.partial(jax.jit, static_argnums=0)
def _batch_skip_jit(spec, variables, images, policy):
  return batch_skip_apply(spec, variables, images, policy)


@functools.partial(jax.jit, static_argnums=0)
def _masked_jit(spec, variables, images, policy):
  return masked_apply(spec, variables, images, policy)


def run(mode: str, spec: ResNetSpec, variables, images, policy):
  """Logits under ``policy`` with the chosen execution mode (jitted)."""
  if mode == "masked":
    return _masked_jit(spec, variables, images, policy)
  if mode == "batch_skip":
    return _batch_skip_jit(spec, variables, images, policy)
  if mode == "grouped":
    return GroupedExecutor(spec, max_batch=len(images))(variables, images, policy)
  raise ValueError(f"unknown execution mode {mode!r}; choose one of {MODES}")
