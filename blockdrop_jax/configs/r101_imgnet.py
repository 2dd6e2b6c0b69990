"""The original BlockDrop R101_ImgNet run: ImageNet ResNet-101 (torchvision weights, 76.4%),
policy ResNet-10 at 112 px started from torchvision's ResNet-18, finetuning with penalty -5 and
batch 320 (its README: 76.4% at 24.8 blocks of 33).

ImageNet streams from an image folder (``--config.data.train=/data/imagenet``, holding
``train/<class>/*.JPEG`` and ``val/<class>/*.JPEG``, torchvision's layout): training images are
resized to 256 and randomly cropped to 224 and flipped inside the step, test images are the centre
224 crop.
"""

from blockdrop_jax.configs import default

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def get_config(variant: str = ""):
  c = default.get_config()
  c.base.update(checkpoint="resnet101-5d3b4d8f.pth", arch="imagenet_resnet101",
                shortcut="projection", num_classes=1000, input_mean=IMAGENET_MEAN,
                input_std=IMAGENET_STD)
  c.data.update(train="", test="", train_split="train", test_split="val")  # the folder: required
  c.policy_init = "torchvision/resnet18"  # Policy224 loads torchvision's ResNet-18 layers
  c.curriculum.update(epochs=45, batch_size=2048, lr=1e-3, beta=0.1, penalty=-1.0)
  # finetune.py decays the learning rate every 1600 epochs: constant over these 10.
  c.finetune.update(epochs=10, batch_size=320, lr=1e-4, lr_decay_every=1600, penalty=-5.0)
  default.apply_variant(c, variant)
  return c
