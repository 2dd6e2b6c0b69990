"""Train BlockDrop: a chain of stages (pretrain, curriculum, finetune) in one resumable workdir.

  python train.py --config configs/akamaster_r32_subset.py[:smoke] --workdir runs/r32 \
      [--config.finetune.penalty=-10 ...]

Running the same command again resumes where the run stopped.
"""

from __future__ import annotations

import argparse
import os
import sys

from blockdrop_jax import cli


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", required=True, help="configs/NAME.py, optionally :VARIANT (e.g. :smoke)")
  p.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl and TensorBoard logs")
  p.add_argument("--no-progress", action="store_true", help="no progress bars")
  p.add_argument("--report", action="store_true",
                 help="afterwards, write figures and report.md into WORKDIR/report")
  args, overrides = p.parse_known_args(argv)
  return args, overrides


def main(argv=None) -> int:
  args, overrides = parse_args(argv)
  with cli.user_errors():
    from blockdrop_jax import configs as config_lib, trainer
    config = config_lib.load(args.config, overrides)
    final = trainer.train(config, args.workdir, progress=not args.no_progress)
    print(trainer.final_summary(final, args.workdir))
    if args.report:
      from blockdrop_jax import report
      _, test_ds = trainer.load_data(config)
      path = report.write_report([args.workdir], test_ds, os.path.join(args.workdir, "report"),
                                 config.eval_batch_size)
      print(f"Figures and report: {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
