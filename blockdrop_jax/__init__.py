"""BlockDrop in JAX: per-image dynamic depth for pretrained ResNets."""

from blockdrop_jax.errors import BlockDropError
from blockdrop_jax.models.resnet import ResNet, ResNetSpec, make_spec

__all__ = ["BlockDropError", "ResNet", "ResNetSpec", "make_spec"]
