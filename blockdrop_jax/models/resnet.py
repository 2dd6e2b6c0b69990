"""Gated ResNets: one flat list of residual blocks, each switched on or off per example.

Block t computes ``residual = shortcut(x)`` and ``x = relu(residual + F_t(x))`` when kept and
``x = residual`` when dropped. Policies are per example, so dropping is a ``jnp.where`` and every
shape stays static under ``jit``. The same module (without a gating policy and with K outputs)
is the BlockDrop policy network.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from blockdrop_jax.errors import BlockDropError
from blockdrop_jax.models.batch_norm import BatchNorm

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SHORTCUTS = ("A", "avgpool", "projection")


@dataclasses.dataclass(frozen=True)
class ResNetSpec:
  """Everything needed to rebuild a network, stored beside its weights.

  ``input_mean``/``input_std`` normalise images given in [0, 1]; they belong to the weights
  (akamaster nets were trained on ImageNet-normalised pixels, the original BlockDrop CIFAR nets on
  raw [0, 1] pixels), so they travel with the checkpoint instead of being fixed per dataset.
  """

  name: str
  block: str  # "basic" or "bottleneck"
  stages: tuple[int, ...]
  widths: tuple[int, ...]
  strides: tuple[int, ...]
  stem: str  # "cifar" (3x3 conv) or "imagenet" (7x7/2 conv + 3x3/2 max pool)
  shortcut: str  # "A", "avgpool" or "projection"
  num_classes: int
  input_mean: tuple[float, ...] = (0.0, 0.0, 0.0)
  input_std: tuple[float, ...] = (1.0, 1.0, 1.0)
  input_pool: int = 1  # average-pool the input first (the ImageNet policy net runs at 112 px)

  @property
  def num_blocks(self) -> int:
    return sum(self.stages)

  @property
  def expansion(self) -> int:
    return 4 if self.block == "bottleneck" else 1

  def block_layout(self) -> list[tuple[int, int, int, int, int]]:
    """(stage, index in stage, in channels, width, stride) for each flat block t."""
    layout, in_ch = [], self.stem_width
    for stage, (n, width, stride) in enumerate(zip(self.stages, self.widths, self.strides)):
      for b in range(n):
        layout.append((stage, b, in_ch, width, stride if b == 0 else 1))
        in_ch = width * self.expansion
    return layout

  @property
  def image_size(self) -> int:
    """The input size the network is trained and tested at (its FLOPs are counted there)."""
    return 32 if self.stem == "cifar" else 224

  @property
  def stem_width(self) -> int:
    return 16 if self.stem == "cifar" else 64

  @property
  def feature_dim(self) -> int:
    return self.widths[-1] * self.expansion

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), sort_keys=True)

  @classmethod
  def from_json(cls, text: str) -> "ResNetSpec":
    fields = json.loads(text)
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


# name -> (block, stages, stem)
ARCHITECTURES = {
    **{f"cifar_resnet{6 * n + 2}": ("basic", (n, n, n), "cifar") for n in (1, 3, 5, 7, 9, 18)},
    "imagenet_resnet10": ("basic", (1, 1, 1, 1), "imagenet"),
    "imagenet_resnet18": ("basic", (2, 2, 2, 2), "imagenet"),
    "imagenet_resnet50": ("bottleneck", (3, 4, 6, 3), "imagenet"),
    "imagenet_resnet101": ("bottleneck", (3, 4, 23, 3), "imagenet"),
}


def make_spec(name: str, num_classes: Optional[int] = None, shortcut: Optional[str] = None,
              **overrides) -> ResNetSpec:
  """A spec from an architecture name; CIFAR nets default to shortcut "A", ImageNet to projection."""
  if name not in ARCHITECTURES:
    raise BlockDropError(f"unknown architecture {name!r}; choose one of: {', '.join(ARCHITECTURES)}")
  block, stages, stem = ARCHITECTURES[name]
  cifar = stem == "cifar"
  shortcut = shortcut or ("A" if cifar else "projection")
  if shortcut not in SHORTCUTS:
    raise BlockDropError(f"unknown shortcut {shortcut!r}; choose one of: {', '.join(SHORTCUTS)}")
  return ResNetSpec(
      name=name, block=block, stages=stages,
      widths=(16, 32, 64) if cifar else (64, 128, 256, 512),
      strides=(1, 2, 2) if cifar else (1, 2, 2, 2),
      stem=stem, shortcut=shortcut,
      num_classes=num_classes or (10 if cifar else 1000), **overrides)


def _conv(features: int, kernel: int, stride: int, name: str) -> nn.Conv:
  # Explicit symmetric padding as in PyTorch ("SAME" pads stride-2 convs asymmetrically).
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), (stride, stride), padding=((pad, pad), (pad, pad)),
                 use_bias=False, name=name)


# PyTorch's BatchNorm defaults: running = 0.9 running + 0.1 batch, eps 1e-5.
BATCH_NORM_MOMENTUM, BATCH_NORM_EPSILON = 0.9, 1e-5


def _batch_norm(name: str, axis_name: Optional[str] = None) -> BatchNorm:
  # With ``axis_name`` (pmap/shard_map)
  # batch statistics are averaged over devices.
  return BatchNorm(momentum=BATCH_NORM_MOMENTUM, epsilon=BATCH_NORM_EPSILON, axis_name=axis_name,
                   name=name)


def _block_relu(x):
  """relu of a block's output, written as a select that reads ``x`` twice.

  With ``nn.relu`` XLA:CPU copied each block's output computation into the next block's along
  the identity shortcut (it is a cheap elementwise chain), so each block recomputed every earlier
  output of its stage from their convolutions (tests/test_models.py): ResNet-110 inference ran
  1.3-1.7x and its training gradient 2-3x slower. XLA does not copy work into a fusion that reads
  the result twice, which stops the chain. Same values and gradient as ``nn.relu``.
  """
  return jnp.where(x > 0, x, 0.0)


class Block(nn.Module):
  """One residual block split into its two halves, so execution modes can run them apart."""

  block: str
  in_channels: int
  width: int
  stride: int
  shortcut_kind: str
  expansion: int = 1
  axis_name: Optional[str] = None

  @property
  def out_channels(self) -> int:
    return self.width * self.expansion

  @property
  def changes_shape(self) -> bool:
    return self.stride != 1 or self.in_channels != self.out_channels

  @nn.compact
  def __call__(self, x, train: bool = False, shortcut_only: bool = False, runs=True):
    """Returns (residual, relu(residual + F(x))): the dropped and the kept output; with
    ``shortcut_only`` just the dropped output (execution modes that skip the block). ``runs``
    (possibly traced): whether some image keeps the block; in training mode the branch's
    BatchNorm statistics move only then, as in the original, which skips such a block."""
    residual = self.shortcut(x, train)
    if shortcut_only:
      return residual
    return residual, _block_relu(residual + self.branch(x, train, runs))

  def branch(self, x, train, runs=True):
    def conv_bn(x, i, features, kernel, stride):
      return _batch_norm(f"bn{i}", self.axis_name)(_conv(features, kernel, stride, f"conv{i}")(x),
                                                   not train, runs)

    if self.block == "basic":
      return conv_bn(nn.relu(conv_bn(x, 1, self.width, 3, self.stride)), 2, self.width, 3, 1)
    x = nn.relu(conv_bn(x, 1, self.width, 1, 1))
    x = nn.relu(conv_bn(x, 2, self.width, 3, self.stride))
    return conv_bn(x, 3, self.out_channels, 1, 1)

  def shortcut(self, x, train):
    if not self.changes_shape:
      return x
    extra = self.out_channels - self.in_channels
    if self.shortcut_kind == "A":
      x = x[:, ::self.stride, ::self.stride, :]
      return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
    if self.shortcut_kind == "avgpool":
      x = nn.avg_pool(x, (self.stride, self.stride), (self.stride, self.stride))
      return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, extra)))
    x = nn.Conv(self.out_channels, (1, 1), (self.stride, self.stride), use_bias=False,
                name="shortcut_conv")(x)
    return _batch_norm("shortcut_bn", self.axis_name)(x, not train)


class ResNet(nn.Module):
  """A ResNet over a flat list of K blocks; ``policy`` (batch, K) in {0, 1} gates each block."""

  spec: ResNetSpec
  axis_name: Optional[str] = None  # BatchNorm averages batch statistics over it (pmap/shard_map)

  def setup(self):
    s = self.spec
    self.stem_conv = _conv(s.stem_width, 3 if s.stem == "cifar" else 7, 1 if s.stem == "cifar" else 2,
                           "stem_conv")
    self.stem_bn = _batch_norm("stem_bn", self.axis_name)
    self.blocks = [
        Block(s.block, in_ch, width, stride, s.shortcut, s.expansion, self.axis_name,
              name=f"block{t}")
        for t, (_, _, in_ch, width, stride) in enumerate(s.block_layout())]
    self.fc = nn.Dense(s.num_classes, name="fc")

  def stem(self, images, train: bool = False):
    """Normalise [0, 1] images (NHWC) and run the stem."""
    s = self.spec
    x = (images.astype(jnp.float32) - jnp.asarray(s.input_mean)) / jnp.asarray(s.input_std)
    if s.input_pool > 1:
      x = nn.avg_pool(x, (s.input_pool, s.input_pool), (s.input_pool, s.input_pool))
    x = nn.relu(self.stem_bn(self.stem_conv(x), not train))
    if s.stem == "imagenet":
      x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    return x

  def run_block(self, t: int, x, train: bool = False, runs=True):
    """(dropped output, kept output) of block t."""
    return self.blocks[t](x, train, False, runs)

  def head(self, x):
    return self.fc(jnp.mean(x, axis=(1, 2)))

  def __call__(self, images, policy=None, train: bool = False):
    check_policy(policy, images.shape[0], self.spec.num_blocks)
    x = self.stem(images, train)
    for t in range(self.spec.num_blocks):
      runs = True if policy is None or not train else self._kept_by_some_image(policy[:, t])
      dropped, kept = self.run_block(t, x, train, runs)
      x = kept if policy is None else jnp.where(policy[:, t, None, None, None] > 0.5, kept, dropped)
    return self.head(x)

  def _kept_by_some_image(self, keep):
    """Whether any image of the (global) batch keeps a block."""
    count = jnp.sum(keep > 0.5)
    return (count if self.axis_name is None else jax.lax.psum(count, self.axis_name)) > 0


def check_policy(policy, batch: int, num_blocks: int) -> None:
  """Shapes are static, so a wrong policy is caught at trace time with a readable message."""
  if policy is not None and tuple(policy.shape) != (batch, num_blocks):
    raise BlockDropError(
        f"policy has shape {tuple(policy.shape)} but this network needs (batch, K) = "
        f"({batch}, {num_blocks}): one entry per residual block for each image")


def init(spec: ResNetSpec, key: jax.Array, image_size: Optional[int] = None):
  """Random variables ({'params', 'batch_stats'}) for ``spec``."""
  size = image_size or spec.image_size
  return ResNet(spec).init(key, jnp.zeros((1, size, size, 3), jnp.float32))


def apply(spec: ResNetSpec, variables, images, policy=None, train: bool = False):
  """Logits of ``images`` (NHWC in [0, 1]) under ``policy``; with ``train`` also new batch stats."""
  model = ResNet(spec)
  if train:
    return model.apply(variables, images, policy, train=True, mutable=["batch_stats"])
  return model.apply(variables, images, policy)


def with_policy_bias(variables: dict, bias) -> dict:
  """A policy network's variables with its classifier's bias set to ``bias`` (one logit for
  every block, or one per block): where BlockDrop's keep probabilities start."""
  fc = variables["params"]["fc"]
  fc = {**fc, "bias": jnp.broadcast_to(jnp.asarray(bias, fc["bias"].dtype), fc["bias"].shape)}
  return {**variables, "params": {**variables["params"], "fc": fc}}


