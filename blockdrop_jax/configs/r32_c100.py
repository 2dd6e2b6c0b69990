"""The original BlockDrop R32_C100 run: CIFAR-100, ResNet-32 (pretrained 69.3%), raw pixels.
Base: ``cv/pretrained/R32_C100/pk_E_164_A_0.693.t7`` via ``--config.base.checkpoint``."""

from blockdrop_jax.configs import default


def get_config(variant: str = ""):
  c = default.get_config()
  c.base.update(checkpoint="cv/pretrained/R32_C100/pk_E_164_A_0.693.t7", arch="cifar_resnet32",
                shortcut="avgpool", num_classes=100)
  c.data.update(train="cifar100", test="cifar100", dataset="cifar100")
  c.curriculum.update(epochs=5000, batch_size=2048, lr=1e-3, beta=0.1, penalty=-1.0)
  c.finetune.update(epochs=2000, batch_size=256, lr=1e-4, lr_decay_every=1600, penalty=-5.0)
  default.apply_variant(c, variant)
  return c
