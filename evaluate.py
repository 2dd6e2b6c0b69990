"""Evaluate a ResNet or a BlockDrop run on a CIFAR split.

  python evaluate.py --checkpoint resnet32.th --data ../shared/data/cifar10/subset/test_batch_first1000.bin
  python evaluate.py --checkpoint runs/r32 --data ... [--best] [--baselines] [--json out.json]

A PyTorch/safetensors file is evaluated as a full ResNet (accuracy, per-image predictions); a
training workdir as BlockDrop, with the original test.py report (accuracy, block usage, FLOPs/img
with the policy network, unique policies) and per-image policies.
"""

from __future__ import annotations

import argparse
import os
import sys

from blockdrop_jax import cli


def parse_args(argv=None):
  from blockdrop_jax.evaluation import EVAL_MODES
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--checkpoint", required=True,
                 help="PyTorch .th/.pt state dict, our .safetensors export, or a training workdir")
  p.add_argument("--data", required=True,
                 help="record file (.bin), CIFAR folder, image folder (<split>/<class>/*.JPEG), "
                      "or a name (cifar10, cifar100, tfds:cifar10)")
  p.add_argument("--split", default="test", help="split for folders and TFDS (train/test)")
  p.add_argument("--dataset", choices=("cifar10", "cifar100"), default=None,
                 help="record format of a single file (default cifar10)")
  p.add_argument("--data-dir", default=None, help="TFDS data_dir")
  p.add_argument("--download", action="store_true", help="let TFDS download")
  p.add_argument("--arch", default=None, help="override the architecture inferred from the keys")
  p.add_argument("--shortcut", default=None, choices=("A", "avgpool", "projection"),
                 help="override the shortcut kind inferred from the keys")
  p.add_argument("--best", action="store_true", help="workdir: the best checkpoint, not the last")
  p.add_argument("--baselines", action="store_true",
                 help="workdir: also the full network, FirstK and RandomK at the same mean blocks")
  p.add_argument("--mode", choices=EVAL_MODES, default=EVAL_MODES[0],
                 help="workdir: how blocks run (same outputs): compact and grouped run only the "
                      "blocks each image keeps, masked runs all of them; auto: compact on CPU, "
                      "masked on GPU, the fastest there (docs/results.md)")
  p.add_argument("--report", default=None, metavar="DIR",
                 help="workdir: write figures and report.md (what the policy learned) into DIR")
  p.add_argument("--compare", nargs="*", default=[], metavar="WORKDIR",
                 help="with --report: more runs (e.g. other penalties) for the trade-off figure")
  p.add_argument("--batch-size", type=cli.positive_int, default=250)
  p.add_argument("--json", default=None, help="write the results and per-image outputs here")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  with cli.user_errors():
    from blockdrop_jax import convert, data, evaluation, trainer
    dataset = data.load_dataset(args.data, args.split, args.dataset, args.data_dir, args.download)
    if os.path.isdir(args.checkpoint):
      nets, params, stats, meta = trainer.load_run(args.checkpoint, best=args.best)
      result = evaluation.blockdrop_report(nets, params, stats, dataset, args.batch_size,
                                           mode=args.mode)
      print(f"BlockDrop {nets.resnet.name} ({meta['stage']} epoch {meta['epoch']}) on {dataset.source}")
      print(evaluation.format_report(result))
      print(f"Speed: {result['images_per_s']:.1f} images/s ({result['mode']} execution, compilation "
            "included; benchmarks/speed.py measures steady state)")
      if args.baselines:
        result["baselines"] = evaluation.baselines(nets, params, stats, dataset, result["blocks_mean"],
                                                   args.batch_size)
        for name, report in result["baselines"].items():
          print(f"{name}: Accuracy: {report['accuracy']:.3f}  Blocks: {report['blocks_mean']:.2f}  "
                f"FLOPs/img: {report['flops_mean']:.2E}")
      spec = nets.resnet
      if args.report:
        from blockdrop_jax import report
        path = report.write_report([args.checkpoint, *args.compare], dataset, args.report,
                                   args.batch_size)
        print(f"Report: {path}")
    else:
      spec, variables = convert.load_pretrained(args.checkpoint, args.arch, args.shortcut)
      result = evaluation.evaluate_resnet(spec, variables, dataset, args.batch_size)
      print(f"{spec.name} on {dataset.source}: Accuracy: {result['accuracy']:.4f} "
            f"({result['correct']}/{result['n']})")
    result.update(checkpoint=args.checkpoint, data=dataset.source, arch=spec.name,
                  shortcut=spec.shortcut, num_blocks=spec.num_blocks)
    if args.json:
      cli.write_json(args.json, result)
  return 0


if __name__ == "__main__":
  sys.exit(main())