def policy_spec(base: ResNetSpec, arch: Optional[str] = None,
                input_pool: Optional[int] = None) -> ResNetSpec:
  """The BlockDrop policy network for ``base``: ResNet-8 (CIFAR) or ResNet-10 at 112 px (ImageNet).

  Its classifier has K outputs, the block logits; it sees the same normalised input as the base,
  average-pooled by ``input_pool`` (default 1 on CIFAR, 2 on ImageNet, as the original).
  """
  cifar = base.stem == "cifar"
  arch = arch or ("cifar_resnet8" if cifar else "imagenet_resnet10")
  return make_spec(arch, num_classes=base.num_blocks, shortcut="avgpool" if cifar else "projection",
                   input_mean=base.input_mean, input_std=base.input_std,
                   input_pool=input_pool or (1 if cifar else 2))


# One part of the network at a time, for the execution modes (execution.py, compact.py) that run
# blocks on their own.


def apply_stem(spec, variables, x, train=False):
  return ResNet(spec).apply(variables, x, train, method=lambda m, x, tr: m.stem(x, tr))


def apply_block(spec, variables, t, x):
  return ResNet(spec).apply(variables, x, method=lambda m, x: m.run_block(t, x))


def apply_shortcut(spec, variables, t, x):
  """Block t's output when dropped."""
  return ResNet(spec).apply(variables, x, method=lambda m, x: m.blocks[t](x, False, True))


def apply_head(spec, variables, x):
  return ResNet(spec).apply(variables, x, method=lambda m, x: m.head(x))


def changes_shape(spec: ResNetSpec, t: int) -> bool:
  """Whether block t's output has another shape than its input (stride or width)."""
  _, _, in_channels, width, stride = spec.block_layout()[t]
  return stride != 1 or in_channels != width * spec.expansion
