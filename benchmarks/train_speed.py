"""Training speed of each stage against the original algorithm in PyTorch, on this machine.

  python benchmarks/train_speed.py [--nets cifar_resnet32 cifar_resnet56 cifar_resnet110]
      [--batches 128 250] [--keep 0.5] [--repeats 5]
      [--stages pretrain curriculum finetune compact_finetune]

Per net and batch size, one update of each stage: pretraining (the full ResNet, BatchNorm in
training mode, SGD), the curriculum at k = K (the trainer's passes on this backend; Adam) and
joint finetuning (Adam) with masked passes, and with compact ones (``finetune.passes=compact``,
against the original's finetuning step), as the trainer compiles them (one device, crops and
flips inside the step), beside ``torch_nets.original_update`` (the original's
``cl_training.py`` / ``finetune.py`` step, its masked forward with the all-zero early exit;
PyTorch's default CPU threads) on the same weights and subset images. The policy network is a
fresh one whose keep probability is set by its output bias (``--keep``: 0.5 is the
initialisation; lower values stand for a trained policy that drops blocks); the finetuning rows
give the share of the blocks its sampled and greedy policies keep. The two implementations take
turns within each repeat; images/s from the median of ``--repeats`` timings after a warm-up
(compilation excluded), and the median and quartiles of the per-repeat ratio JAX/PyTorch.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.speed import fresh_policy, load_net, paired_ratio, timed_alternately  # noqa: E402
from blockdrop_jax import compilation, data, registry, steps, torch_layout  # noqa: E402
from blockdrop_jax.configs import default  # noqa: E402

STAGES = ("pretrain", "curriculum", "finetune", "compact_finetune")
ORIGINAL_STAGE = {"compact_finetune": "finetune"}  # the original's step a stage is timed against


def jax_updates(spec, variables, policy_spec, policy, images, labels, stages) -> dict:
  """stage -> a no-argument function running one jitted update of that stage, returning its
  metrics."""
  config = default.get_config()
  nets = steps.Nets(spec, policy_spec)
  options = steps.StepOptions(curriculum_passes=config.curriculum.passes)
  loss, key, k = steps.PolicyLoss(), jax.random.key(0), jnp.int32(spec.num_blocks)
  optimizers = {"pretrain": optax.sgd(0.1, momentum=0.9), "curriculum": optax.adam(1e-3),
                "finetune": optax.adam(1e-4)}
  compact = dataclasses.replace(options, finetune_passes="compact")
  updates = {
      "pretrain": lambda tx, s, x, y: steps.pretrain_step(nets, tx, s, x, y, key,
                                                          options=options),
      "curriculum": lambda tx, s, x, y: steps.curriculum_step(nets, loss, tx, s, x, y, key, k,
                                                              options),
      "finetune": lambda tx, s, x, y: steps.finetune_step(nets, loss, tx, s, x, y, key,
                                                          options=options),
      "compact_finetune": lambda tx, s, x, y: steps.finetune_step(nets, loss, tx, s, x, y, key,
                                                                  options=compact),
  }
  params = {"resnet": variables["params"], "policy": policy["params"]}
  stats = {"resnet": variables["batch_stats"], "policy": policy["batch_stats"]}
  fns = {}
  for stage in stages:
    update, tx = updates[stage], optimizers[ORIGINAL_STAGE.get(stage, stage)]
    state = steps.create_state(params, stats, tx)
    step = compilation.jit(update, static_argnums=0)
    fns[stage] = lambda step=step, tx=tx, state=state: step(tx, state, images, labels)[1]
  return fns


def torch_updates(spec, variables, policy_spec, policy, images, labels, stages) -> dict:
  """stage -> a no-argument function running one update of the original in PyTorch."""
  import torch
  from blockdrop_jax import torch_nets
  rnet = torch_nets.network(spec, torch_layout.to_torch_state_dict(variables, spec), "blockdrop")
  agent = torch_nets.network(policy_spec, torch_layout.to_torch_state_dict(policy, policy_spec),
                             "blockdrop")
  x = torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).float() / 255.0
  y = torch.from_numpy(np.asarray(labels, np.int64))
  uniforms = torch.rand(len(y), spec.num_blocks, generator=torch.Generator().manual_seed(0))
  sgd = torch.optim.SGD(rnet.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
  curriculum_adam = torch.optim.Adam(agent.parameters(), lr=1e-3)
  finetune_adam = torch.optim.Adam([*agent.parameters(), *rnet.parameters()], lr=1e-4)

  def pretrain():
    rnet.train()
    sgd.zero_grad()
    torch.nn.functional.cross_entropy(rnet(x), y).backward()
    sgd.step()

  updates = {
      "pretrain": pretrain,
      "curriculum": lambda: torch_nets.original_update(
          agent, rnet, curriculum_adam, x, y, uniforms, spec.num_blocks, finetune=False),
      "finetune": lambda: torch_nets.original_update(
          agent, rnet, finetune_adam, x, y, uniforms, spec.num_blocks, finetune=True),
  }
  return {stage: updates[stage] for stage in {ORIGINAL_STAGE.get(s, s) for s in stages}}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--nets", nargs="+", default=["cifar_resnet32", "cifar_resnet56",
                                               "cifar_resnet110"])
  p.add_argument("--batches", nargs="+", type=int, default=[128, 250])
  p.add_argument("--keep", nargs="+", type=float, default=[0.5],
                 help="keep probabilities of the policy network's output")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
  args = p.parse_args(argv)
  import torch
  shared = registry.shared_data_dir()
  all_images, all_labels = data.read_cifar_records(
      os.path.join(shared, "cifar10", "subset", "data_batch_1_first4000.bin"))
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}; torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads; {os.cpu_count()} cores; median of {args.repeats} "
        "runs after a warm-up, JAX and PyTorch taking turns\n")
  print("| net | batch | keep | blocks kept: sampled, greedy | stage | JAX images/s | "
        "PyTorch images/s | JAX/PyTorch (quartiles) |")
  print("|---|---|---|---|---|---|---|---|")
  for name in args.nets:
    spec, variables = load_net(name, shared)
    for batch in args.batches:
      images, labels = all_images[:batch], all_labels[:batch]
      for keep in args.keep:
        policy_spec, policy = fresh_policy(spec, keep)
        ours = jax_updates(spec, variables, policy_spec, policy, jnp.asarray(images),
                           jnp.asarray(labels), args.stages)
        theirs = torch_updates(spec, variables, policy_spec, policy, images, labels, args.stages)
        times = timed_alternately({**{("jax", s): f for s, f in ours.items()},
                                   **{("torch", s): f for s, f in theirs.items()}}, args.repeats)
        for stage in args.stages:
          jax_runs = times[("jax", stage)][1]
          torch_runs = times[("torch", ORIGINAL_STAGE.get(stage, stage))][1]
          low, median, high = paired_ratio(torch_runs, jax_runs)
          kept = "-"
          if "finetune" in stage:
            metrics = ours[stage]()
            kept = ", ".join(f"{float(metrics[f'blocks_{p}']) / spec.num_blocks:.2f}"
                             for p in ("sampled", "greedy"))
          print(f"| {name} | {batch} | {keep} | {kept} | {stage} | "
                f"{batch / statistics.median(jax_runs):.1f} | "
                f"{batch / statistics.median(torch_runs):.1f} | "
                f"{median:.2f}x ({low:.2f}-{high:.2f}) |", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
