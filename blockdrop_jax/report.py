"""What the policy learned, as figures and a Markdown report.

``write_report`` evaluates one or more BlockDrop runs on a dataset and writes PNG figures plus
``report.md`` linking them: the accuracy/FLOPs trade-off beside the full network, FirstK and
RandomK; blocks used per image (overall and per class); each block's keep rate; images grouped by
their most frequent policies; blocks used against confidence and correctness; training curves;
each block's keep probability and the accuracy over the policy's training.
"""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from blockdrop_jax import (checkpoint, configs, evaluation, execution, flops,  # noqa: E402
                           multihost, references, run_inputs, storage)
from blockdrop_jax.data import Dataset  # noqa: E402

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                   "truck")


def _save(fig, out_dir: str, name: str) -> str:
  fig.tight_layout()
  with (storage.path(out_dir) / name).open("wb") as f:
    fig.savefig(f, dpi=110, format="png")
  plt.close(fig)
  return name


def tradeoff_figure(points: dict, baselines: dict, full_accuracy: float, full_flops: float,
                    out_dir: str) -> str:
  """(a) accuracy against FLOPs/img: each run, the full network, and the FirstK, RandomK and
  static-subset curves ({name: {k: (FLOPs, accuracy)}})."""
  fig, ax = plt.subplots(figsize=(6, 4.2))
  for label, (fl, acc) in points.items():
    ax.scatter(fl, 100 * acc, s=60, zorder=3, label=f"BlockDrop {label}")
  for name, curve in baselines.items():
    ks = sorted(curve)
    ax.plot([curve[k][0] for k in ks], [100 * curve[k][1] for k in ks], "--o", ms=3, label=name)
  ax.scatter([full_flops], [100 * full_accuracy], marker="*", s=160, c="k", zorder=4,
             label="full ResNet")
  ax.set(xlabel="FLOPs per image", ylabel="test accuracy (%)",
         title="Accuracy against computation")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  return _save(fig, out_dir, "tradeoff.png")


def blocks_histogram(blocks: np.ndarray, labels: np.ndarray, class_names, K: int, out_dir: str) -> str:
  """(b) blocks used per image, overall and per class."""
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
  bins = np.arange(K + 2) - 0.5
  ax1.hist(blocks, bins=bins, color="tab:blue")
  ax1.set(xlabel="blocks used", ylabel="images", title="Blocks used per image")
  classes = np.unique(labels)
  data = [blocks[labels == c] for c in classes]
  ax2.boxplot(data, showmeans=True)
  ax2.set_xticks(range(1, len(classes) + 1))
  ax2.set_xticklabels([class_names[c] if c < len(class_names) else str(c) for c in classes],
                      rotation=45, ha="right", fontsize=8)
  ax2.set(ylabel="blocks used", title="Blocks used per class (mean: triangle)")
  return _save(fig, out_dir, "blocks_histogram.png")


def keep_rate_figure(policies: np.ndarray, out_dir: str) -> str:
  """(c) how often each block runs."""
  fig, ax = plt.subplots(figsize=(7, 3.5))
  K = policies.shape[1]
  ax.bar(np.arange(K), policies.mean(0), color="tab:green")
  ax.set(xlabel="block", ylabel="fraction of images running it", title="Keep rate of each block",
         ylim=(0, 1.05))
  ax.set_xticks(np.arange(K))
  ax.tick_params(axis="x", labelsize=7)
  return _save(fig, out_dir, "keep_rate.png")


def policy_gallery(images: np.ndarray, policies: np.ndarray, out_dir: str, groups: int = 4,
                   per_group: int = 8) -> str:
  """(d) test images grouped by their most frequent policy vectors."""
  largest = execution.group_by_policy(policies)[:groups]
  fig, axes = plt.subplots(len(largest), per_group, figsize=(per_group * 1.1, len(largest) * 1.35),
                           squeeze=False)
  for row, group in enumerate(largest):
    bits = "".join("1" if b > 0.5 else "0" for b in policies[group[0]])
    for col in range(per_group):
      ax = axes[row, col]
      ax.axis("off")
      if col < len(group):
        ax.imshow(images[group[col]])
    axes[row, 0].set_title(f"policy {bits} ({len(group)} images)", fontsize=8, loc="left")
  fig.suptitle("Images sharing the most frequent policies", fontsize=10)
  return _save(fig, out_dir, "policy_gallery.png")


