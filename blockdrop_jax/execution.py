"""How the blocks of a gated ResNet run: the same outputs, different costs.

- masked (``resnet.apply``): every block runs for every image and ``jnp.where`` keeps or drops
  it. Static shapes: what training differentiates; no time saved.
- ``compact`` (``compact.py``): each block runs on only the rows that keep it, gathered in chunks
  and written back in place; one compilation. Batched evaluation, and the curriculum step's
  greedy and sampled passes.
- ``grouped`` (``GroupedExecutor``): images are grouped by policy vector and each group runs
  exactly its own blocks, each run of same-shaped blocks as one loop over its kept blocks
  (``looped_skip_apply``). Batched inference where trained policies share few vectors.
- batch 1 (``Runner("batch_skip", ...)``): a block runs only if the image keeps it; the predicate
  is one scalar, so ``lax.cond`` really branches (a per-example ``cond`` under ``vmap`` becomes a
  ``select`` that runs both sides). On a GPU ``Runner("looped", ...)`` launches fewer kernels.

Which is fastest depends on the backend (docs/results.md; an H200: benchmarks/results/
speed_h200.md): on CPU time follows FLOPs and compact and grouped win; on a GPU a CIFAR ResNet is
bound by kernel launches, each chunk of compact costs launches, and masked execution is fastest at
batch 256 (``compact.compact_pays``).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from blockdrop_jax import compact, compilation
from blockdrop_jax.models import resnet
from blockdrop_jax.models.resnet import ResNetSpec

def gated_block(spec: ResNetSpec, variables, t: int, x, keep):
  """Block t under a per-example ``keep`` (batch,), computed only if any image keeps it."""

  def run(x):
    dropped, kept = resnet.apply_block(spec, variables, t, x)
    return jnp.where(keep[:, None, None, None] > 0.5, kept, dropped)

  return jax.lax.cond(jnp.any(keep > 0.5), run, lambda x: resnet.apply_shortcut(spec, variables, t, x), x)


def batch_skip_apply(spec: ResNetSpec, variables, images, policy):
  """Logits of [0, 1] images under ``policy`` (batch, K), skipping blocks no image runs."""
  resnet.check_policy(policy, images.shape[0], spec.num_blocks)
  x = resnet.apply_stem(spec, variables, images)
  for t in range(spec.num_blocks):
    x = gated_block(spec, variables, t, x, policy[:, t])
  return resnet.apply_head(spec, variables, x)


def block_runs(spec: ResNetSpec) -> list[tuple[int, int]]:
  """(first block, length) of each run of consecutive blocks with one layout that keep their
  input's shape (a block that changes it is a run of one): a run's weights stack into one array
  per leaf (``stack_runs``), and ``looped_skip_apply`` runs it as a loop over its kept blocks."""
  runs, layout = [], spec.block_layout()
  for t in range(spec.num_blocks):
    first = runs[-1][0] if runs else None
    if (first is not None and not resnet.changes_shape(spec, first) and not resnet.changes_shape(spec, t)
        and layout[first][2:] == layout[t][2:]):
      runs[-1][1] += 1
    else:
      runs.append([t, 1])
  return [tuple(run) for run in runs]


def stack_runs(spec: ResNetSpec, variables) -> dict:
  """``variables`` for ``looped_skip_apply``: each run of several blocks (``block_runs``) stacked
  into one tree named after its first block; everything else as it was. Stack once per set of
  weights, outside the compiled function: inside it would copy every weight at every call."""
  stacked = {col: dict(tree) for col, tree in variables.items()}
  for first, length in block_runs(spec):
    if length > 1:
      for tree in stacked.values():
        names = [f"block{t}" for t in range(first, first + length)]
        if names[0] in tree:
          tree[names[0]] = jax.tree.map(lambda *leaves: jnp.stack(leaves),
                                        *[tree.pop(name) for name in names])
  return stacked


def _looped_run(spec: ResNetSpec, stacked, first: int, x, keep):
  """The blocks of one run under a per-example ``keep`` (batch, length): a loop over only the
  blocks some image keeps, each taking its weights from the stacked arrays by index."""
  runs_block = jnp.any(keep, axis=0)
  kept_blocks = jnp.argsort(~runs_block, stable=True)  # kept first, in order

  def step(i, x):
    block = kept_blocks[i]
    weights = {col: {f"block{first}": jax.tree.map(
        lambda leaf: jax.lax.dynamic_index_in_dim(leaf, block, keepdims=False), tree)}
        for col, tree in stacked.items()}
    dropped, kept = resnet.apply_block(spec, weights, first, x)
    keep_block = jax.lax.dynamic_index_in_dim(keep, block, axis=1, keepdims=False)
    return jnp.where(keep_block[:, None, None, None], kept, dropped)

  return jax.lax.fori_loop(0, jnp.sum(runs_block), step, x)


def looped_skip_apply(spec: ResNetSpec, stacked_variables, images, policy):
  """``batch_skip_apply`` on ``stack_runs`` variables: the same logits, but each run of blocks
  is one loop over its kept blocks instead of a ``cond`` per block, so a dropped block costs
  nothing and one block body is compiled per run instead of per block (ResNet-110: 0.8 s instead
  of 4.6 s). Each step slices its weights out of the stacked arrays, a copy that costs more than
  the ``cond``s save at batch 1 (2.4 against 2.1 ms for ResNet-110 at 35% kept); at the batches
  of 4-16 of grouped inference they are even."""
  resnet.check_policy(policy, images.shape[0], spec.num_blocks)
  x = resnet.apply_stem(spec, stacked_variables, images)
  keep = policy > 0.5
  for first, length in block_runs(spec):
    if length == 1:
      x = gated_block(spec, stacked_variables, first, x, policy[:, first])
    else:
      runs = {col: tree[f"block{first}"] for col, tree in stacked_variables.items()
              if f"block{first}" in tree}
      x = _looped_run(spec, runs, first, x, keep[:, first:first + length])
  return resnet.apply_head(spec, stacked_variables, x)


@dataclasses.dataclass(frozen=True)
class Packing:
  """Where each leaf of a packed variables tree lives: static, so it is a ``jit`` argument."""

  treedef: Any
  shapes: tuple[tuple[int, ...], ...]
  in_vector: tuple[bool, ...]  # float32 leaves of at most one dimension: BN statistics, biases


def pack(variables) -> tuple[tuple, Packing]:
  """``variables`` as (one vector of every small float32 leaf, the other leaves), and its
  ``Packing``.

  Each array passed to a compiled function costs dispatch time: with ResNet-110's 547 leaves a
  call spent about 0.2 ms before computing anything (2-core CPU), a tenth of what one image
  at batch 1 takes with 35% of the blocks. Packed, it passes 111 arrays, and ``unpack``'s slices
  of the vector inside ``jit`` give the same values (though each runs as an operation of its
  own unless the weights are compiled in, as ``Runner`` does)."""
  leaves, treedef = jax.tree.flatten(variables)
  in_vector = tuple(np.ndim(leaf) <= 1 and leaf.dtype == jnp.float32 for leaf in leaves)
  vector = _concatenate([leaf for leaf, small in zip(leaves, in_vector) if small])
  # On the device once: host (numpy) weights would otherwise be copied at every call.
  rest = jax.device_put(tuple(leaf for leaf, small in zip(leaves, in_vector) if not small))
  return (vector, rest), Packing(treedef, tuple(np.shape(leaf) for leaf in leaves), in_vector)


@jax.jit
def _concatenate(leaves):
  return jnp.concatenate([jnp.ravel(leaf) for leaf in leaves]) if leaves else jnp.zeros((0,))


def unpack(packed, packing: Packing):
  """The variables tree of ``pack``'s output (inside ``jit``: slices of the vector)."""
  vector, rest = packed
  rest, offset, leaves = iter(rest), 0, []
  for shape, small in zip(packing.shapes, packing.in_vector):
    if small:
      size = int(np.prod(shape))
      leaves.append(jax.lax.slice(vector, (offset,), (offset + size,)).reshape(shape))
      offset += size
    else:
      leaves.append(next(rest))
  return jax.tree.unflatten(packing.treedef, leaves)


