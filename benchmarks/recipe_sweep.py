"""Short-run BlockDrop against its references, over seeds and block budgets: each run trained
and chosen without the test set, then judged on it.

  python benchmarks/recipe_sweep.py --config quickstart --variants recipe,static \
      --seeds 0,1,2 --workdir runs/sweep --out benchmarks/results/recipe_sweep.md
  python benchmarks/recipe_sweep.py --config quickstart --variants recipe,static \
      --seeds 0,1,2 --budgets 0.6,0.7,0.8,0.9 --workdir runs/tradeoff56 \
      --out benchmarks/results/tradeoff_r56.md --figure docs/figures/tradeoff_r56.png

Each run is ``train.py`` then ``evaluate.py --baselines --json`` (subprocesses, as a user runs
them); a finished run is evaluated again, not retrained, so an interrupted sweep resumes.
Variants: ``recipe`` (BlockDrop, ``:recipe``), ``static`` (the static-subset reference at the same
training cost, ``:recipe,static``: the same finetuning of the ResNet alone under the best fixed
subset of as many blocks as the budget allows), ``original`` (the original's settings). The table
gives, per variant and budget, the mean and spread over seeds of the test accuracy, the validation
accuracy, blocks per image, FLOPs/img against the pretrained ResNet (policy network included) and
unique policies, and the references at the same mean blocks (``blockdrop_jax/references.py``):
the pretrained ResNet, the best static subset and the run's most frequent policy, FirstK and
RandomK. ``--figure`` draws test accuracy against FLOPs, variant against variant.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Each variant: a config variant (blockdrop_jax/configs/default.py) and overrides on top of it.
VARIANTS = {
    "original": ("", []),
    "recipe": ("recipe", []),
    "static": ("recipe,static", []),
}
TARGET_ACCURACY_DROP, TARGET_FLOPS = 0.015, 0.80


def run_one(config: str, overrides: list[str], workdir: str, data: str) -> dict:
  """``train.py`` then ``evaluate.py --baselines`` on ``config`` (``path[:variant]``)."""
  result_path = os.path.join(workdir, "evaluation.json")
  train = [sys.executable, os.path.join(ROOT, "train.py"), f"--config={config}",
           f"--workdir={workdir}", "--noprogress", *overrides]
  subprocess.run(train, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
  evaluate = [sys.executable, os.path.join(ROOT, "evaluate.py"), f"--checkpoint={workdir}",
              f"--data={data}", "--baselines", f"--json={result_path}"]
  subprocess.run(evaluate, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
  with open(result_path) as f:
    result = json.load(f)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f.read().splitlines()]
  refs = result["baselines"]
  k = int(round(result["blocks_mean"]))
  row = {"accuracy": result["accuracy"], "val_accuracy": records[-1].get("val_accuracy", np.nan),
         "blocks": result["blocks_mean"], "blocks_std": result["blocks_std"],
         "unique": result["unique_policies"], "flops": result["flops_mean"],
         "num_blocks": result["num_blocks"], "pretrained": refs["pretrained"]["accuracy"],
         "pretrained_flops": refs["pretrained"]["flops_mean"],
         "train_seconds": sum(record["train_seconds"] for record in records)}
  for name, key in (("first_k", f"first{k}"), ("random_k", f"random{k}"),
                    ("static_k", f"static{k}"), ("mode", "mode")):
    row[name] = refs[key]["accuracy"] if key in refs else np.nan
  return row


def meets_targets(r: dict) -> bool:
  """Within 1.5 points of the pretrained ResNet, at most 80% of its FLOPs (policy included), at
  or above every fixed-policy reference at the same mean blocks."""
  references = [r[key] for key in ("first_k", "random_k", "static_k", "mode")
                if not np.isnan(r[key])]
  return (r["accuracy"] >= r["pretrained"] - TARGET_ACCURACY_DROP
          and r["flops"] <= TARGET_FLOPS * r["pretrained_flops"]
          and r["accuracy"] >= max(references))


def _spread(values, scale=1.0, digits=1) -> str:
  values = scale * np.asarray(values, float)
  if np.all(np.isnan(values)):
    return "-"
  return f"{np.nanmean(values):.{digits}f} \u00b1 {np.nanstd(values):.{digits}f}"


def table(rows: dict) -> str:
  lines = ["| variant | budget | seeds | test accuracy % | val accuracy % | blocks (std in run) | "
           "FLOPs/img / pretrained | unique policies | static(k) % | mode % | FirstK % | "
           "RandomK % | train s | meets the targets |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for (variant, budget), runs in rows.items():
    get = lambda key: [r[key] for r in runs]
    lines.append(
        f"| {variant} | {budget} | {len(runs)} | {_spread(get('accuracy'), 100)} | "
        f"{_spread(get('val_accuracy'), 100)} | {_spread(get('blocks'), digits=2)} "
        f"({_spread(get('blocks_std'), digits=2)}) / {runs[0]['num_blocks']} | "
        f"{_spread(np.divide(get('flops'), get('pretrained_flops')), digits=3)} | "
        f"{_spread(get('unique'), digits=0)} | {_spread(get('static_k'), 100)} | "
        f"{_spread(get('mode'), 100)} | {_spread(get('first_k'), 100)} | "
        f"{_spread(get('random_k'), 100)} | {_spread(get('train_seconds'), digits=0)} | "
        f"{sum(map(meets_targets, runs))}/{len(runs)} |")
  pretrained = next(iter(rows.values()))[0]
  lines += ["", f"Pretrained: {100 * pretrained['pretrained']:.1f}% at "
            f"{pretrained['pretrained_flops']:.3E} FLOPs/img. Per run: "
            + "; ".join(f"{variant} {budget} seed {i}: {100 * r['accuracy']:.1f}% at "
                        f"{r['blocks']:.2f} blocks"
                        for (variant, budget), runs in rows.items() for i, r in enumerate(runs))]
  return "\n".join(lines)


def figure(rows: dict, path: str) -> None:
  """Test accuracy against FLOPs/img (policy network included): each variant's runs, and the
  mean over seeds at each budget joined into a curve; the pretrained ResNet as a star."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6.5, 4.5))
  for variant in dict.fromkeys(v for v, _ in rows):
    budgets = [b for v, b in rows if v == variant]
    runs = [rows[(variant, b)] for b in budgets]
    means = [(np.mean([r["flops"] for r in rs]), 100 * np.mean([r["accuracy"] for r in rs]))
             for rs in runs]
    line, = ax.plot(*zip(*sorted(means)), "-", label=f"{variant} (mean of seeds)")
    ax.scatter([r["flops"] for rs in runs for r in rs],
               [100 * r["accuracy"] for rs in runs for r in rs], s=12, color=line.get_color())
  first = next(iter(rows.values()))[0]
  ax.scatter([first["pretrained_flops"]], [100 * first["pretrained"]], marker="*", s=160, c="k",
             zorder=4, label="pretrained ResNet")
  ax.axvline(TARGET_FLOPS * first["pretrained_flops"], color="grey", ls=":", lw=1)
  ax.axhline(100 * (first["pretrained"] - TARGET_ACCURACY_DROP), color="grey", ls=":", lw=1)
  ax.set(xlabel="FLOPs per image (BlockDrop: policy network included)",
         ylabel="test accuracy (%)", title="BlockDrop against a static subset, same training")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", required=True)
  parser.add_argument("--variants", default="recipe,static",
                      help=f"comma-separated, of {', '.join(VARIANTS)}")
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--budgets", default="",
                      help="comma-separated block budgets (fractions of the blocks; default: the "
                      "config's)")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="a config override for every run (repeat the flag)")
  parser.add_argument("--workdir", required=True, help="one sub-folder per run")
  parser.add_argument("--data", default=None, help="test images (default: the config's)")
  parser.add_argument("--out", default=None, help="also write the table here (Markdown)")
  parser.add_argument("--figure", default=None, help="the trade-off figure (PNG)")
  parser.add_argument("--reuse", default=None, metavar="LOG",
                      help="per-run lines an earlier sweep printed (NAME JSON): the runs named "
                      "there are taken from it, not trained or evaluated again")
  args = parser.parse_args(argv)
  reused = {}
  if args.reuse:
    with open(args.reuse) as f:
      reused = dict(line.split(" ", 1) for line in f.read().splitlines() if line.strip())
  from blockdrop_jax import configs

  variants = args.variants.split(",")
  if unknown := [v for v in variants if v not in VARIANTS]:
    parser.error(f"unknown variant {unknown[0]!r}; use {', '.join(VARIANTS)}")
  budgets = [float(b) for b in args.budgets.split(",") if b] or [None]
  data = args.data or configs.load(args.config).data.test
  rows = {}
  for variant in variants:
    config_variant, variant_overrides = VARIANTS[variant]
    config = f"{args.config}:{config_variant}" if config_variant else args.config
    for budget in budgets:
      label = "config" if budget is None else f"{budget:g}"
      budget_overrides = [] if budget is None else [f"--config.block_budget.fraction={budget}"]
      runs = []
      for seed in (int(s) for s in args.seeds.split(",")):
        overrides = [*variant_overrides, *budget_overrides,
                     *(f"--config.{kv}" for kv in args.set), f"--config.seed={seed}"]
        name = f"{variant}_b{label}_s{seed}"
        runs.append(json.loads(reused[name]) if name in reused else
                    run_one(config, overrides, os.path.join(args.workdir, name), data))
        print(name, json.dumps(runs[-1]), flush=True)
      rows[(variant, label)] = runs
  command = " ".join(sys.argv[1:] if argv is None else argv)
  text = "\n".join([f"`python benchmarks/recipe_sweep.py {command}`", "", table(rows)])
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")
  if args.figure:
    figure(rows, args.figure)


if __name__ == "__main__":
  main()
