"""Independent PyTorch definitions of the networks, written for the parity tests.

They follow the original sources' module names (akamaster ``layer{i}.{b}``/``linear``, BlockDrop
``blocks.{s}.{b}``/``ds``/``fc``, torchvision ``layer{i}.{b}.downsample``) and gate each block the
way BlockDrop's ``FlatResNet.forward`` does: ``x = fx * mask + residual * (1 - mask)``, skipping
a block that no image of the batch keeps.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
  def __init__(self, cin, planes, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)

  def forward(self, x):
    return self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))


class Bottleneck(nn.Module):
  def __init__(self, cin, planes, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    return self.bn3(self.conv3(F.relu(self.bn2(self.conv2(x)))))


def shortcut_a(x, planes):
  return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4))


def shortcut_avgpool(x, out_ch):
  x = F.avg_pool2d(x, 2)
  return torch.cat([x, torch.zeros_like(x).repeat(1, out_ch // x.shape[1] - 1, 1, 1)], 1)


class AkamasterBlock(BasicBlock):
  """akamaster's block: the option-A shortcut lives inside the block."""

  def __init__(self, cin, planes, stride):
    super().__init__(cin, planes, stride)
    self.changes = stride != 1 or cin != planes
    self.planes = planes

  def shortcut(self, x):
    return shortcut_a(x, self.planes) if self.changes else x


class AkamasterResNet(nn.Module):
  def __init__(self, n, num_classes=10):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(16)
    cin, layers = 16, []
    for planes, stride in ((16, 1), (32, 2), (64, 2)):
      blocks = []
      for b in range(n):
        blocks.append(AkamasterBlock(cin, planes, stride if b == 0 else 1))
        cin = planes
      layers.append(nn.Sequential(*blocks))
    self.layer1, self.layer2, self.layer3 = layers
    self.linear = nn.Linear(64, num_classes)

  def forward(self, x, policy=None):
    x = F.relu(self.bn1(self.conv1(x)))
    t = 0
    for layer in (self.layer1, self.layer2, self.layer3):
      for block in layer:
        x = gate(block.shortcut(x), block(x), policy, t)
        t += 1
    return self.linear(F.adaptive_avg_pool2d(x, 1).flatten(1))


def gate(residual, branch, policy, t):
  fx = F.relu(residual + branch)
  if policy is None:
    return fx
  mask = policy[:, t].float().view(-1, 1, 1, 1)
  return fx * mask + residual * (1 - mask)


class FlatResNet(nn.Module):
  """The original BlockDrop layout: blocks.{s}.{b}, ds.{s}, fc (CIFAR avgpool or ImageNet stems)."""

  def __init__(self, block, layers, widths, strides, num_classes, imagenet=False, projection=None):
    super().__init__()
    stem = 64 if imagenet else 16
    self.imagenet = imagenet
    self.conv1 = nn.Conv2d(3, stem, 7 if imagenet else 3, 2 if imagenet else 1, 3 if imagenet else 1,
                           bias=False)
    self.bn1 = nn.BatchNorm2d(stem)
    expansion = 4 if block is Bottleneck else 1
    projection = imagenet if projection is None else projection
    cin, blocks, ds, self.shortcuts = stem, [], [], []
    for planes, n, stride in zip(widths, layers, strides):
      out = planes * expansion
      changes = stride != 1 or cin != out
      if changes and projection:
        ds.append(nn.Sequential(nn.Conv2d(cin, out, 1, stride, bias=False), nn.BatchNorm2d(out)))
      else:
        ds.append(nn.Sequential())
      self.shortcuts.append("avgpool" if changes and not projection else None)
      seg = []
      for b in range(n):
        seg.append(block(cin, planes, stride if b == 0 else 1))
        cin = out
      blocks.append(nn.ModuleList(seg))
    self.blocks, self.ds = nn.ModuleList(blocks), nn.ModuleList(ds)
    self.fc = nn.Linear(cin, num_classes)

  def features(self, x, policy=None):
    x = F.relu(self.bn1(self.conv1(x)))
    if self.imagenet:
      x = F.max_pool2d(x, 3, 2, 1)
    t = 0
    for s, segment in enumerate(self.blocks):
      for b, block in enumerate(segment):
        if b == 0:
          residual = (shortcut_avgpool(x, block.bn1.num_features * (4 if isinstance(block, Bottleneck) else 1))
                      if self.shortcuts[s] == "avgpool" else self.ds[s](x))
        else:
          residual = x
        if policy is not None and policy[:, t].sum() == 0:
          x = residual  # the original's early exit: a block no image keeps does not run
        else:
          x = gate(residual, block(x), policy, t)
        t += 1
    return F.adaptive_avg_pool2d(x, 1).flatten(1)

  def forward(self, x, policy=None):
    return self.fc(self.features(x, policy))


class Policy32(nn.Module):
  """The original CIFAR policy: ResNet-8 features, a logit head and an unused value head."""

  def __init__(self, num_blocks):
    super().__init__()
    self.features = FlatResNet(BasicBlock, [1, 1, 1], (16, 32, 64), (1, 2, 2), 10)
    self.features.fc = nn.Identity()
    self.logit = nn.Linear(64, num_blocks)
    self.vnet = nn.Linear(64, 1)

  def forward(self, x):
    return self.logit(self.features.features(x))


class Policy224(nn.Module):
  """The original ImageNet policy: ResNet-10 features (ImageNet stem) on the 2x average-pooled
  image, a logit head and an unused value head. (The original pools the last 4x4 map with
  ``AvgPool2d(4)``, the global average at its 112-pixel input.)"""

  def __init__(self, num_blocks):
    super().__init__()
    self.features = FlatResNet(BasicBlock, [1, 1, 1, 1], (64, 128, 256, 512), (1, 2, 2, 2), 1000,
                               imagenet=True)
    self.features.fc = nn.Identity()
    self.logit = nn.Linear(512, num_blocks)
    self.vnet = nn.Linear(512, 1)

  def forward(self, x):
    return self.logit(self.features.features(F.avg_pool2d(x, 2)))


def randomise_batch_norm(model, seed=0):
  """Non-trivial running statistics and affine parameters, so BN mistakes show."""
  g = torch.Generator().manual_seed(seed)
  for m in model.modules():
    if isinstance(m, nn.BatchNorm2d):
      m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
      m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
      m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
      m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
  return model.eval()


def to_nchw(images_uint8, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)):
  x = torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float() / 255.0
  return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
