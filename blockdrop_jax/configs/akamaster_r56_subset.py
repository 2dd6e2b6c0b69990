"""BlockDrop on the akamaster ResNet-56 (K = 27), on the lossless CIFAR-10 subset: the R32 subset
experiment with the deeper base and a curriculum long enough to hand over all 27 blocks."""

import os

from blockdrop_jax.registry import shared_data_dir
from blockdrop_jax.configs import akamaster_r32_subset, default


def get_config(variant: str = ""):
  c = akamaster_r32_subset.get_config()
  c.base.checkpoint = os.path.join(shared_data_dir(), "pretrained", "akamaster_cifar10",
                                   "resnet56-4bfd9763.th")
  c.curriculum.epochs = 30
  return default.apply_variant(c, variant)