# What ``Runner`` compiles: the full network and the per-batch modes.
RUNNER_MODES = {"masked": resnet.apply, "batch_skip": batch_skip_apply,
                "looped": looped_skip_apply, "compact": compact.compact_apply}


def _apply_packed(apply, spec: ResNetSpec, packing: Packing, packed, images, policy):
  """``apply``'s logits from packed weights."""
  return apply(spec, unpack(packed, packing), images, policy)


class Runner:
  """Compiled inference of one network for repeated calls (batch 1, a stream of batches):
  ``Runner(mode, spec, variables)(images, policy)`` with ``mode`` one of ``RUNNER_MODES``;
  "masked" with ``policy=None`` is the full network. At batch 1 "batch_skip" and "looped" run
  exactly the image's own blocks: "batch_skip" is the faster on CPU, "looped" (fewer kernel
  launches) on a GPU.

  The weights are compiled into the program: packed once and closed over by the jitted function,
  so a call passes only the images and the policy. JAX 0.10 embeds closed-over arrays in the
  program as constants, and XLA then does ahead of time what it otherwise does at every call:
  unpacking the weights and each BatchNorm's per-channel factors, which ``batch_skip`` needs
  before each block's ``cond`` (about 0.1 ms per call on ResNet-110, 5% of an image at batch 1
  and 35% kept). JAX versions that pass closed-over arrays as hidden arguments instead pass about
  110 arrays, hence the packing. Each ``Runner`` compiles its own program, once per image shape,
  holding a copy of the weights."""

  def __init__(self, mode: str, spec: ResNetSpec, variables):
    if mode not in RUNNER_MODES:
      raise ValueError(f"unknown execution mode {mode!r} for a Runner; choose one of "
                       f"{tuple(RUNNER_MODES)}")
    packed, packing = pack(stack_runs(spec, variables) if mode == "looped" else variables)
    self._apply = compilation.jit(
        functools.partial(_apply_packed, RUNNER_MODES[mode], spec, packing, packed))

  def __call__(self, images, policy: Optional[Any] = None):
    return self._apply(images, policy)


