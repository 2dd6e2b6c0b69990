"""Wall-clock speed of the execution modes against the full network, in one run on this machine.

  python benchmarks/speed.py [--nets cifar_resnet32 cifar_resnet110] [--keep 0.35] [--repeats 5]
      [--imagenet-nets imagenet_resnet101] [--imagenet-images 8] [--modes batch_skip compact ...]
  python benchmarks/speed.py --checkpoint runs/r56 [--curriculum-keep trained 0.5]

Policies: a pool of ``--unique-policies`` random policy vectors at keep rate ``--keep`` (trained
BlockDrop policies are few and shared by many images; the original R110 uses 469 on 10,000 test
images), each image drawing one. Weights: akamaster's pretrained files where they exist, else random
(speed does not depend on the values); ImageNet nets run at batch 1 only, on random 224 px images.
With ``--checkpoint`` (a training workdir) the run's own net, weights and policy network instead:
the images run under the policies it picks for them, and the curriculum step under it.
Reported: images/s (median of ``--repeats`` timed runs after a warm-up; the modes of a table take
turns in each run, so the machine's drifts hit them alike), compile time, the FLOPs speedup and
the measured speedup over the full network (the fastest of its plain graph, masked execution with
every block kept and, at batch 256, batches of 16 two in flight), and the curriculum step (the
trainer's optimiser) with the original's two masked passes and with compact passes, averaged over
the schedule. Each speedup twice: as the ratio of the medians, and paired, as the median and
quartiles over the repeats of the ratio within each repeat (``paired_ratio``).
"""

from __future__ import annotations

import argparse
import functools
import glob
import os
import platform
import statistics
import sys
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from blockdrop_jax import (checkpoint, compilation, convert, data, evaluation,  # noqa: E402
                           execution, flops, registry, steps)
from blockdrop_jax.errors import BlockDropError  # noqa: E402
from blockdrop_jax.models import resnet  # noqa: E402
from blockdrop_jax.configs import default  # noqa: E402


def timed_call(fn) -> tuple[float, object]:
  """(seconds, result) of one call, waiting for the result."""
  start = time.perf_counter()
  result = jax.block_until_ready(fn())
  return time.perf_counter() - start, result


def timed_alternately(fns: dict, repeats: int) -> dict:
  """{name: (compile + first run seconds, seconds of each of ``repeats`` later runs)}.

  The functions take turns within each repeat, so a drift of the machine's speed (large here:
  it shares its host) slows all of them alike instead of whichever ran during it."""
  first = {name: timed_call(fn)[0] for name, fn in fns.items()}
  runs = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      runs[name].append(timed_call(fn)[0])
  return {name: (first[name], runs[name]) for name in fns}


def paired_ratio(numerator_runs: Sequence[float], denominator_runs: Sequence[float]) -> tuple:
  """(first quartile, median, third quartile) over repeats of the ratio of two timings taken in
  the same repeat. The ratio of the medians moves by a few hundredths between identical programs
  on a shared machine; pairing the timings of one repeat, taken
  seconds apart, cancels the slower drifts, and the quartiles show what is left."""
  ratios = [a / b for a, b in zip(numerator_runs, denominator_runs, strict=True)]
  if len(ratios) == 1:
    return tuple(ratios * 3)
  return tuple(statistics.quantiles(ratios, n=4, method="inclusive"))


def load_net(name: str, shared: str):
  depth = name.removeprefix("cifar_resnet")
  files = glob.glob(os.path.join(shared, "pretrained", "akamaster_cifar10", f"resnet{depth}-*.th"))
  if files:
    return convert.load_pretrained(files[0])
  spec = resnet.make_spec(name)
  return spec, resnet.init(spec, jax.random.key(0))


