"""The original BlockDrop R32_C10 run: CIFAR-10, ResNet-32 base with the "avgpool" shortcut.

Base: the original's pretrained ``cv/pretrained/R32_C10/pk_E_164_A_0.923.t7`` (state dict), set
with ``--config.base.checkpoint=PATH``. Data: TFDS ``cifar10`` (or a local folder via
``--config.data.train=... --config.data.test=...``). Hyper-parameters: the original README.
"""

from blockdrop_jax.configs import default

# R32_C10 is the one original CIFAR base trained on normalised pixels (its utils.get_transforms).
CIFAR10_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)
CIFAR10_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)


def get_config(variant: str = ""):
  c = default.get_config()
  c.base.update(checkpoint="cv/pretrained/R32_C10/pk_E_164_A_0.923.t7", arch="cifar_resnet32",
                shortcut="avgpool", num_classes=10, input_mean=CIFAR10_MEAN, input_std=CIFAR10_STD)
  c.curriculum.update(epochs=5000, batch_size=2048, lr=1e-3, beta=0.1, penalty=-1.0)
  c.finetune.update(epochs=2000, batch_size=256, lr=1e-4, lr_decay_every=1600, penalty=-5.0)
  default.apply_variant(c, variant)
  return c
