"""Where CPU training time goes: one 3x3 convolution of each CIFAR ResNet stage, forward, input
gradient and weight gradient, in XLA (as the steps compile them) and in PyTorch.

  python benchmarks/conv_gradients.py [--batch 250] [--repeats 10]

Medians of ``--repeats`` calls after a warm-up, in milliseconds; XLA's three parts are compiled
apart, PyTorch's backward computes both gradients at once.
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


def median_ms(fn, repeats: int) -> float:
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def conv(x, w):
  return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, default=250)
  p.add_argument("--repeats", type=int, default=10)
  args = p.parse_args(argv)
  import torch
  print(f"jax {jax.__version__}, torch {torch.__version__} with {torch.get_num_threads()} "
        f"threads, batch {args.batch}, ms (median of {args.repeats})\n")
  print("| channels, size | XLA forward | XLA input gradient | XLA weight gradient | "
        "PyTorch forward | PyTorch forward + backward |")
  print("|---|---|---|---|---|---|")
  rng = np.random.default_rng(0)
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
      module(xt).sum().backward()

    row = [median_ms(lambda f=f: f(x, w), args.repeats)
           for f in (forward, input_grad, weight_grad)]
    row += [median_ms(torch_forward, args.repeats), median_ms(torch_backward, args.repeats)]
    print(f"| {channels}, {size}x{size} | " + " | ".join(f"{v:.1f}" for v in row) + " |",
          flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
