"""What a BlockDrop run is set against, computed one way for ``evaluate.py --baselines``, the
report and every benchmark.

One weight convention: ``pretrained`` is the ResNet the run started from, every block; every
other reference runs the run's own final ResNet weights under a fixed policy (the policy network
is not run, so its FLOPs are not counted):
- ``full``: every block;
- ``first{k}``: the first k blocks for every image (the paper's FirstK);
- ``random{k}``: k blocks drawn at random for each image (RandomK);
- ``static{k}``: the best fixed subset of k blocks, found by greedy backward elimination on
  selection images (the run's validation split), the strongest simple static reference;
- ``mode``: the run's own most frequent greedy policy on the selection images, for every image:
  what per-image decisions must beat.
k is the run's mean blocks per image, rounded.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import optax

from blockdrop_jax import evaluation, execution, steps
from blockdrop_jax.data import Dataset
from blockdrop_jax.models import resnet


def greedy_elimination(nets: steps.Nets, params, stats, selection: Dataset, smallest: int,
                       batch_size: int = 250, progress: bool = False) -> dict[int, np.ndarray]:
  """Fixed subsets of blocks, {k: keep (K,) float32} for k from K down to ``smallest``: starting
  from every block, each round drops the block whose removal raises the mean cross-entropy on the
  ``selection`` images least. Every round evaluates all K candidates (a kept block dropped, or
  nothing where the block is already gone), so the shapes, and the compilation, stay the same."""
  K, n = nets.resnet.num_blocks, len(selection)
  keep = np.ones(K, np.float32)
  subsets = {K: keep.copy()}
  images = np.concatenate([selection.images[:]] * K)
  labels = np.asarray(selection.labels)
  for k in range(K - 1, max(smallest, 0) - 1, -1):
    candidates = np.repeat(keep[None], K, 0) * (1 - np.eye(K, dtype=np.float32))
    candidates[keep == 0] = 0.0  # already dropped: its rows run no block
    policies = np.repeat(candidates, n, axis=0)
    logits = evaluation.resnet_logits(nets, params, stats, Dataset(images, np.tile(labels, K),
                                                                   selection.num_classes, ""),
                                      policies, batch_size, progress)
    losses = np.asarray(optax.softmax_cross_entropy_with_integer_labels(
        logits.reshape(K, n, -1), labels[None])).mean(1)
    losses[keep == 0] = np.inf
    keep[int(np.argmin(losses))] = 0.0
    subsets[k] = keep.copy()
  return subsets


def most_frequent_policy(policies: np.ndarray) -> np.ndarray:
  """The row that occurs most often in ``policies`` (N, K)."""
  policies = np.asarray(policies)
  return (policies[execution.group_by_policy(policies)[0][0]] > 0.5).astype(np.float32)


def fixed_k_policies(n: int, K: int, k: int, seed: int = 0) -> dict[str, np.ndarray]:
  """The paper's baselines at k blocks as (n, K) policies: ``first{k}`` and ``random{k}``."""
  first = np.broadcast_to((np.arange(K) < k).astype(np.float32), (n, K))
  rng = np.random.default_rng(seed)
  random = np.zeros((n, K), np.float32)
  for row in random:
    row[rng.choice(K, k, replace=False)] = 1.0
  return {f"first{k}": first, f"random{k}": random}


def _without_policies(report: dict) -> dict:
  return {key: value for key, value in report.items() if key != "policies"}


def references(nets: steps.Nets, params, stats, dataset: Dataset, mean_blocks: float,
               selection: Optional[Dataset] = None,
               pretrained: Optional[tuple[resnet.ResNetSpec, dict]] = None,
               batch_size: int = 250, seed: int = 0, progress: bool = False,
               more_static: tuple[int, ...] = (), mode: bool = True) -> dict:
  """Reports (as ``evaluation.fixed_policy_report``, without per-image policies) of every
  reference above on ``dataset``, at k = round(``mean_blocks``). ``static{k}`` and ``mode`` need
  ``selection`` images; ``pretrained`` is the starting ResNet's (spec, variables);
  ``more_static``: more subset sizes, above k, to report ``static{size}`` for (the elimination
  passes them on its way down to k); ``mode``: whether the run has a policy of its own."""
  K, n = nets.resnet.num_blocks, len(dataset)
  k = int(round(mean_blocks))

  def report(policies, on=(nets, params, stats)):
    return _without_policies(evaluation.fixed_policy_report(*on, dataset, policies, batch_size,
                                                            progress))

  def everywhere(keep):
    return np.broadcast_to(np.asarray(keep, np.float32), (n, K))

  out = {}
  if pretrained is not None:
    spec, variables = pretrained
    out["pretrained"] = report(everywhere(np.ones(K)), (
        steps.Nets(spec), {"resnet": variables["params"]}, {"resnet": variables["batch_stats"]}))
  out["full"] = report(everywhere(np.ones(K)))
  out.update({name: report(p) for name, p in fixed_k_policies(n, K, k, seed).items()})
  if selection is not None:
    subsets = greedy_elimination(nets, params, stats, selection, k, batch_size)
    for size in sorted({k, *(s for s in more_static if k < s <= K)}):
      out[f"static{size}"] = {**report(everywhere(subsets[size])), "blocks": _names(subsets[size])}
    if mode:
      chosen = evaluation.blockdrop_report(nets, params, stats, selection, batch_size,
                                           progress=False)["policies"]
      frequent = most_frequent_policy(np.asarray(chosen))
      out["mode"] = {**report(everywhere(frequent)), "blocks": _names(frequent)}
  return out


def _names(keep: np.ndarray) -> list[int]:
  """The kept blocks of a fixed policy, by index."""
  return [int(t) for t in np.flatnonzero(np.asarray(keep) > 0.5)]


def format_references(refs: dict) -> str:
  """One line per reference."""
  return "\n".join(f"{name}: Accuracy: {r['accuracy']:.3f}  Blocks: {r['blocks_mean']:.2f}  "
                   f"FLOPs/img: {r['flops_mean']:.2E}" for name, r in refs.items())
