"""The main job: BlockDrop end to end in a few minutes on a CPU.

Curriculum learning, then joint finetuning, from the pretrained akamaster ResNet-20 (by name:
found in the offline data folder or the cache, else downloaded and sha256-checked) on CIFAR-10:
the offline lossless subset when ``../shared/data`` is there, else the official archive by name.
Small on purpose (1,000 training images, 13 short epochs); see akamaster_r32_subset.py for more.
"""

import os

from blockdrop_jax.registry import shared_data_dir
from configs import default


def get_config(variant: str = ""):
  c = default.get_config()
  subset = os.path.join(shared_data_dir(), "cifar10", "subset")
  offline = os.path.isdir(subset)
  c.base.checkpoint = "akamaster/resnet20"
  c.data.train = os.path.join(subset, "data_batch_1_first4000.bin") if offline else "cifar10"
  c.data.test = os.path.join(subset, "test_batch_first1000.bin") if offline else "cifar10"
  c.data.train_limit = 1000
  c.curriculum.update(epochs=10, batch_size=100, lr=1e-3)
  c.finetune.update(epochs=3, batch_size=100, lr=1e-4, penalty=-5.0)
  c.eval_every = 5
  c.eval_batch_size = 250
  return default.apply_variant(c, variant)
