"""Where CPU training time goes: one 3x3 convolution of each CIFAR ResNet stage, forward, input
gradient and weight gradient, in XLA (as the steps compile them) and in PyTorch, and XLA's sum
over the 2n convolutions per stage of a ResNet-(6n+2) training step.

  python benchmarks/conv_gradients.py [--batch 250] [--repeats 10] [--blocks-per-stage 9]

Medians of ``--repeats`` calls after a warm-up, all five taking turns in every repeat, in
milliseconds; XLA's three parts are compiled apart, PyTorch's backward computes both gradients at
once.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from blockdrop_jax import compilation  # noqa: E402


def median_ms(fns, repeats: int) -> list[float]:
  """Median milliseconds of each of ``fns``, called in turn in every repeat after a warm-up."""
  times = [[] for _ in fns]
  for repeat in range(repeats + 1):
    for fn, fn_times in zip(fns, times):
      start = time.perf_counter()
      jax.block_until_ready(fn())
      if repeat:
        fn_times.append(time.perf_counter() - start)
  return [1e3 * statistics.median(t) for t in times]


def conv(x, w):
  return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, default=250)
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument("--blocks-per-stage", type=int, default=9, help="n of ResNet-(6n+2); 9: ResNet-56")
  args = p.parse_args(argv)
  import torch
  print(f"jax {jax.__version__}, torch {torch.__version__} with {torch.get_num_threads()} "
        f"threads, batch {args.batch}, ms (median of {args.repeats})\n")
  print("| channels, size | XLA forward | XLA input gradient | XLA weight gradient | "
        "PyTorch forward | PyTorch forward + backward |")
  print("|---|---|---|---|---|---|")
  rng = np.random.default_rng(0)
  step_ms = 0.0  # XLA: forward and both gradients of every stage's convolutions
  for channels, size in ((16, 32), (32, 16), (64, 8)):
    x = rng.standard_normal((args.batch, size, size, channels), np.float32)
    w = 0.1 * rng.standard_normal((3, 3, channels, channels), np.float32)
    forward = compilation.jit(conv)
    input_grad = compilation.jit(jax.grad(lambda x, w: conv(x, w).sum(), 0))
    weight_grad = compilation.jit(jax.grad(lambda x, w: conv(x, w).sum(), 1))
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_()
    module = torch.nn.Conv2d(channels, channels, 3, 1, 1, bias=False)

    def torch_forward():
      with torch.no_grad():
        module(xt)

    def torch_backward():
      xt.grad = module.weight.grad = None  # as optimizer.zero_grad() leaves them
      module(xt).sum().backward()

    row = median_ms([*(lambda f=f: f(x, w) for f in (forward, input_grad, weight_grad)),
                     torch_forward, torch_backward], args.repeats)
    print(f"| {channels}, {size}x{size} | " + " | ".join(f"{v:.1f}" for v in row) + " |",
          flush=True)
    step_ms += 2 * args.blocks_per_stage * sum(row[:3])
  print(f"\nXLA's 3x3 convolutions of one ResNet-{6 * args.blocks_per_stage + 2} training step "
        f"(2 x {args.blocks_per_stage} per stage, forward and both gradients): "
        f"{step_ms / 1e3:.2f} s, so at most {1e3 * args.batch / step_ms:.0f} images/s.")
  return 0


if __name__ == "__main__":
  sys.exit(main())
