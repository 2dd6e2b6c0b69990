"""Evaluate a ResNet (PyTorch file, safetensors export) on a CIFAR split.

  python evaluate.py --checkpoint resnet32.th --data ../shared/data/cifar10/subset/test_batch_first1000.bin
"""

from __future__ import annotations

import argparse
import sys

from blockdrop_jax import cli


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--checkpoint", required=True,
                 help="PyTorch .th/.pt state dict, our .safetensors export, or a training workdir")
  p.add_argument("--data", required=True,
                 help="record file (.bin), CIFAR folder, or TFDS name (cifar10, cifar100)")
  p.add_argument("--split", default="test", help="split for folders and TFDS (train/test)")
  p.add_argument("--dataset", choices=("cifar10", "cifar100"), default=None,
                 help="record format of a single file (default cifar10)")
  p.add_argument("--data-dir", default=None, help="TFDS data_dir")
  p.add_argument("--download", action="store_true", help="let TFDS download")
  p.add_argument("--arch", default=None, help="override the architecture inferred from the keys")
  p.add_argument("--shortcut", default=None, choices=("A", "avgpool", "projection"),
                 help="override the shortcut kind inferred from the keys")
  p.add_argument("--batch-size", type=int, default=250)
  p.add_argument("--json", default=None, help="write accuracy and per-image predictions here")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  with cli.user_errors():
    from blockdrop_jax import convert, data, evaluation
    spec, variables = convert.load_pretrained(args.checkpoint, args.arch, args.shortcut)
    dataset = data.load_dataset(args.data, args.split, args.dataset, args.data_dir, args.download)
    result = evaluation.evaluate_resnet(spec, variables, dataset, args.batch_size)
    result.update(checkpoint=args.checkpoint, data=dataset.source, arch=spec.name,
                  shortcut=spec.shortcut, num_blocks=spec.num_blocks)
    print(f"{spec.name} on {dataset.source}: Accuracy: {result['accuracy']:.4f} "
          f"({result['correct']}/{result['n']})")
    if args.json:
      cli.write_json(args.json, result)
  return 0


if __name__ == "__main__":
  sys.exit(main())
