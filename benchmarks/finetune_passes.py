"""Masked against compact finetuning on the main job: the same runs, seeds and curriculum, but for
``finetune.passes``, whose BatchNorm statistics differ where the policy drops blocks.

  python benchmarks/finetune_passes.py --seeds 0,1 --workdir runs/finetune_passes \
      --out benchmarks/results/finetune_passes_r56.md

Each run is ``train.py --config quickstart:recipe`` (ResNet-56 on the offline subset) with
``--config.finetune.passes`` masked or compact and validation every epoch; a finished run is
read again, not retrained. The table gives, per seed and finetuning epoch, the validation accuracy
and blocks per image of the greedy policy and the sampled policies' training accuracy and blocks;
then each run's test accuracy and blocks at its last epoch. Speed is measured apart, by
``benchmarks/train_speed.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PASSES = ("masked", "compact")


def finetune_records(config: str, passes: str, seed: int, workdir: str) -> list[dict]:
  """The finetuning epochs' records of one run, trained unless it has finished."""
  metrics = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(os.path.join(workdir, "finished")):
    subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), f"--config={config}",
                    f"--workdir={workdir}", "--noprogress", f"--config.finetune.passes={passes}",
                    f"--config.seed={seed}", "--config.eval_every=1"],
                   check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    open(os.path.join(workdir, "finished"), "w").close()
  with open(metrics) as f:
    records = [json.loads(line) for line in f.read().splitlines()]
  return [r for r in records if r["stage"] == "finetune"]


def table(runs: dict) -> list[str]:
  """Markdown lines: per seed and epoch, masked beside compact."""
  lines = ["| seed | epoch | val accuracy masked / compact | val blocks masked / compact | "
           "train accuracy (sampled) masked / compact | train blocks (sampled) masked / compact |",
           "|---|---|---|---|---|---|"]
  pairs = lambda records, key, fmt: " / ".join(format(r[key], fmt) for r in records)
  for seed in sorted({seed for seed, _ in runs}):
    for epoch_records in zip(*(runs[(seed, p)] for p in PASSES)):
      lines.append(
          f"| {seed} | {epoch_records[0]['epoch']} | "
          f"{pairs(epoch_records, 'val_accuracy', '.3f')} | "
          f"{pairs(epoch_records, 'val_blocks_mean', '.2f')} | "
          f"{pairs(epoch_records, 'train_accuracy_sampled', '.3f')} | "
          f"{pairs(epoch_records, 'train_blocks_sampled', '.2f')} |")
  lines += ["", "| seed | passes | test accuracy | test blocks | val accuracy |", "|---|---|---|---|---|"]
  for (seed, passes), records in sorted(runs.items()):
    last = records[-1]
    lines.append(f"| {seed} | {passes} | {last['test_accuracy']:.3f} | "
                 f"{last['test_blocks_mean']:.2f} | {last['val_accuracy']:.3f} |")
  return lines


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="quickstart:recipe")
  p.add_argument("--seeds", default="0")
  p.add_argument("--workdir", default="runs/finetune_passes")
  p.add_argument("--out", help="also write the table to this file")
  args = p.parse_args(argv)
  runs = {}
  for seed in (int(s) for s in args.seeds.split(",")):
    for passes in PASSES:
      runs[(seed, passes)] = finetune_records(args.config, passes, seed,
                                              os.path.join(args.workdir, f"{passes}_s{seed}"))
  text = "\n".join([f"`{' '.join(sys.argv)}`", ""] + table(runs)) + "\n"
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
