"""Training-step speed of each stage on this machine: images/s of one jitted update.

  python benchmarks/train_steps.py [--nets cifar_resnet32 cifar_resnet110] [--batch 128]

Steps as the trainer compiles them (``compilation.jit``, one device), on real subset images:
pretraining (the full ResNet, BatchNorm in training mode), the curriculum at k = K with each kind of
passes, and finetuning. Medians of ``--repeats`` runs after a warm-up; "first call" includes
compilation. To compare two versions of the code, run this script in a checkout of each.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.speed import load_net, timed_alternately  # noqa: E402
from blockdrop_jax import compilation, data, registry, steps  # noqa: E402
from blockdrop_jax.models import resnet  # noqa: E402


def stage_steps(spec, variables, images, labels) -> dict:
  """name -> a no-argument function running one update of that stage on ``images``."""
  policy_spec = resnet.policy_spec(spec)
  policy = resnet.init(policy_spec, jax.random.key(1))
  tx = optax.sgd(1e-3, momentum=0.9)
  state = steps.create_state({"resnet": variables["params"], "policy": policy["params"]},
                             {"resnet": variables["batch_stats"], "policy": policy["batch_stats"]},
                             tx)
  loss, key, k = steps.PolicyLoss(), jax.random.key(0), jnp.int32(spec.num_blocks)

  def nets(passes="compact"):
    return steps.Nets(spec, policy_spec, curriculum_passes=passes)

  updates = {
      "pretrain": lambda s, x, y: steps.pretrain_step(nets(), tx, s, x, y, key),
      **{f"curriculum, {p} passes, k = K": lambda s, x, y, p=p: steps.curriculum_step(
          nets(p), loss, tx, s, x, y, key, k) for p in steps.CURRICULUM_PASSES},
      "finetune": lambda s, x, y: steps.finetune_step(nets(), loss, tx, s, x, y, key),
  }
  return {name: lambda fn=compilation.jit(update): fn(state, images, labels)[1]
          for name, update in updates.items()}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--nets", nargs="+", default=["cifar_resnet32", "cifar_resnet110"])
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--repeats", type=int, default=5)
  args = p.parse_args(argv)
  shared = registry.shared_data_dir()
  images, labels = data.read_cifar_records(
      os.path.join(shared, "cifar10", "subset", "test_batch_first1000.bin"))
  images, labels = jnp.asarray(images[:args.batch]), jnp.asarray(labels[:args.batch])
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} cores, batch "
        f"{args.batch}, median of {args.repeats} runs after a warm-up, the steps taking turns\n")
  print("| net | step | images/s | s/step | first call s |")
  print("|---|---|---|---|---|")
  for name in args.nets:
    spec, variables = load_net(name, shared)
    times = timed_alternately(stage_steps(spec, variables, images, labels), args.repeats)
    for step, (first, runs) in times.items():
      seconds = statistics.median(runs)
      print(f"| {name} | {step} | {args.batch / seconds:.1f} | {seconds:.3f} | {first:.1f} |",
            flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
