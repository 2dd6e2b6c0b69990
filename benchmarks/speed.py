"""Wall-clock speed of the execution modes against the full network, in one run on this machine.

  python benchmarks/speed.py [--nets cifar_resnet32 cifar_resnet110] [--keep 0.35] [--repeats 5]

Policies: a pool of ``--unique-policies`` random policy vectors at keep rate ``--keep`` (trained
BlockDrop policies are few and shared by many images; the original R110 uses 469 on 10,000 test
images), each image drawing one; or ``--policies-from WORKDIR`` to use a trained run's greedy
policies on the test subset. Weights: akamaster's pretrained files where they exist, else random
(speed does not depend on the values). Reported: images/s (median of ``--repeats`` timed runs after
a warm-up), compile time, the FLOPs speedup and the measured speedup over the full network, and the
curriculum step with and without the shared-prefix optimisation averaged over the schedule.
"""

from __future__ import annotations

import argparse
import glob
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from blockdrop_jax import convert, data, execution, flops, steps  # noqa: E402
from blockdrop_jax.models import resnet  # noqa: E402


def timed(fn, repeats: int) -> tuple[float, float]:
  """(compile + first run seconds, median seconds of ``repeats`` later runs)."""
  start = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return first, statistics.median(times)


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


def inference_rows(spec, variables, images, policies, batch: int, repeats: int) -> list[dict]:
  """One row per mode: the full network first, then each mode under ``policies``."""
  table = flops.flops_table(spec)
  flops_speedup = table.full / float(np.mean(table.under(policies)))
  grouped = execution.GroupedExecutor(spec, max_batch=batch, blockwise=True)
  grouped_cond = execution.GroupedExecutor(spec, max_batch=batch)
  blockwise = execution.BlockwiseRunner(spec)
  modes = {
      "full": lambda x, p: execution.run("masked", spec, variables, x, None),
      "masked": lambda x, p: execution.run("masked", spec, variables, x, p),
      "batch_skip": lambda x, p: execution.run("batch_skip", spec, variables, x, p),
  }
  if batch == 1:
    modes["blockwise"] = lambda x, p: blockwise(variables, x, p[0])
  else:
    modes["grouped, batch_skip inside"] = lambda x, p: grouped_cond(variables, x, p)
    modes["grouped, blockwise inside"] = lambda x, p: grouped(variables, x, p)
  rows, full_seconds = [], None
  for mode, fn in modes.items():
    first, seconds = timed(lambda: [fn(images[i:i + batch], policies[i:i + batch])
                                    for i in range(0, len(images), batch)], repeats)
    full_seconds = full_seconds or seconds
    rows.append({"mode": mode, "images_per_s": len(images) / seconds, "first_call_s": first,
                 "flops_speedup": 1.0 if mode == "full" else flops_speedup,
                 "measured_speedup": full_seconds / seconds})
  if batch > 1:
    rows[-2]["compilations"] = grouped_cond.trace_count
    rows[-1]["compilations"] = grouped.trace_count
  return rows


