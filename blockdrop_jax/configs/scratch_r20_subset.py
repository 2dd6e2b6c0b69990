"""The whole pipeline from nothing: train a CIFAR ResNet-20 (the original BlockDrop "avgpool"
shortcut, raw [0, 1] pixels) on the 4,000-image CIFAR-10 subset, then curriculum and finetuning.

The smoke variant swaps in a ResNet-8 base so that all three stages run in seconds.
"""

import os

from blockdrop_jax.registry import shared_data_dir
from blockdrop_jax.configs import default


def get_config(variant: str = ""):
  c = default.get_config()
  data = shared_data_dir()
  c.stages = ("pretrain", "curriculum", "finetune")
  c.base.update(arch="cifar_resnet20", shortcut="avgpool", num_classes=10)
  c.data.train = os.path.join(data, "cifar10", "subset", "data_batch_1_first4000.bin")
  c.data.test = os.path.join(data, "cifar10", "subset", "test_batch_first1000.bin")
  c.pretrain.update(epochs=60, batch_size=128)
  c.curriculum.update(epochs=15, batch_size=250)
  c.finetune.update(epochs=10, batch_size=250, lr_decay_every=1000)
  c.eval_every = 5
  if variant == "smoke":
    c.base.arch = "cifar_resnet8"
  return default.apply_variant(c, variant)
