"""Short-run BlockDrop: the original's settings against the switches beyond it, over seeds and
penalties, each run judged against its references on the test images.

  python benchmarks/recipe_sweep.py --config configs/quickstart.py --variants recipe \
      --seeds 0,1,2 --workdir runs/sweep --out benchmarks/results/recipe_sweep.md
  python benchmarks/recipe_sweep.py --config configs/quickstart.py \
      --set base.checkpoint=akamaster/resnet32 --variants recipe --seeds 0 \
      --penalties=-0.3/-0.6,-0.5/-1,-1/-2 --workdir runs/sweep_r32 \
      --out benchmarks/results/tradeoff_r32.md --figure docs/figures/tradeoff_r32.png

Each run is ``train.py`` then ``evaluate.py --baselines --json`` (subprocesses, as a user runs
them); a finished run is evaluated again, not retrained, so an interrupted sweep resumes. The table
gives per variant and penalty the mean and spread over seeds of BlockDrop's test accuracy, blocks
and FLOPs/img (policy network included), and the references: the pretrained ResNet (every block),
FirstK and RandomK at the same mean blocks. ``--figure`` draws accuracy against FLOPs for every run
beside FirstK and RandomK curves of the pretrained ResNet.
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

# Each variant: a config variant (configs/default.py) and overrides on top of it. "original" is
# the original's behaviour.
VARIANTS = {
    "original": ("", []),
    "recipe": ("recipe", []),
    # The recipe with the policy on the 2x average-pooled image (a quarter of its FLOPs).
    "recipe_pooled": ("recipe", ["--config.policy_input_pool=2"]),
}


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
  references = result["baselines"]
  k = int(round(result["blocks_mean"]))
  return {"accuracy": result["accuracy"], "blocks": result["blocks_mean"],
          "flops": result["flops_mean"], "num_blocks": result["num_blocks"],
          "pretrained": references["pretrained"]["accuracy"],
          "pretrained_flops": references["pretrained"]["flops_mean"],
          "first_k": references[f"first{k}"]["accuracy"],
          "random_k": references[f"random{k}"]["accuracy"]}


def meets_targets(r: dict) -> bool:
  """Within 1.5 points of the pretrained ResNet, at most 90% of its blocks, at or above FirstK
  and RandomK at the same mean blocks."""
  return (r["accuracy"] >= r["pretrained"] - 0.015 and r["blocks"] <= 0.9 * r["num_blocks"]
          and r["accuracy"] >= max(r["first_k"], r["random_k"]))


def table(rows: dict) -> str:
  def spread(values, scale=1.0, digits=1):
    values = scale * np.asarray(values)
    return f"{values.mean():.{digits}f} \u00b1 {values.std():.{digits}f}"

  lines = ["| variant | penalty | seeds | accuracy % | blocks | FLOPs/img (policy incl.) / "
           "pretrained | pretrained % | FirstK % | RandomK % | runs meeting the targets |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for (variant, penalty), runs in rows.items():
    get = lambda key: [r[key] for r in runs]
    lines.append(
        f"| {variant} | {penalty} | {len(runs)} | {spread(get('accuracy'), 100)} | "
        f"{spread(get('blocks'), digits=2)} / {runs[0]['num_blocks']} | "
        f"{spread(np.divide(get('flops'), get('pretrained_flops')), digits=3)} | "
        f"{100 * runs[0]['pretrained']:.1f} | {spread(get('first_k'), 100)} | "
        f"{spread(get('random_k'), 100)} | {sum(map(meets_targets, runs))}/{len(runs)} |")
  return "\n".join(lines)


def figure(rows: dict, config: str, data: str, path: str) -> None:
  """Accuracy against FLOPs/img: every run, and FirstK/RandomK curves of the pretrained ResNet."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from blockdrop_jax import configs, data as data_lib, evaluation, trainer, steps

  spec, variables = trainer.starting_resnet(configs.load(config))
  nets = steps.Nets(spec)
  params, stats = {"resnet": variables["params"]}, {"resnet": variables["batch_stats"]}
  dataset = data_lib.load_dataset(data)
  K = spec.num_blocks
  ks = sorted({int(k) for k in np.linspace(K // 3, K, 8).round()})
  curves = {"FirstK": [], "RandomK": []}
  for k in ks:
    reports = evaluation.fixed_k_reports(nets, params, stats, dataset, k, progress=False)
    curves["FirstK"].append((reports[f"first{k}"]["flops_mean"], reports[f"first{k}"]["accuracy"]))
    curves["RandomK"].append((reports[f"random{k}"]["flops_mean"],
                              reports[f"random{k}"]["accuracy"]))
  fig, ax = plt.subplots(figsize=(6.5, 4.5))
  for name, points in curves.items():
    ax.plot(*zip(*[(f, 100 * a) for f, a in points]), "--o", ms=3, label=name)
  for (variant, penalty), runs in rows.items():
    ax.scatter([r["flops"] for r in runs], [100 * r["accuracy"] for r in runs], s=30, zorder=3,
               label=f"BlockDrop {variant}, penalty {penalty}")
  ax.scatter([curves["FirstK"][-1][0]], [100 * curves["FirstK"][-1][1]], marker="*", s=160,
             c="k", zorder=4, label=f"pretrained {spec.name}")
  ax.set(xlabel="FLOPs per image (BlockDrop: policy network included)",
         ylabel="test accuracy (%)", title=f"{spec.name}: accuracy against computation")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", required=True)
  parser.add_argument("--variants", default="original,recipe",
                      help=f"comma-separated, of {', '.join(VARIANTS)}")
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--penalties", default="",
                      help="comma-separated CURRICULUM/FINETUNE penalty pairs, e.g. "
                      "-0.5/-1,-1/-2 (default: the config's)")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="a config override for every run (repeat the flag)")
  parser.add_argument("--workdir", required=True, help="one sub-folder per run")
  parser.add_argument("--data", default=None, help="test images (default: the config's)")
  parser.add_argument("--out", default=None, help="also write the table here (Markdown)")
  parser.add_argument("--figure", default=None, help="the trade-off figure (PNG)")
  args = parser.parse_args(argv)
  from blockdrop_jax import configs

  variants = args.variants.split(",")
  penalties = [p for p in args.penalties.split(",") if p] or [None]
  if unknown := [v for v in variants if v not in VARIANTS]:
    parser.error(f"unknown variant {unknown[0]!r}; use {', '.join(VARIANTS)}")
  if bad := [p for p in penalties if p is not None and p.count("/") != 1]:
    parser.error(f"--penalties {bad[0]!r}: give CURRICULUM/FINETUNE pairs, e.g. -0.5/-1")
  data = args.data or configs.load(args.config).data.test
  rows = {}
  for variant in variants:
    config_variant, variant_overrides = VARIANTS[variant]
    config = f"{args.config}:{config_variant}" if config_variant else args.config
    for penalty in penalties:
      label = penalty or "config"
      runs = []
      for seed in (int(s) for s in args.seeds.split(",")):
        overrides = [*variant_overrides, *(f"--config.{kv}" for kv in args.set),
                     f"--config.seed={seed}"]
        if penalty is not None:
          curriculum_penalty, finetune_penalty = penalty.split("/")
          overrides += [f"--config.curriculum.penalty={curriculum_penalty}",
                        f"--config.finetune.penalty={finetune_penalty}"]
        name = f"{variant}_p{label.replace('/', '_')}_s{seed}"
        runs.append(run_one(config, overrides, os.path.join(args.workdir, name), data))
        print(name, json.dumps(runs[-1]), flush=True)
      rows[(variant, label)] = runs
  command = " ".join(sys.argv[1:] if argv is None else argv)
  text = "\n".join([f"`python benchmarks/recipe_sweep.py {command}`", "",
                    table(rows)])
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")
  if args.figure:
    figure(rows, args.config, data, args.figure)


if __name__ == "__main__":
  main()