def bucket_sizes(max_batch: int, smallest: int = 1, growth: int = 2) -> tuple[int, ...]:
  """``smallest`` times powers of ``growth`` below ``max_batch``, then ``max_batch``: few sizes,
  so few compilations (``plan_batches`` cuts groups into them exactly)."""
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


def plan_batches(groups: Sequence[np.ndarray], buckets: Sequence[int]) -> list[np.ndarray]:
  """Cuts each group into chunks whose sizes are bucket sizes, largest first (a group of 23 with
  buckets 1, 4, 16 runs as 16 + 4 + 1 + 1 + 1): no padding, and only bucket-sized batches are
  ever compiled. ``buckets`` must include 1."""
  assert buckets[0] == 1, "the smallest bucket must be 1 so that every group splits exactly"
  plan = []
  for group in groups:
    start = 0
    while start < len(group):
      size = max(b for b in buckets if b <= len(group) - start)
      plan.append(group[start:start + size])
      start += size
  return plan


# The largest batch of one policy group. On a 2-core CPU, ResNet-110 with 4 policies over 256
# images (groups of about 64) ran about 3% slower with batches of up to 32 and 12% slower with
# batches of up to 64.
GROUP_BATCH = 16


def share_out(costs: Sequence[float], workers: int) -> list[list[int]]:
  """Indices of ``costs`` dealt to ``workers`` shares of about equal total cost: each next
  largest to the share that has least so far, so the shares finish together."""
  shares, totals = [[] for _ in range(workers)], [0.0] * workers
  for index in sorted(range(len(costs)), key=lambda i: -costs[i]):
    lightest = totals.index(min(totals))
    shares[lightest].append(index)
    totals[lightest] += costs[index]
  return shares