def sample_policies(n: int, num_blocks: int, keep: float, unique: int, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  pool = (rng.random((unique, num_blocks)) < keep).astype(np.float32)
  return pool[rng.integers(0, unique, n)]


def fresh_policy(spec, keep: float) -> tuple:
  """(policy spec, variables) of a freshly initialised policy network (as at the start of the
  curriculum) whose output bias is logit(keep): 0.5 is the initialisation itself (zero bias);
  lower values keep fewer blocks."""
  policy_spec = resnet.policy_spec(spec)
  variables = resnet.init(policy_spec, jax.random.key(1))
  return policy_spec, resnet.with_policy_bias(variables, np.log(keep / (1 - keep)))


class TrainedRun:
  """A training workdir's last checkpoint: its ResNet, its policy network, and the test-time
  policies that network picks (``steps.greedy_policy``)."""

  def __init__(self, workdir: str):
    self.nets, self.params, self.stats, meta = checkpoint.load_run(workdir)
    self.name = f"trained ({workdir}, {meta['stage']} epoch {meta['epoch']})"
    self.variables = {"params": self.params["resnet"], "batch_stats": self.stats["resnet"]}
    self.policy = (self.nets.policy, {"params": self.params["policy"],
                                      "batch_stats": self.stats["policy"]})

  def policies(self, raw_images: np.ndarray) -> np.ndarray:
    return np.asarray(compilation.jit(steps.greedy_policy, static_argnums=0)(
        self.nets, self.params, self.stats, raw_images))


CONCURRENT_BATCH, IN_FLIGHT = 16, 2  # the full network's third baseline (batch 256 only)
FULL_MODES = ("full", "full, masked with all kept",
              f"full, batches of {CONCURRENT_BATCH}, {IN_FLIGHT} in flight")


def in_flight(fn, batch: int):
  """``fn(images, policy)`` over batches of ``batch`` images, ``IN_FLIGHT`` at once from
  threads, as ``evaluate.py`` runs its batches (``evaluation.batched``)."""
  return lambda x, p: evaluation.batched(fn, (x, p), batch, progress=False, in_flight=IN_FLIGHT)


def inference_modes(spec, variables, batch: int) -> tuple[dict, dict]:
  """({name: fn(images, policy)} of every mode of a table at ``batch``, the grouped executor
  among them by name). Building them compiles nothing."""
  masked, batch_skip, looped, compact = (execution.Runner(mode, spec, variables)
                                         for mode in ("masked", "batch_skip", "looped", "compact"))
  modes = {
      "full": lambda x, p: masked(x),
      "full, masked with all kept": lambda x, p: masked(x, np.ones_like(p)),
  }
  grouped = {}
  if batch > 1:
    modes[FULL_MODES[2]] = in_flight(lambda x, p: masked(x), CONCURRENT_BATCH)
  modes.update(masked=masked, batch_skip=batch_skip, looped=looped, compact=compact)
  if batch > 1:
    modes[f"compact, batches of {batch // 2}, {IN_FLIGHT} in flight"] = in_flight(compact,
                                                                             batch // 2)
    grouped["grouped"] = execution.GroupedExecutor(spec, variables, workers=IN_FLIGHT)
    modes.update(grouped)
  return modes, grouped


def inference_rows(spec, variables, images, policies, batch: int, repeats: int,
                   only: Optional[Sequence[str]] = None) -> list[dict]:
  """One row per mode: the full network first, then each mode under ``policies``.

  The full network is timed as its own graph and as masked execution with every block kept (same
  values), and at batch 256 also as batches of 16 called side by side from 2 threads, the way the
  grouped executor runs its groups; speedups are over the fastest, so that neither a compiler
  effect on one graph (XLA:CPU once ran the plain graph 1.7x slower) nor the threads flatter the
  modes. The full network and the jitted modes run through ``execution.Runner`` (weights
  compiled in), as a server would. ``only``: time just these modes (and the full network's
  forms), to spare compilations where they are slow."""
  table = flops.flops_table(spec)
  flops_speedup = table.full / float(np.mean(table.under(policies)))
  modes, grouped = inference_modes(spec, variables, batch)
  if only is not None:
    modes = {mode: fn for mode, fn in modes.items() if mode in FULL_MODES or mode in only}
  times = timed_alternately(
      {mode: lambda fn=fn: [fn(images[i:i + batch], policies[i:i + batch])
                            for i in range(0, len(images), batch)] for mode, fn in modes.items()},
      repeats)
  rows = []
  for mode, (first, runs) in times.items():
    seconds = statistics.median(runs)
    rows.append({"mode": mode, "seconds": seconds, "runs": runs,
                 "images_per_s": len(images) / seconds, "first_call_s": first,
                 "flops_speedup": 1.0 if mode in FULL_MODES else flops_speedup})
  full = min((row for row in rows if row["mode"] in FULL_MODES), key=lambda row: row["seconds"])
  for row in rows:
    row["measured_speedup"] = full["seconds"] / row["seconds"]
    row["paired_speedup"] = paired_ratio(full["runs"], row["runs"])
  for row in rows:
    if row["mode"] in grouped:
      row["compilations"] = grouped[row["mode"]].trace_count
  return rows


def curriculum_rows(spec, variables, policy: tuple, policy_name: str, images, labels, batch: int,
                    repeats: int, points: int) -> list:
  """Curriculum step images/s over the schedule: the original's two masked passes against the
  compact passes (forced prefix once, then each block on only the images that keep it), with
  ``policy`` = (policy spec, variables) deciding (``fresh_policy`` or a trained one). The table
  reports the fraction of blocks the passes run."""
  policy_spec, pv = policy
  params = {"resnet": variables["params"], "policy": pv["params"]}
  stats = {"resnet": variables["batch_stats"], "policy": pv["batch_stats"]}
  # The trainer's optimiser: Adam on the policy network, zero updates for the frozen ResNet.
  tx = steps.make_optimizer("curriculum", default.get_config().curriculum, 1)
  state = steps.create_state(params, stats, tx)
  x, y = jnp.asarray(images[:batch]), jnp.asarray(labels[:batch])
  K = spec.num_blocks
  ks = sorted({max(1, round(K * (i + 1) / points)) for i in range(points)})
  passes = ("masked", "compact")
  # The whole update, new state included: were the state dropped inside jit, XLA would remove
  # the policy network's backward pass and the optimiser update as dead code.
  step = {p: compilation.jit(functools.partial(
      steps.curriculum_step, steps.Nets(spec, policy_spec), steps.PolicyLoss(), tx,
      key=jax.random.key(0), options=steps.StepOptions(curriculum_passes=p))) for p in passes}
  first_call = {p: timed_call(lambda: step[p](state, x, y, k=jnp.int32(ks[0])))[0] for p in passes}
  blocks = {p: [] for p in passes}
  for k in map(jnp.int32, ks):
    for p in passes:
      metrics = step[p](state, x, y, k=k)[1]
      blocks[p].append(float(metrics["blocks_sampled"] + metrics["blocks_greedy"]) / (2 * K))
  # Every (passes, k) point takes its turn in every repeat, so a slow spell of the machine is
  # spread over the whole schedule instead of landing on the points measured during it.
  times = timed_alternately({(p, k): lambda p=p, k=k: step[p](state, x, y, k=jnp.int32(k))
                             for k in ks for p in passes}, repeats)
  runs = {p: np.array([times[p, k][1] for k in ks]) for p in passes}  # (points, repeats)
  per_k = {p: np.median(runs[p], axis=1) for p in passes}
  # The schedule spends one epoch at each k < K, then stays at K: weight k = K as much as the
  # ramp, i.e. a schedule of 2K epochs, as the subset configs run. The original's 5000-epoch
  # schedules (blockdrop_jax/configs/r110_c10.py) spend nearly every epoch at k = K: its per-k entry.
  weights = np.array([(K - 1) / (len(ks) - 1)] * (len(ks) - 1) + [K + 1]) if len(ks) > 1 \
      else np.ones(1)
  rows = []
  for p in passes:
    mean_seconds = float(np.dot(weights, per_k[p]) / weights.sum())
    rows.append({"net": spec.name, "batch": batch, "passes": p, "policy": policy_name,
                 "images_per_s": batch / mean_seconds, "first_call_s": first_call[p],
                 "per_k": dict(zip(ks, [batch / s for s in per_k[p]])),
                 "blocks_run": float(np.dot(weights, blocks[p]) / weights.sum()),
                 # The schedule's time in each repeat, every point of it timed in that repeat.
                 "schedule_runs": list(weights @ runs[p] / weights.sum())})
  return rows


def quartiles_text(quartiles: Sequence[float], scale: float = 1.0, unit: str = "") -> str:
  q1, median, q3 = (q / scale for q in quartiles)
  return f"{median:.2f}{unit} ({q1:.2f}-{q3:.2f})"


def print_rows(name: str, batch: int, rows: list[dict]) -> None:
  for row in rows:
    ratio = row["measured_speedup"] / row["flops_speedup"]
    count = row.get("compilations")
    extra = "" if count is None else f" ({count} compilation{'' if count == 1 else 's'})"
    print(f"| {name} | {batch} | {row['mode']}{extra} | {row['images_per_s']:.1f} | "
          f"{row['flops_speedup']:.2f} | {row['measured_speedup']:.2f} | {ratio:.2f} | "
          f"{quartiles_text(row['paired_speedup'], row['flops_speedup'])} | "
          f"{row['first_call_s']:.1f} |", flush=True)


def curriculum_policy(text: str):
  """argparse type of ``--curriculum-keep``: a keep rate in (0, 1), or "trained"."""
  if text == "trained":
    return text
  try:
    keep = float(text)
  except ValueError:
    keep = 0.0
  if not 0 < keep < 1:
    raise argparse.ArgumentTypeError(f"expected a keep rate in (0, 1) or 'trained', got {text!r}")
  return keep


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--nets", nargs="+", default=None,
                 help="default: cifar_resnet32 cifar_resnet110, or the net of --checkpoint")
  p.add_argument("--checkpoint", default=None, metavar="WORKDIR",
                 help="a training workdir: time its net under the policies its policy network "
                      "picks for the images (instead of --keep)")
  p.add_argument("--keep", type=float, default=0.35)
  p.add_argument("--unique-policies", type=int, default=16)
  p.add_argument("--images", type=int, default=256)
  p.add_argument("--batch-1-images", type=int, default=32)
  p.add_argument("--imagenet-nets", nargs="*", default=None,
                 help="ImageNet nets timed at batch 1 only (random weights and 224 px images); "
                      "none: skip; default: imagenet_resnet101, none with --checkpoint")
  p.add_argument("--imagenet-images", type=int, default=8)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--curriculum-batch", type=int, default=128)
  p.add_argument("--curriculum-points", type=int, default=4)
  p.add_argument("--curriculum-keep", type=curriculum_policy, nargs="*", default=None,
                 help="one table row pair each: a fresh policy network with output bias "
                      "logit(keep) (0.5: as initialised), or 'trained' (--checkpoint's policy "
                      "network); none: no curriculum table; default: 0.5 0.35, or trained with "
                      "--checkpoint")
  p.add_argument("--only-curriculum", action="store_true", help="skip the inference table")
  p.add_argument("--modes", nargs="+", default=None, metavar="MODE",
                 help="time only these inference modes, named as in the table (the full "
                      "network's forms always run); default: all")
  args = p.parse_args(argv)
  if args.imagenet_images < 1:
    p.error(f"--imagenet-images must be at least 1, got {args.imagenet_images}")
  if args.checkpoint and args.nets:
    p.error("--checkpoint times the net it was trained with; leave out --nets")
  if "trained" in (args.curriculum_keep or ()) and not args.checkpoint:
    p.error("--curriculum-keep trained needs --checkpoint (the run whose policy network to use)")
  if args.imagenet_nets is None:
    args.imagenet_nets = [] if args.checkpoint else ["imagenet_resnet101"]
  if args.curriculum_keep is None:
    args.curriculum_keep = ["trained"] if args.checkpoint else [0.5, 0.35]
  try:
    run = TrainedRun(args.checkpoint) if args.checkpoint else None
  except BlockDropError as e:
    p.error(f"--checkpoint: {e}")
  if run and run.nets.resnet.image_size != 32:
    p.error(f"--checkpoint: {args.checkpoint} is a run on {run.nets.resnet.image_size} px images; "
            "this benchmark times CIFAR nets on the 32 px test subset")
  shared = registry.shared_data_dir()
  images, labels = data.read_cifar_records(
      os.path.join(shared, "cifar10", "subset", "test_batch_first1000.bin"))
  nets = ([(run.nets.resnet, run.variables)] if run else
          [load_net(name, shared) for name in args.nets or ("cifar_resnet32", "cifar_resnet110")])
  if args.modes and not args.only_curriculum:
    spec, variables = nets[0]
    known = [mode for batch in (1, args.images)
             for mode in inference_modes(spec, variables, batch)[0] if mode not in FULL_MODES]
    unknown = [mode for mode in args.modes if mode not in known]
    if unknown:
      p.error(f"--modes: no table has {', '.join(map(repr, unknown))}; the modes are "
              f"{', '.join(map(repr, dict.fromkeys(known)))}")
  x_all = np.asarray(data.to_unit_float(images[:args.images]))
  print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"jax {jax.__version__} on {jax.devices()[0].platform}, XLA options "
        f"{compilation.compiler_options() or 'defaults'} (${compilation.DEFAULTS_ENV} to compare)")
  if run:
    trained_policies = run.policies(images[:args.images])
    print(f"policies: what the policy network of {run.name} picks for the first {args.images} "
          f"test images: {len(np.unique(trained_policies, axis=0))} distinct vectors, "
          f"{trained_policies.sum(1).mean():.1f} of {run.nets.resnet.num_blocks} blocks kept on "
          f"average", end="")
  else:
    print(f"policies: {args.unique_policies} random vectors at keep rate {args.keep}", end="")
  print(f"; median of {args.repeats} runs after a warm-up\n")
  if not args.only_curriculum:
    print("| net | batch | mode | images/s | FLOPs speedup | measured speedup | measured/FLOPs | "
          "paired measured/FLOPs (quartiles) | first call s |")
    print("|---|---|---|---|---|---|---|---|---|")
  curriculum = []
  for spec, variables in nets:
    policies = trained_policies if run else sample_policies(
        args.images, spec.num_blocks, args.keep, args.unique_policies)
    for batch, n in () if args.only_curriculum else ((1, args.batch_1_images),
                                                     (args.images, args.images)):
      print_rows(spec.name, batch, inference_rows(spec, variables, x_all[:n], policies[:n], batch,
                                                  args.repeats, args.modes))
    for keep in args.curriculum_keep:
      policy, name = ((run.policy, run.name) if keep == "trained" else
                      (fresh_policy(spec, keep), f"bias logit({keep})"))
      curriculum += curriculum_rows(spec, variables, policy, name, images, labels,
                                    args.curriculum_batch, args.repeats, args.curriculum_points)
  for name in () if args.only_curriculum else args.imagenet_nets:
    spec = resnet.make_spec(name)
    variables = resnet.init(spec, jax.random.key(0))
    n = args.imagenet_images
    x = np.random.default_rng(0).random((n, spec.image_size, spec.image_size, 3), np.float32)
    policies = sample_policies(n, spec.num_blocks, args.keep, args.unique_policies)
    print_rows(name, 1, inference_rows(spec, variables, x, policies, 1, args.repeats, args.modes))
  if not curriculum:
    return 0
  print("\n| net | policy | curriculum passes | images/s (schedule mean) | per k | blocks run | "
        "speedup | paired speedup (quartiles) | first call s |")
  print("|---|---|---|---|---|---|---|---|---|")
  for masked, compact in zip(curriculum[::2], curriculum[1::2]):
    policy = masked["policy"]
    for row in (masked, compact):
      per_k = ", ".join(f"k={k}: {v:.0f}" for k, v in row["per_k"].items())
      speedup = row["images_per_s"] / masked["images_per_s"]
      paired = paired_ratio(masked["schedule_runs"], row["schedule_runs"])
      print(f"| {row['net']} | {policy} | {row['passes']} | {row['images_per_s']:.1f} | {per_k} | "
            f"{row['blocks_run']:.0%} | {speedup:.2f}x | {quartiles_text(paired, unit='x')} | "
            f"{row['first_call_s']:.1f} |", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