def confidence_figure(blocks: np.ndarray, confidence: np.ndarray, correct: np.ndarray,
                      out_dir: str) -> str:
  """(e) blocks used against the prediction's confidence, correct and wrong apart."""
  fig, ax = plt.subplots(figsize=(6, 4))
  jitter = np.random.default_rng(0).uniform(-0.2, 0.2, len(blocks))
  for mask, label, color in ((correct, "correct", "tab:blue"), (~correct, "wrong", "tab:red")):
    ax.scatter(blocks[mask] + jitter[mask], confidence[mask], s=8, alpha=0.5, c=color,
               label=f"{label} ({mask.sum()})")
  ax.set(xlabel="blocks used", ylabel="confidence (max softmax)",
         title="Blocks used against confidence")
  ax.legend()
  return _save(fig, out_dir, "confidence.png")


def training_curves(workdir: str, out_dir: str) -> Optional[str]:
  """(f) train reward and test accuracy/blocks per epoch from the run's metrics.jsonl."""
  records = _records(workdir)
  if not records:
    return None
  fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
  x = np.arange(1, len(records) + 1)
  for ax, key, title in ((axes[0], "train_reward", "train reward (sampled)"),
                         (axes[1], "test_accuracy", "test accuracy"),
                         (axes[2], "test_blocks_mean", "test blocks used")):
    points = [(i, r[key]) for i, r in zip(x, records) if key in r]
    if points:
      ax.plot(*zip(*points), "-o", ms=3)
    for stage_start in [i for i, (a, b) in enumerate(zip(records, records[1:]), 2)
                        if a["stage"] != b["stage"]]:
      ax.axvline(stage_start - 0.5, color="gray", ls=":")
    ax.set(xlabel="epoch (all stages)", title=title)
    ax.grid(alpha=0.3)
  fig.suptitle(f"Training curves of {storage.path(workdir).name}", fontsize=10)
  return _save(fig, out_dir, "training_curves.png")


def _records(workdir: str) -> list[dict]:
  path = storage.path(workdir) / "metrics.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def policy_training_figure(records: Sequence[dict], out_dir: str) -> Optional[str]:
  """(g) the diagnosis of a run: each block's mean sampling probability p' per epoch, and the
  greedy and sampled training accuracy beside the number of blocks the policy controls (k), so
  that what happens at each hand-over of the curriculum shows."""
  records = [r for r in records if "train_keep_probability_0" in r]
  if not records:
    return None
  K = sum(key.startswith("train_keep_probability_") for key in records[0])
  keep = np.array([[r[f"train_keep_probability_{t}"] for r in records] for t in range(K)])
  x = np.arange(1, len(records) + 1)
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 3.8))
  image = ax1.imshow(keep, aspect="auto", cmap="viridis", vmin=0, vmax=1, origin="lower",
                     extent=(0.5, len(records) + 0.5, -0.5, K - 0.5))
  ax1.step(x, [K - 0.5 - r["k"] for r in records], "w--", where="mid", lw=1,
           label="first controlled block")
  fig.colorbar(image, ax=ax1, label="p' (sampling probability)")
  ax1.set(xlabel="epoch (all policy stages)", ylabel="block", title="Keep probability per block")
  ax1.legend(fontsize=7, loc="lower left")
  for key, label in (("train_accuracy_greedy", "greedy (train)"),
                     ("train_accuracy_sampled", "sampled (train)"),
                     ("test_accuracy", "greedy (test)")):
    points = [(i, r[key]) for i, r in zip(x, records) if key in r]
    if points:
      ax2.plot(*zip(*points), "-o", ms=3, label=label)
  ax2.set(xlabel="epoch (all policy stages)", ylabel="accuracy", ylim=(0, 1),
          title="Accuracy as blocks are handed over")
  ax2.grid(alpha=0.3)
  ax2.legend(fontsize=7, loc="lower left")
  blocks = ax2.twinx()
  blocks.step(x, [r["k"] for r in records], "k:", where="mid", label="k")
  blocks.plot(x, [r["train_blocks_greedy"] for r in records], "k-", lw=0.8, label="blocks (greedy)")
  blocks.set(ylabel="blocks", ylim=(0, K + 0.5))
  blocks.legend(fontsize=7, loc="lower right")
  return _save(fig, out_dir, "policy_training.png")


