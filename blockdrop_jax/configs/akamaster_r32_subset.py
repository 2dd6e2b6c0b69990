"""BlockDrop on the akamaster ResNet-32, trained on the 4,000 lossless CIFAR-10 training images of
``../shared/data`` and tested on its 1,000 test images.

The original runs use batch 2048 on 50,000 images; on 4,000 images that would be two steps per
epoch, so batches are smaller here and the curriculum hands over one block per epoch.
"""

import os

from blockdrop_jax.registry import shared_data_dir
from blockdrop_jax.configs import default


def get_config(variant: str = ""):
  c = default.get_config()
  data = shared_data_dir()
  c.base.checkpoint = os.path.join(data, "pretrained", "akamaster_cifar10", "resnet32-d509ac18.th")
  c.data.train = os.path.join(data, "cifar10", "subset", "data_batch_1_first4000.bin")
  c.data.test = os.path.join(data, "cifar10", "subset", "test_batch_first1000.bin")
  c.curriculum.update(epochs=25, batch_size=250, lr=1e-3)
  c.finetune.update(epochs=10, batch_size=250, lr=1e-4, lr_decay_every=1000, penalty=-5.0)
  c.eval_every = 5
  return default.apply_variant(c, variant)
