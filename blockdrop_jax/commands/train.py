"""Train BlockDrop: a chain of stages (pretrain, curriculum, finetune) in one resumable workdir.

  python train.py --config akamaster_r32_subset[:smoke] --workdir runs/r32 \
      [--config.finetune.penalty=-10 ...] [--report] [--noprogress]

Running the same command again resumes where the run stopped.
"""

from __future__ import annotations

import os

from absl import flags

from blockdrop_jax import cli, configs

CONFIG = configs.define_config_flag()
WORKDIR = flags.DEFINE_string("workdir", None, "checkpoints, metrics.jsonl and TensorBoard logs")
PROGRESS = flags.DEFINE_bool("progress", True, "progress bars (--noprogress: none)")
REPORT = flags.DEFINE_bool("report", False,
                           "afterwards, write figures and report.md into WORKDIR/report, and "
                           "print the references: the pretrained ResNet, FirstK, RandomK, the "
                           "best static subset and the run's most frequent policy")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> int:
  cli.no_positional_arguments(argv)
  from blockdrop_jax import multihost, references, run_inputs, run_log, trainer
  say = print if multihost.is_chief() else lambda *lines: None  # process 0 speaks for all
  config = configs.finalize(CONFIG.value)
  final = trainer.train(config, WORKDIR.value, progress=PROGRESS.value)
  say(run_log.final_summary(final, WORKDIR.value))
  if REPORT.value:
    from blockdrop_jax import report
    test_ds = run_inputs.load_data(config)[2]
    path, refs = report.write_report([WORKDIR.value], test_ds,
                                     os.path.join(WORKDIR.value, "report"), config.eval_batch_size)
    say(references.format_references(refs))
    say(f"Figures and report: {path}")
  return 0


def run() -> None:
  """The program: ``blockdrop-train``, or ``python train.py`` in a checkout."""
  cli.run(main)
