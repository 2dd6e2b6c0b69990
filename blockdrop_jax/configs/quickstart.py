"""The main job: BlockDrop end to end in a few minutes on a CPU.

Curriculum learning, then joint finetuning, from the pretrained akamaster ResNet-56 (27 blocks; by
name: found in the offline data folder or the cache, else downloaded and sha256-checked) on
4,000 CIFAR-10 training images: the offline lossless subset when ``../shared/data`` is there, else
the first 4,000 of the official archive. Ten curriculum epochs and twelve finetuning epochs, batch
250. As the README runs it, ``--config quickstart:recipe``, with the short-run recipe
(``blockdrop_jax/configs/default.py``); without it, the original's settings on the same short
schedule; ``quickstart:recipe,static`` is its static-subset reference.
"""

import os

from blockdrop_jax.registry import shared_data_dir
from blockdrop_jax.configs import default


def get_config(variant: str = ""):
  c = default.get_config()
  subset = os.path.join(shared_data_dir(), "cifar10", "subset")
  offline = os.path.isdir(subset)
  c.base.checkpoint = "akamaster/resnet56"
  c.data.train = os.path.join(subset, "data_batch_1_first4000.bin") if offline else "cifar10"
  c.data.test = os.path.join(subset, "test_batch_first1000.bin") if offline else "cifar10"
  c.data.train_limit = 4000
  c.curriculum.update(epochs=10, batch_size=250)
  c.finetune.update(epochs=12, batch_size=250)
  c.eval_every = 5
  return default.apply_variant(c, variant)
