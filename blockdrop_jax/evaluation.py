"""Batched inference over a dataset and the original ``test.py`` report."""

from __future__ import annotations

import collections
import concurrent.futures
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from blockdrop_jax import compact, compilation, execution, flops, parallel, steps
from blockdrop_jax.data import Dataset, center_crop, to_unit_float
from blockdrop_jax.models import resnet


IN_FLIGHT = 2  # batches computed at once, each called from its own thread


def batched(fn: Callable, arrays: tuple, batch_size: int, desc: str = "evaluating",
            progress: bool = True, in_flight: int = IN_FLIGHT) -> list[np.ndarray]:
  """Runs ``fn(*batch)`` over fixed-size batches (the last one padded, so it compiles once),
  ``in_flight`` of them at once from threads: XLA:CPU runs one call per thread at a time and
  leaves cores idle between and inside calls (compact inference at 35% kept, 256 images as two
  batches in flight against one call: ResNet-110 0.85-0.89 against 0.73-0.84 of the FLOPs
  speedup on a 2-core CPU).
  With several devices each batch is split over all of them (every process loads only its own
  rows, ``parallel.process_rows``), and every process gets all the outputs. ``fn``'s weights must
  then be replicated over ``parallel.data_mesh()`` (``on_every_device``).
  At most ``in_flight`` batches wait, so memory stays bounded on streamed datasets."""
  n = len(arrays[0])
  mesh, rows = None, None
  if jax.device_count() > 1:
    mesh = parallel.data_mesh()
    batch_size = -(-batch_size // jax.device_count()) * jax.device_count()
    rows = parallel.process_rows(mesh, batch_size)
    if jax.process_count() > 1:  # every process must start the same computations in one order
      in_flight = 1

  def run(chunk, valid):
    if mesh is None:
      out = fn(*chunk)
    else:
      out = multihost_utils.process_allgather(fn(*parallel.global_batch(mesh, batch_size, *chunk)),
                                              tiled=True)
    return jax.tree.map(lambda r: np.asarray(r)[:valid], out)

  outputs, pending = [], collections.deque()
  with concurrent.futures.ThreadPoolExecutor(in_flight) as pool, tqdm(
      total=n, desc=desc, unit="image", disable=not progress, leave=False) as bar:
    for start in range(0, n, batch_size):
      valid = min(batch_size, n - start)
      indices = np.minimum(np.arange(start, start + batch_size), start + valid - 1)  # pad: repeat
      if rows is not None:
        indices = indices[rows]
      pending.append((valid, pool.submit(run, [a[indices] for a in arrays], valid)))
      while len(pending) > in_flight or (pending and start + batch_size >= n):
        valid, future = pending.popleft()
        outputs.append(future.result())
        bar.update(valid)
  return jax.tree.map(lambda *rs: np.concatenate(rs), *outputs)


def on_every_device(params, stats):
  """Weights replicated over ``parallel.data_mesh()``, as ``batched``'s functions take them."""
  return parallel.replicate(jax.device_get((params, stats)), parallel.data_mesh())


def evaluate_resnet(spec: resnet.ResNetSpec, variables, dataset: Dataset, batch_size: int = 250,
                    progress: bool = True) -> dict:
  """Accuracy and per-image predictions of the full (ungated) ResNet."""
  nets = steps.Nets(spec)
  params, stats = on_every_device({"resnet": variables["params"]},
                                  {"resnet": variables["batch_stats"]})
  logits = batched(lambda x: _resnet_eval(nets, params, stats, x), (dataset.images,),
                   min(batch_size, len(dataset)), progress=progress)
  predictions = logits.argmax(-1)
  return {
      "accuracy": float(np.mean(predictions == dataset.labels)),
      "correct": int(np.sum(predictions == dataset.labels)),
      "n": len(dataset),
      "predictions": predictions.tolist(),
  }


# "auto", the default: compact on CPU, masked on GPU, the fastest there in benchmarks/speed.py.
EVAL_MODES = ("auto", "compact", "grouped", "masked")
_greedy_eval = compilation.jit(steps.greedy_eval, static_argnums=(0, 5))
_resnet_eval = compilation.jit(steps.resnet_eval, static_argnums=(0, 5))
_greedy_policy = compilation.jit(steps.greedy_policy, static_argnums=0)


def blockdrop_report(nets: steps.Nets, params, stats, dataset: Dataset, batch_size: int = 250,
                     k: Optional[int] = None, progress: bool = True, mode: str = "auto",
                     grouped_window: Optional[int] = None,
                     static_keep: Optional[np.ndarray] = None) -> dict:
  """What the original ``test.py`` prints, plus per-image predictions, policies and images/s.

  FLOPs/img counts the policy network and only the blocks each image runs (docs/method.md).
  ``mode`` (``EVAL_MODES``): "compact" and "masked" run policy and ResNet in one compiled
  function, "compact" computing each block only for the images that keep it; "grouped" runs the
  policy first, then each group of images sharing a policy with only its blocks
  (``execution.GroupedExecutor``), grouping within windows of ``grouped_window`` images (default
  8 batches: larger windows make larger groups, and hold that many decoded images in memory).
  The same outputs at different speeds (benchmarks/speed.py). "auto" is compact where that
  pays (``compact.compact_pays``: CPU), else masked; the report's "mode" names the one used.
  A static run (``static_keep``: its fixed subset of blocks, (K,)) runs that subset for every
  image, without the policy network ("mode": "static")."""
  if static_keep is not None:
    policies = np.broadcast_to(np.asarray(static_keep, np.float32),
                               (len(dataset), nets.resnet.num_blocks))
    start = time.perf_counter()
    report = fixed_policy_report(nets, params, stats, dataset, policies, batch_size, progress)
    return {**report, "mode": "static", "images_per_s": len(dataset) / (time.perf_counter() - start)}
  if batch_size < 1 or (grouped_window is not None and grouped_window < 1):
    raise ValueError(f"batch_size ({batch_size}) and grouped_window ({grouped_window}) must be "
                     "at least 1")
  batch_size = min(batch_size, len(dataset))
  mode = compact.resolve_auto(mode)
  params, stats = on_every_device(params, stats)
  start = time.perf_counter()
  if mode in ("compact", "masked"):
    forced = None if k is None else jnp.int32(k)
    logits, policies = batched(
        lambda x: _greedy_eval(nets, params, stats, x, forced, mode == "compact"),
        (dataset.images,), batch_size, progress=progress)
  elif mode == "grouped":
    policies = batched(lambda x: _greedy_policy(nets, params, stats, x, k), (dataset.images,),
                       batch_size, desc="policies", progress=progress)
    variables = jax.device_get({"params": params["resnet"], "batch_stats": stats["resnet"]})
    executor = execution.GroupedExecutor(nets.resnet, variables)
    window = grouped_window or 8 * batch_size

    def window_logits(first):
      images = center_crop(to_unit_float(dataset.images[first:first + window]),
                           nets.resnet.image_size)
      return executor(np.asarray(images), policies[first:first + window])

    logits = np.concatenate([window_logits(first) for first in tqdm(
        range(0, len(dataset), window), desc="groups", unit="window", disable=not progress,
        leave=False)])
  else:
    raise ValueError(f"unknown evaluation mode {mode!r}; use one of {EVAL_MODES}")
  seconds = time.perf_counter() - start
  report = _report(logits, policies, dataset,
                   flops.policy_flops(nets.resnet, nets.policy, policies))
  report.update(mode=mode, images_per_s=len(dataset) / seconds)
  return report


def fixed_policy_report(nets: steps.Nets, params, stats, dataset: Dataset, policies: np.ndarray,
                        batch_size: int = 250, progress: bool = True) -> dict:
  """The same report for given per-image policies (baselines: full network, FirstK, RandomK)."""
  logits = resnet_logits(nets, params, stats, dataset, policies, batch_size, progress)
  return _report(logits, policies, dataset,
                 flops.flops_table(nets.resnet).under(policies))


def resnet_logits(nets: steps.Nets, params, stats, dataset: Dataset, policies: np.ndarray,
                  batch_size: int = 250, progress: bool = True) -> np.ndarray:
  """Logits of the ResNet alone (inference mode) under given per-image policies, each block run
  only for the images that keep it where that pays (``compact.compact_pays``)."""
  only_kept_rows = compact.resolve_auto("auto") == "compact"
  params, stats = on_every_device(params, stats)
  return batched(lambda x, p: _resnet_eval(nets, params, stats, x, p, only_kept_rows),
                 (dataset.images, policies), min(batch_size, len(dataset)), progress=progress)


def _report(logits, policies, dataset: Dataset, per_image_flops) -> dict:
  predictions = logits.argmax(-1)
  blocks = policies.sum(-1)
  confidence = np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1).max(-1))
  return {
      "accuracy": float(np.mean(predictions == dataset.labels)),
      "correct": int(np.sum(predictions == dataset.labels)),
      "n": len(dataset),
      # As the original test.py: torch's (unbiased) std of the blocks, numpy's of the FLOPs.
      "blocks_mean": float(blocks.mean()),
      "blocks_std": float(blocks.std(ddof=1)) if len(blocks) > 1 else 0.0,
      "flops_mean": float(np.mean(per_image_flops)), "flops_std": float(np.std(per_image_flops)),
      "unique_policies": int(len(np.unique(policies, axis=0))),
      "predictions": predictions.tolist(),
      "confidence": confidence.round(5).tolist(),
      "policies": policies.astype(np.int8).tolist(),
  }


def format_report(report: dict) -> str:
  """The original ``test.py`` lines."""
  return "\n".join([
      f"Accuracy: {report['accuracy']:.3f}",
      f"Block Usage: {report['blocks_mean']:.3f} \u00b1 {report['blocks_std']:.3f}",
      f"FLOPs/img: {report['flops_mean']:.2E} \u00b1 {report['flops_std']:.2E}",
      f"Unique Policies: {report['unique_policies']}",
  ])
