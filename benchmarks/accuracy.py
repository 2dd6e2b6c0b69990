"""BlockDrop runs against the full pretrained ResNet, FirstK and RandomK, on one test set.

  python benchmarks/accuracy.py --base ../shared/data/pretrained/akamaster_cifar10/resnet32-d509ac18.th \
      --runs runs/r32_cl runs/r32_ft-5 --data ../shared/data/cifar10/subset/test_batch_first1000.bin

For each run: the original test.py numbers (accuracy, blocks, FLOPs/img with the policy network,
unique policies). Baselines use the pretrained base's weights, as in the paper: the full network,
and FirstK / RandomK at k = the run's mean block count rounded (RandomK: a new random set of k
blocks for each image, seed 0). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from blockdrop_jax import checkpoint, convert, data, evaluation, flops, steps  # noqa: E402


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--base", required=True, help="the pretrained ResNet the runs started from")
  p.add_argument("--runs", nargs="+", required=True, help="training workdirs")
  p.add_argument("--data", required=True)
  p.add_argument("--batch-size", type=int, default=250)
  args = p.parse_args(argv)
  dataset = data.load_dataset(args.data)
  spec, base = convert.load_pretrained(args.base)
  base_nets = steps.Nets(spec)
  base_params, base_stats = {"resnet": base["params"]}, {"resnet": base["batch_stats"]}
  K = spec.num_blocks
  full_flops = flops.flops_table(spec).full

  def row(name, report):
    return (f"| {name} | {100 * report['accuracy']:.1f} | {report['blocks_mean']:.2f} \u00b1 "
            f"{report['blocks_std']:.2f} | {report['flops_mean']:.3E} | "
            f"{report['flops_mean'] / full_flops:.0%} | {report['unique_policies']} |")

  print(f"{spec.name} (K = {K}) on {dataset.source} ({len(dataset)} images)\n")
  print("| model | accuracy % | blocks | FLOPs/img | of full | unique policies |")
  print("|---|---|---|---|---|---|")
  n = len(dataset)
  full = evaluation.fixed_policy_report(base_nets, base_params, base_stats, dataset,
                                        np.ones((n, K), np.float32), args.batch_size, progress=False)
  print(row("full ResNet (pretrained)", full))
  for run in args.runs:
    nets, params, stats, meta = checkpoint.load_run(run)
    report = evaluation.blockdrop_report(nets, params, stats, dataset, args.batch_size,
                                         progress=False)
    stage = meta["stage"]
    penalty = json.loads(meta["config"])[stage].get("penalty")
    print(row(f"BlockDrop {stage} (penalty {penalty}) `{os.path.basename(run.rstrip('/'))}`", report))
    k = int(round(report["blocks_mean"]))
    baselines = evaluation.fixed_k_reports(base_nets, base_params, base_stats, dataset, k,
                                           args.batch_size, progress=False)
    print(row(f"FirstK, k = {k}", baselines[f"first{k}"]))
    print(row(f"RandomK, k = {k}", baselines[f"random{k}"]))
  print("\nFLOPs/img of BlockDrop include its policy network "
        f"({flops.flops_table(nets.policy).full:.3E}); baselines have none.")
  return 0


if __name__ == "__main__":
  sys.exit(main())
