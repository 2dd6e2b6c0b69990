"""How long a checkpoint save holds up the training loop: synchronous against asynchronous saves.

  python benchmarks/checkpoint_save.py [--config quickstart:recipe] [--steps_between 2]
      [--repeats 5] [--out benchmarks/results/checkpoint_save_cpu.md]

The main job's state (ResNet-56, policy network, Adam moments; as ``trainer`` builds it) is saved
by ``checkpoint.RunCheckpoints`` inside a loop of real finetuning steps, ``--steps_between`` steps
between saves, once with ``asynchronous=False`` (the state written before the loop goes on) and
once with the default asynchronous saves (the loop goes on once the state is on the host). The
two take turns within each repeat; per mode, the median seconds that ``save`` blocked and that a
round (the steps and the save) took, then the paired ratio of the rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.speed import paired_ratio  # noqa: E402
from blockdrop_jax import checkpoint, configs, parallel, run_inputs, steps, trainer  # noqa: E402

MODES = {"synchronous": False, "asynchronous": True}


def _round(ckpts, step_fn, state, batch, step: int, steps_between: int):
  """``steps_between`` steps then a save; (state, seconds the save blocked, seconds in all)."""
  started = time.perf_counter()
  images, labels, k = batch
  for i in range(steps_between):
    state, metrics = step_fn(state, images, labels, jax.random.key(0), step + i, k)
  jax.block_until_ready(metrics)
  saving = time.perf_counter()
  ckpts.save(step, state, {"step": step})
  blocked = time.perf_counter() - saving
  jax.block_until_ready(state)
  return state, blocked, time.perf_counter() - started


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default="quickstart:recipe")
  parser.add_argument("--steps_between", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--out", default=None, help="also write the table here (markdown)")
  args = parser.parse_args(argv)
  config = configs.load(args.config)
  train, validation, test = run_inputs.load_data(config)
  nets, params, stats = run_inputs.initial_variables(config, jax.random.key(0))
  run = trainer.Run(config, nets, train, validation, test,
                    {"params": params["resnet"], "batch_stats": stats["resnet"]})
  mesh = parallel.data_mesh()
  tx = steps.make_optimizer("finetune", config.finetune, 10)
  state = parallel.replicate(steps.create_state(params, stats, tx), mesh)
  step_fn = trainer.compiled_step(run, "finetune", tx, mesh)
  b = config.finetune.batch_size
  images, labels = parallel.global_batch(mesh, b, train.images[:b], train.labels[:b])
  batch = (images, labels, jax.numpy.int32(nets.resnet.num_blocks))
  blocked = {mode: [] for mode in MODES}
  rounds = {mode: [] for mode in MODES}
  with tempfile.TemporaryDirectory() as root:
    managers = {mode: checkpoint.RunCheckpoints(os.path.join(root, mode), keep=2,
                                                asynchronous=asynchronous)
                for mode, asynchronous in MODES.items()}
    step = 0
    for repeat in range(args.repeats + 1):  # the first round compiles and warms up
      for mode, ckpts in managers.items():
        step += args.steps_between
        state, save_s, round_s = _round(ckpts, step_fn, state, batch, step, args.steps_between)
        if repeat:
          blocked[mode].append(save_s)
          rounds[mode].append(round_s)
    for ckpts in managers.values():
      ckpts.close()
  q1, median, q3 = paired_ratio(rounds["asynchronous"], rounds["synchronous"])
  lines = [f"Checkpoint saves inside the step loop: {args.config} ({nets.resnet.name}, "
           f"{sum(x.size for x in jax.tree.leaves(state)) / 1e6:.2f}M numbers in the state), "
           f"{args.steps_between} finetuning steps of {b} images between saves, "
           f"{args.repeats} repeats, {jax.devices()[0].platform}", "",
           "| saves | save blocks the loop (s) | round: steps + save (s) |", "|---|---|---|"]
  for mode in MODES:
    lines.append(f"| {mode} | {statistics.median(blocked[mode]):.3f} | "
                 f"{statistics.median(rounds[mode]):.3f} |")
  lines += ["", f"Round time asynchronous / synchronous: {median:.2f} (quartiles {q1:.2f}-{q3:.2f})"]
  print("\n".join(lines))
  if args.out:
    with open(args.out, "w") as f:
      f.write("\n".join(lines) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
