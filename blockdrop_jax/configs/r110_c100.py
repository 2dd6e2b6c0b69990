"""The original BlockDrop R110_C100 run: the R32_C100 set-up with a ResNet-110 base (pretrained
72.3%) and finetuning penalty -10. Base: ``cv/pretrained/R110_C100/pk_E_160_A_0.723.t7`` via
``--config.base.checkpoint``."""

from blockdrop_jax.configs import default, r32_c100


def get_config(variant: str = ""):
  c = r32_c100.get_config()
  c.base.update(checkpoint="cv/pretrained/R110_C100/pk_E_160_A_0.723.t7", arch="cifar_resnet110")
  c.finetune.penalty = -10.0
  return default.apply_variant(c, variant)