def curriculum_rows(spec, variables, images, labels, batch: int, repeats: int, points: int) -> list:
  """Curriculum step images/s, plain (two masked passes) vs shared prefix, over the schedule."""
  policy_spec = resnet.policy_spec(spec)
  pv = resnet.init(policy_spec, jax.random.key(1))
  params = {"resnet": variables["params"], "policy": pv["params"]}
  stats = {"resnet": variables["batch_stats"], "policy": pv["batch_stats"]}
  tx = optax.adam(1e-3)
  state = steps.create_state(params, stats, tx)
  x, y = images[:batch], labels[:batch]
  K = spec.num_blocks
  ks = sorted({max(1, round(K * (i + 1) / points)) for i in range(points)})
  rows = []
  def compiled(shared):
    nets = steps.Nets(spec, policy_spec, shared_prefix=shared)
    return jax.jit(lambda s, k: steps.curriculum_step(
        nets, steps.PolicyLoss(), tx, s, x, y, jax.random.key(0), k)[1]["loss"])

  plain_step, shared_step = compiled(False), compiled(True)
  for shared in (False, True):
    # As the trainer does: the shared prefix while k < K, plain passes at k = K.
    firsts, per_k = [], []
    for k in ks:
      step = shared_step if shared and k < K else plain_step
      first, seconds = timed(lambda: step(state, jnp.int32(k)), repeats)
      firsts.append(first)
      per_k.append(seconds)
    # The schedule spends one epoch at each k < K, then stays at K: weight k = K as much as the
    # ramp, i.e. a schedule of 2K epochs (the configs here run about that long).
    mean_seconds = (np.mean(per_k[:-1]) * (K - 1) + per_k[-1] * (K + 1)) / (2 * K) if len(ks) > 1 \
        else per_k[0]
    rows.append({"net": spec.name, "batch": batch, "shared_prefix": shared,
                 "images_per_s": batch / mean_seconds, "first_call_s": firsts[0],
                 "per_k": dict(zip(ks, [batch / s for s in per_k]))})
  return rows


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--nets", nargs="+", default=["cifar_resnet32", "cifar_resnet110"])
  p.add_argument("--keep", type=float, default=0.35)
  p.add_argument("--unique-policies", type=int, default=16)
  p.add_argument("--images", type=int, default=256)
  p.add_argument("--batch-1-images", type=int, default=32)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--curriculum-batch", type=int, default=128)
  p.add_argument("--curriculum-points", type=int, default=4)
  p.add_argument("--only-curriculum", action="store_true", help="skip the inference table")
  args = p.parse_args(argv)
  shared = data.shared_data_dir()
  images, labels = data.read_cifar_records(
      os.path.join(shared, "cifar10", "subset", "test_batch_first1000.bin"))
  x_all = np.asarray(data.to_unit_float(images[:args.images]))
  print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"jax {jax.__version__} on {jax.devices()[0].platform}")
  print(f"policies: {args.unique_policies} random vectors at keep rate {args.keep}; median of "
        f"{args.repeats} runs after a warm-up\n")
  print("| net | batch | mode | images/s | FLOPs speedup | measured speedup | measured/FLOPs | first call s |")
  print("|---|---|---|---|---|---|---|---|")
  curriculum = []
  for name in args.nets:
    spec, variables = load_net(name, shared)
    policies = sample_policies(args.images, spec.num_blocks, args.keep, args.unique_policies)
    for batch, n in () if args.only_curriculum else ((1, args.batch_1_images),
                                                     (args.images, args.images)):
      for row in inference_rows(spec, variables, x_all[:n], policies[:n], batch, args.repeats):
        ratio = row["measured_speedup"] / row["flops_speedup"]
        extra = f" ({row['compilations']} compilations)" if "compilations" in row else ""
        print(f"| {name} | {batch} | {row['mode']}{extra} | {row['images_per_s']:.1f} | "
              f"{row['flops_speedup']:.2f} | {row['measured_speedup']:.2f} | {ratio:.2f} | "
              f"{row['first_call_s']:.1f} |", flush=True)
    curriculum += curriculum_rows(spec, variables, images, labels, args.curriculum_batch,
                                  max(2, args.repeats // 2), args.curriculum_points)
  print("\n| net | curriculum step | images/s (schedule mean) | per k | first call s |")
  print("|---|---|---|---|---|")
  by_net = {}
  for row in curriculum:
    by_net.setdefault(row["net"], []).append(row)
    per_k = ", ".join(f"k={k}: {v:.0f}" for k, v in row["per_k"].items())
    print(f"| {row['net']} | {'shared prefix' if row['shared_prefix'] else 'plain masked'} | "
          f"{row['images_per_s']:.1f} | {per_k} | {row['first_call_s']:.1f} |")
  for net, (plain, shared_row) in by_net.items():
    print(f"\n{net}: curriculum step speedup {shared_row['images_per_s'] / plain['images_per_s']:.2f}x")
  return 0


if __name__ == "__main__":
  sys.exit(main())
