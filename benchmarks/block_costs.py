"""What each residual block of a pretrained ResNet is worth: the accuracy lost when that one
block is dropped for every image, on the training images a policy learns from and on the test
images it is judged on.

  python benchmarks/block_costs.py --base akamaster/resnet56 \
      --data ../shared/data/cifar10/subset/data_batch_1_first4000.bin \
             ../shared/data/cifar10/subset/test_batch_first1000.bin \
      --out benchmarks/results/block_costs_r56.md

A pretrained network has seen its training images, so a block costs less there than on new
images: the gap is what a policy trained on those images cannot see (docs/method.md). Prints (and
with ``--out`` writes) a Markdown table: one row per block, one column per dataset, in points.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from blockdrop_jax import convert, data, evaluation, steps  # noqa: E402


def block_costs(nets: steps.Nets, params, stats, dataset: data.Dataset,
                batch_size: int) -> tuple[float, np.ndarray]:
  """(accuracy of every block, (K,) accuracy lost with each single block dropped)."""
  K = nets.resnet.num_blocks

  def accuracy(dropped=None):
    policies = np.ones((len(dataset), K), np.float32)
    if dropped is not None:
      policies[:, dropped] = 0.0
    return evaluation.fixed_policy_report(nets, params, stats, dataset, policies, batch_size,
                                          progress=False)["accuracy"]

  full = accuracy()
  return full, np.array([full - accuracy(block) for block in range(K)])


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--base", required=True, help="a pretrained ResNet: a file or a known name")
  p.add_argument("--data", nargs="+", required=True, help="datasets (evaluate.py --data forms)")
  p.add_argument("--batch-size", type=int, default=500)
  p.add_argument("--out", help="also write the table here")
  args = p.parse_args(argv)
  spec, variables = convert.load_pretrained(args.base)
  nets = steps.Nets(spec)
  params, stats = {"resnet": variables["params"]}, {"resnet": variables["batch_stats"]}
  columns = []
  for source in args.data:
    dataset = data.load_dataset(source)
    columns.append((os.path.basename(source), *block_costs(nets, params, stats, dataset,
                                                           args.batch_size)))
  lines = [f"`python benchmarks/block_costs.py --base {args.base} --data "
           f"{' '.join(args.data)}`", "",
           f"{spec.name}: accuracy points lost with one block dropped for every image "
           "(stage.block; negative: the network gains)", "",
           "| block | " + " | ".join(f"{name} (all blocks: {100 * full:.1f}%)"
                                     for name, full, _ in columns) + " |",
           "|---|" + "---|" * len(columns)]
  for block, (stage, index, *_) in enumerate(spec.block_layout()):
    lines.append(f"| {block} ({stage + 1}.{index + 1}) | " + " | ".join(
        f"{100 * costs[block]:.1f}" for _, _, costs in columns) + " |")
  table = "\n".join(lines) + "\n"
  print(table)
  if args.out:
    with open(args.out, "w") as f:
      f.write(table)
  return 0


if __name__ == "__main__":
  sys.exit(main())