class GroupedExecutor:
  """Policy-grouped batched inference with one compilation.

  ``GroupedExecutor(spec, variables)(images, policies)`` returns the logits of every image in
  input order, equal to masked execution. Images are grouped by policy vector and each group is
  cut into batches of bucket sizes (``plan_batches``: powers of ``growth`` up to ``max_batch``),
  each of which runs only its group's blocks (``looped_skip_apply``).

  A call runs as ``workers`` programs, not one per batch: each program gets every image (sorted
  by group, on the device once) and a table of its share of the batches (``share_out``: shares
  of about equal work), and runs, per bucket size, a loop over its batches of that size. So one
  compilation serves every plan of up to the same number of images (a power of 2), a call costs
  ``workers`` dispatches, and the shares end together. The programs run at once, each called
  from its own thread: XLA:CPU runs one call at a time per calling thread, and a call on a few
  images leaves cores idle. The price is memory: a call holds a sorted copy of its images, padded
  to that power of 2, on the host and on the device. The weights are laid out and packed once,
  when the executor is built. ``trace_count`` counts compilations."""

  def __init__(self, spec: ResNetSpec, variables, max_batch: int = GROUP_BATCH, growth: int = 2,
               workers: int = 2):
    if workers < 1:
      raise ValueError(f"workers must be at least 1 (programs in flight at once), got {workers}")
    self.spec = spec
    self.buckets = bucket_sizes(max_batch, 1, growth)
    self.workers = workers
    self.trace_count = 0
    self._packed, packing = pack(stack_runs(spec, variables))
    self._program = compilation.jit(functools.partial(self._share_logits, packing))

  def _first_slots(self, capacity: int) -> np.ndarray:
    """Where each bucket size's batches start in a share's table: room for capacity // size."""
    return np.cumsum([0] + [capacity // size for size in self.buckets])

  def _share_logits(self, packing, packed, images, starts, policy_rows, counts):
    """Logits of one share of the batches, at their rows of the sorted ``images`` (zero
    elsewhere): for bucket size j, the batches in table slots ``first_slots[j]`` onwards,
    ``counts[j]`` of them, each the ``size`` images from row ``starts[slot]`` under
    ``policy_rows[slot]``."""
    self.trace_count += 1  # Python side effect: runs once per trace, not per call
    variables = unpack(packed, packing)
    logits = jnp.zeros((images.shape[0], self.spec.num_classes), jnp.float32)
    first_slots = self._first_slots(images.shape[0])
    for j, size in enumerate(self.buckets):
      def run_batch(i, logits, size=size, slot0=int(first_slots[j])):
        start = starts[slot0 + i]
        batch = jax.lax.dynamic_slice_in_dim(images, start, size)
        policy = jnp.broadcast_to(policy_rows[slot0 + i], (size, policy_rows.shape[1]))
        return jax.lax.dynamic_update_slice_in_dim(
            logits, looped_skip_apply(self.spec, variables, batch, policy).astype(logits.dtype),
            start, 0)

      logits = jax.lax.fori_loop(0, counts[j], run_batch, logits)
    return logits

  def _share_tables(self, share, plan, starts, policies, capacity: int):
    """(starts, policy rows, counts per bucket size) of one share's batches."""
    first_slots = self._first_slots(capacity)
    table_starts = np.zeros(first_slots[-1], np.int32)
    table_rows = np.zeros((first_slots[-1], policies.shape[1]), np.float32)
    counts = np.zeros(len(self.buckets), np.int32)
    for b in share:
      j = self.buckets.index(len(plan[b]))
      slot = first_slots[j] + counts[j]
      table_starts[slot], table_rows[slot] = starts[b], policies[plan[b][0]]
      counts[j] += 1
    return table_starts, table_rows, counts

  def __call__(self, images: np.ndarray, policies: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    policies = np.asarray(policies, np.float32)
    plan = plan_batches(group_by_policy(policies), self.buckets)
    order = np.concatenate(plan)
    # A power of 2, so that calls of different sizes share few compilations.
    capacity = max(1 << (len(images) - 1).bit_length(), self.buckets[-1])
    in_group_order = np.zeros((capacity,) + images.shape[1:], images.dtype)
    in_group_order[:len(images)] = images[order]
    in_group_order = jax.device_put(in_group_order)  # once, for every program
    starts = np.cumsum([0] + [len(batch) for batch in plan])[:-1]
    work = [len(batch) * (1 + policies[batch[0]].sum()) for batch in plan]  # images x blocks
    tables = [self._share_tables(share, plan, starts, policies, capacity)
              for share in share_out(work, self.workers) if share]

    def share_logits(table):
      return np.asarray(self._program(self._packed, in_group_order, *table))

    if len(tables) == 1:
      shares = [share_logits(tables[0])]
    else:
      with concurrent.futures.ThreadPoolExecutor(len(tables)) as pool:
        shares = list(pool.map(share_logits, tables))
    in_group_logits = sum(shares)[:len(images)]  # each row is one share's, zero in the others
    logits = np.empty_like(in_group_logits)
    logits[order] = in_group_logits
    return logits