def _reference_curves(nets, params, stats, dataset: Dataset, refs: dict, batch_size: int,
                      progress: bool) -> dict:
  """{name: {k: (FLOPs, accuracy)}} of FirstK and RandomK over six k from 1 to K, and of the
  static subsets in ``refs``."""
  K, n = nets.resnet.num_blocks, len(dataset)
  curves: dict = {"FirstK": {}, "RandomK": {}, "static subset": {}}
  for k in sorted({max(1, min(K, k)) for k in np.linspace(1, K, 6).round().astype(int)}):
    fixed = references.fixed_k_policies(n, K, k)
    for name, key in (("FirstK", f"first{k}"), ("RandomK", f"random{k}")):
      r = evaluation.fixed_policy_report(nets, params, stats, dataset, fixed[key], batch_size,
                                         progress)
      curves[name][k] = (r["flops_mean"], r["accuracy"])
  for name, r in refs.items():
    if name.startswith("static"):
      curves["static subset"][int(name.removeprefix("static"))] = (r["flops_mean"], r["accuracy"])
  return curves


def write_report(runs: Sequence[str], dataset: Dataset, out_dir: str, batch_size: int = 250,
                 class_names: Sequence[str] = CIFAR10_CLASSES,
                 progress: bool = False, best: bool = False) -> tuple[str, dict]:
  """Figures and ``report.md`` for ``runs`` (the first analysed in detail; ``best``: each run's
  best checkpoint); returns its path and the first run's references (``run_references``). Every
  process computes them (over all devices); process 0 alone writes."""
  reports, main = {}, None
  for run in runs:
    nets, params, stats, meta = checkpoint.load_run(run, best=best)
    report = evaluation.blockdrop_report(nets, params, stats, dataset, batch_size, progress=progress,
                                         static_keep=checkpoint.static_keep(meta))
    reports[storage.path(run).name] = report
    if main is None:
      main = (run, nets, params, stats, meta, report)
  run, nets, params, stats, meta, report = main
  K = nets.resnet.num_blocks
  n = len(dataset)
  table = flops.flops_table(nets.resnet)
  k_run = int(round(report["blocks_mean"]))
  refs = run_inputs.run_references(nets, params, stats, meta, dataset, report["blocks_mean"],
                                batch_size, more_static=tuple(range(k_run, K, 2)))
  curves = _reference_curves(nets, params, stats, dataset, refs, batch_size, progress)
  path = os.path.join(out_dir, "report.md")
  if not multihost.is_chief():
    return path, refs
  storage.path(out_dir).mkdir(parents=True, exist_ok=True)
  full = curves["FirstK"][K]
  policies = np.asarray(report["policies"], np.float32)
  blocks = policies.sum(1)
  correct = np.asarray(report["predictions"]) == dataset.labels
  figures = {
      "Accuracy against FLOPs": tradeoff_figure(
          {name: (r["flops_mean"], r["accuracy"]) for name, r in reports.items()}, curves, full[1],
          table.full, out_dir),
      "Blocks used per image": blocks_histogram(blocks, dataset.labels, class_names, K, out_dir),
      "Keep rate of each block": keep_rate_figure(policies, out_dir),
      "Images grouped by policy": policy_gallery(dataset.images, policies, out_dir),
      "Blocks used against confidence": confidence_figure(
          blocks, np.asarray(report["confidence"]), correct, out_dir),
  }
  for title, png in (("Training curves", training_curves(run, out_dir)),
                     ("Policy training", policy_training_figure(_records(run), out_dir))):
    if png:
      figures[title] = png
  held_out = configs.from_json(meta["config"]).data.validation
  chosen_on = (f"its {held_out} validation images" if held_out else
               "its first 500 training images (the run holds no validation images out)")
  lines = [f"# BlockDrop report: {', '.join(reports)}", "",
           f"Data: {dataset.source} ({n} images). `pretrained` is the ResNet "
           f"`{storage.path(run).name}` started from; the other references use its own final "
           "weights with fixed policies: FirstK, RandomK, the best static subsets (`static{k}`) "
           f"and the run's most frequent policy (`mode`), both chosen on {chosen_on}. FLOPs/img of BlockDrop include the policy network.", "",
           "| run | accuracy | blocks | FLOPs/img | unique policies |", "|---|---|---|---|---|"]
  for name, r in {**reports, **refs}.items():
    lines.append(f"| {name} | {100 * r['accuracy']:.1f}% | {r['blocks_mean']:.2f} \u00b1 "
                 f"{r['blocks_std']:.2f} | {r['flops_mean']:.3E} | {r['unique_policies']} |")
  for title, png in figures.items():
    lines += ["", f"## {title}", "", f"![{title}]({png})"]
  (storage.path(out_dir) / "report.md").write_text("\n".join(lines) + "\n")
  return path, refs
