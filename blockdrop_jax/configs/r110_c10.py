"""The original BlockDrop R110_C10 run (its README: finetuning with penalty -10 gives 93.6% at
16.9 blocks of 54). Base: ``cv/pretrained/R110_C10/pk_E_130_A_0.932.t7`` via
``--config.base.checkpoint``; raw [0, 1] pixels; "avgpool" shortcut."""

from blockdrop_jax.configs import default


def get_config(variant: str = ""):
  c = default.get_config()
  c.base.update(checkpoint="cv/pretrained/R110_C10/pk_E_130_A_0.932.t7", arch="cifar_resnet110",
                shortcut="avgpool", num_classes=10)
  c.curriculum.update(epochs=5000, batch_size=2048, lr=1e-3, beta=0.1, penalty=-1.0)
  c.finetune.update(epochs=2000, batch_size=256, lr=1e-4, lr_decay_every=1600, penalty=-10.0)
  default.apply_variant(c, variant)
  return c
