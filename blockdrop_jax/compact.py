"""Compact execution: each block computed only for the rows (images) that keep it.

Each block gathers the rows that keep it, runs on only those, in chunks (a loop whose trip count
is a batch-level count; a small remainder in a half chunk), and writes them back in place. All on
device, one compilation, equal to masked execution (every block for every image, the dropped
outputs discarded). Training's curriculum passes (``curriculum_pair``) and batched evaluation
(``compact_apply``) use it where it pays (``compact_pays``); the serving modes are in
``execution``.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

from blockdrop_jax.models import resnet
from blockdrop_jax.models.resnet import ResNetSpec

# Rows per chunk of ``compact`` execution: small enough to waste little on partly kept chunks,
# large enough for efficient convolutions (8-16 were fastest of 8-64 on the 2-core CPU).
COMPACT_CHUNK = 16


def compact_pays(platform: Optional[str] = None) -> bool:
  """Whether compact execution beats masked execution on ``platform`` (default: JAX's backend).

  Measured (docs/results.md): compact pays on the 2-core CPU; on an H200 each chunk's small
  kernels cost more launch time than the skipped work saves (benchmarks/results/speed_h200.md).
  TPUs are unmeasured; masked there too."""
  return (platform or jax.default_backend()) == "cpu"


def resolve_auto(mode: str) -> str:
  """``mode``, with "auto" (the trainer's and evaluate.py's default) made "compact" where compact
  execution pays and "masked" where it does not."""
  if mode == "auto":
    return "compact" if compact_pays() else "masked"
  return mode


# Compact finetuning was faster than masked on the 2-core CPU for ResNet-56 and ResNet-110 at
# batch 128 and 250 while the sampled policies kept at most this share of the blocks (1.07-1.49x
# at 0.37-0.39; ResNet-110 at batch 250 was slower at 0.49: docs/results.md, section 8).
COMPACT_FINETUNE_BELOW = 0.4


def finetune_passes(mode: str, sampled_keep: Optional[float]) -> str:
  """``mode`` of config.finetune.passes, with "auto" made "compact" where compact finetuning pays:
  on a backend where compact execution does (``compact_pays``) and while the sampled policies
  keep at most ``COMPACT_FINETUNE_BELOW`` of the blocks (``sampled_keep``: their last measured
  fraction, None before any)."""
  if mode != "auto":
    return mode
  sparse = sampled_keep is not None and sampled_keep <= COMPACT_FINETUNE_BELOW
  return "compact" if compact_pays() and sparse else "masked"


def _compact_block(spec: ResNetSpec, variables, t: int, x, keep, chunk: int,
                   leading: Optional[tuple[int, Any]] = None):
  """Block t run on only the rows that keep it (``keep``: (rows,) bool, rows a multiple of
  ``chunk``): the kept rows are gathered ``chunk`` at a time, run through the block and written
  back in place, in a loop whose trip count is a batch-level number, so dropped rows cost
  nothing. A remainder of at most ``chunk // 2`` rows runs as one chunk of that size, which halves
  the rows computed in vain (ResNet-110 at 35% kept: 0.81-0.83 -> 0.86 of the FLOPs speedup).
  ``leading`` = (n, run): where ``run`` (a traced bool) holds, the first n rows also run the
  block, as one batch (``keep`` must then be False for them).

  Rows stay in input order, so no other row moves. Inference mode only: BatchNorm in training mode
  would see batch statistics of chunks."""
  kept_first = jnp.argsort(~keep, stable=True)  # row indices, the kept ones first
  # Chunks never overlap, so each row is read before it is written: a block that keeps its
  # input's shape reads its rows from the output being written, which then needs no copy of x.
  reads_output = not resnet.changes_shape(spec, t)

  def run_chunks(out, first_row, count, size):
    def run_chunk(i, out):
      # A partly kept chunk holds dropped rows: each row gets its own kept or dropped value, so
      # rewriting it is harmless.
      rows_of_chunk = jax.lax.dynamic_slice_in_dim(kept_first, first_row + i * size, size)
      dropped, kept = resnet.apply_block(spec, variables, t, (out if reads_output else x)[rows_of_chunk])
      chosen = jnp.where(keep[rows_of_chunk][:, None, None, None], kept, dropped)
      return out.at[rows_of_chunk].set(chosen, unique_indices=True)

    return jax.lax.fori_loop(0, count, run_chunk, out)

  out = resnet.apply_shortcut(spec, variables, t, x)
  if leading is not None:
    rows, run = leading

    def run_leading(_, out):
      kept = resnet.apply_block(spec, variables, t, (out if reads_output else x)[:rows])[1]
      return jax.lax.dynamic_update_slice_in_dim(out, kept, 0, axis=0)

    out = jax.lax.fori_loop(0, run.astype(jnp.int32), run_leading, out)
  kept_rows = jnp.sum(keep)
  half = chunk // 2
  rest = kept_rows % chunk
  small_rest = ((rest > 0) & (rest <= half)).astype(kept_rows.dtype) if half else 0
  chunks = (kept_rows + chunk - 1) // chunk - small_rest
  out = run_chunks(out, 0, chunks, chunk)
  return run_chunks(out, chunks * chunk, small_rest, half) if half else out


def _pad_rows(x, keep, chunk: int):
  """``x`` and ``keep`` padded with dropped rows to a multiple of ``chunk`` rows."""
  pad = -x.shape[0] % chunk
  return (jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)),
          jnp.pad(keep, [(0, pad), (0, 0)], constant_values=False))


def compact_apply(spec: ResNetSpec, variables, images, policy, chunk: int = COMPACT_CHUNK):
  """Logits of [0, 1] images under a per-example ``policy``, each block computed only for the
  images that keep it (rounded up to a multiple of ``chunk``). One compilation for any policy."""
  batch = images.shape[0]
  resnet.check_policy(policy, batch, spec.num_blocks)
  chunk = min(chunk, batch)
  x, keep = _pad_rows(resnet.apply_stem(spec, variables, images), policy > 0.5, chunk)
  for t in range(spec.num_blocks):
    x = _compact_block(spec, variables, t, x, keep[:, t], chunk)
  return resnet.apply_head(spec, variables, x)[:batch]


def curriculum_pair(spec: ResNetSpec, variables, images, greedy, sampled, num_forced,
                    chunk: int = COMPACT_CHUNK):
  """Logits under the curriculum's greedy and sampled policies, which keep the same first
  ``num_forced`` blocks (all of them): the stem and that prefix run once, on the greedy rows;
  then both passes run as one batch of 2 x batch rows in which each block computes only the rows
  that keep it (``_compact_block``). Equal to two masked passes.

  Through the prefix each block runs once on the greedy rows, as one batch, while the sampled rows
  sit idle; they copy the greedy rows where the prefix ends. Both are loops of 0 or 1 trips: a
  ``cond`` per block choosing between a prefix block and a decided one made XLA copy the whole
  activation of 2 x batch rows into it at every block.
  ``num_forced`` may be traced, so one compilation serves the whole curriculum."""
  batch = images.shape[0]
  K = spec.num_blocks
  resnet.check_policy(greedy, batch, K)
  resnet.check_policy(sampled, batch, K)
  chunk = min(chunk, 2 * batch)
  num_forced = jnp.minimum(num_forced, K)
  decided = jnp.arange(K) >= num_forced
  keep = jnp.concatenate([greedy > 0.5, sampled > 0.5]) & decided
  x = resnet.apply_stem(spec, variables, images)
  x, keep = _pad_rows(jnp.concatenate([x, x]), keep, chunk)

  def sampled_rows_from_greedy(_, x):
    return jax.lax.dynamic_update_slice_in_dim(x, x[:batch], batch, axis=0)

  for t in range(K + 1):
    # Where the prefix ends (before block num_forced, or before the head if every block is forced).
    x = jax.lax.fori_loop(0, (t == num_forced).astype(jnp.int32), sampled_rows_from_greedy, x)
    if t < K:
      x = _compact_block(spec, variables, t, x, keep[:, t], chunk, leading=(batch, ~decided[t]))
  logits = resnet.apply_head(spec, variables, x)
  return logits[:batch], logits[batch:2 * batch]
