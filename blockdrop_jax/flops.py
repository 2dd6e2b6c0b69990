"""FLOPs of a gated ResNet under a policy, with the original BlockDrop convention.

Each conv counts 2*Cin*Cout*kh*kw*Hout*Wout, each linear 2*in*out; BN, ReLU, pooling and additions
are free. Only kept blocks count their residual branch; projection shortcuts always run (as the
original's ImageNet ``ds`` convs do), so they count with the fixed part.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from blockdrop_jax.models.resnet import ResNetSpec


@dataclasses.dataclass(frozen=True)
class FlopsTable:
  fixed: int  # stem, shortcuts and classifier: paid whatever the policy
  per_block: np.ndarray  # (K,) residual-branch FLOPs of each block

  @property
  def full(self) -> int:
    return self.fixed + int(self.per_block.sum())

  def under(self, policy) -> np.ndarray:
    """FLOPs of each row of ``policy`` (batch, K) in {0, 1}."""
    return self.fixed + np.asarray(policy, np.float64) @ self.per_block


def _out(size: int, kernel: int, stride: int) -> int:
  pad = kernel // 2
  return (size + 2 * pad - kernel) // stride + 1


def _conv(cin: int, cout: int, kernel: int, size_out: int) -> int:
  return 2 * cin * cout * kernel * kernel * size_out * size_out


def flops_table(spec: ResNetSpec, image_size: Optional[int] = None) -> FlopsTable:
  """Fixed and per-block FLOPs of ``spec`` on square images of ``image_size`` pixels."""
  size = (image_size or spec.image_size) // spec.input_pool
  if spec.stem == "cifar":
    size = _out(size, 3, 1)
    fixed = _conv(3, spec.stem_width, 3, size)
  else:
    size = _out(size, 7, 2)
    fixed = _conv(3, spec.stem_width, 7, size)
    size = _out(size, 3, 2)  # max pool
  per_block = []
  for _, _, in_ch, width, stride in spec.block_layout():
    out_size = _out(size, 3, stride)
    out_ch = width * spec.expansion
    if spec.block == "basic":
      branch = _conv(in_ch, width, 3, out_size) + _conv(width, width, 3, out_size)
    else:
      branch = (_conv(in_ch, width, 1, size) + _conv(width, width, 3, out_size)
                + _conv(width, out_ch, 1, out_size))
    if spec.shortcut == "projection" and (stride != 1 or in_ch != out_ch):
      fixed += _conv(in_ch, out_ch, 1, out_size)
    per_block.append(branch)
    size = out_size
  fixed += 2 * spec.feature_dim * spec.num_classes
  return FlopsTable(fixed, np.asarray(per_block, np.float64))


def policy_flops(base: ResNetSpec, policy_net: Optional[ResNetSpec], policy, image_size=None):
  """Per-image FLOPs of BlockDrop inference: the policy network plus the kept blocks."""
  total = flops_table(base, image_size).under(policy)
  if policy_net is not None:
    total = total + flops_table(policy_net, image_size).full
  return total
