"""The networks in PyTorch (an optional part: needs torch), for checking a file across frameworks.

``network(spec)`` builds a ResNet of any ``ResNetSpec`` as the original BlockDrop code runs it:
the original's ``FlatResNet`` module names (``conv1``, ``bn1``, ``blocks.{stage}.{b}``, ``ds``,
``fc``), each block gated by the policy (``x = fx * mask + residual * (1 - mask)``, a block no
image keeps not run), input normalisation and pooling as the spec says. ``logits`` runs a
PyTorch file's own tensors through it (``evaluate.py --cross_check``). ``original_update`` is one
update of the original's ``cl_training.py`` or ``finetune.py``, the reference that training is
tested against (tests/test_step_parity.py) and timed against (benchmarks/train_speed.py).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from blockdrop_jax import torch_layout
from blockdrop_jax.errors import BlockDropError
from blockdrop_jax.models.resnet import ResNetSpec


class _Branch(nn.Module):
  def __init__(self, block: str, cin: int, width: int, stride: int):
    super().__init__()
    self.basic = block == "basic"
    if self.basic:
      self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
      self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
    else:
      self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
      self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
      self.conv3 = nn.Conv2d(width, width * 4, 1, bias=False)
      self.bn3 = nn.BatchNorm2d(width * 4)
    self.bn1, self.bn2 = nn.BatchNorm2d(width), nn.BatchNorm2d(width)

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    x = self.bn2(self.conv2(x))
    return x if self.basic else self.bn3(self.conv3(F.relu(x)))


class FlatResNet(nn.Module):
  """A ResNet of ``spec`` with the original's flat layout and gating."""

  def __init__(self, spec: ResNetSpec):
    super().__init__()
    self.spec = spec
    imagenet = spec.stem == "imagenet"
    self.conv1 = nn.Conv2d(3, spec.stem_width, 7 if imagenet else 3, 2 if imagenet else 1,
                           3 if imagenet else 1, bias=False)
    self.bn1 = nn.BatchNorm2d(spec.stem_width)
    layout = spec.block_layout()
    stages = sorted({stage for stage, *_ in layout})
    self.blocks = nn.ModuleList(nn.ModuleList() for _ in stages)
    self.ds = nn.ModuleList(nn.Sequential() for _ in stages)
    for stage, b, cin, width, stride in layout:
      self.blocks[stage].append(_Branch(spec.block, cin, width, stride))
      out = width * spec.expansion
      if b == 0 and spec.shortcut == "projection" and (stride != 1 or cin != out):
        self.ds[stage] = nn.Sequential(nn.Conv2d(cin, out, 1, stride, bias=False),
                                       nn.BatchNorm2d(out))
    self.fc = nn.Linear(layout[-1][3] * spec.expansion, spec.num_classes)

  def _shortcut(self, stage: int, x, cin: int, out: int, stride: int):
    if stride == 1 and cin == out:
      return x
    if self.spec.shortcut == "projection":
      return self.ds[stage](x)
    if self.spec.shortcut == "A":  # x[:, ::2, ::2], zero channels on both sides
      extra = out - cin
      return F.pad(x[:, :, ::stride, ::stride], (0, 0, 0, 0, extra // 2, extra - extra // 2))
    x = F.avg_pool2d(x, stride)  # "avgpool": zero channels appended
    return torch.cat([x, torch.zeros_like(x[:, :1]).expand(-1, out - cin, -1, -1)], 1)

  def forward(self, images, policy: Optional[torch.Tensor] = None):
    """Logits of NCHW images in [0, 1] under ``policy`` (batch, K)."""
    s = self.spec
    x = (images - torch.tensor(s.input_mean).view(1, 3, 1, 1)) / torch.tensor(
        s.input_std).view(1, 3, 1, 1)
    if s.input_pool > 1:
      x = F.avg_pool2d(x, s.input_pool)
    x = F.relu(self.bn1(self.conv1(x)))
    if s.stem == "imagenet":
      x = F.max_pool2d(x, 3, 2, 1)
    for t, (stage, b, cin, width, stride) in enumerate(s.block_layout()):
      residual = self._shortcut(stage, x, cin, width * s.expansion, stride)
      if policy is not None and policy[:, t].sum() == 0:
        x = residual
        continue
      fx = F.relu(residual + self.blocks[stage][b](x))
      x = fx if policy is None else (fx * policy[:, t].view(-1, 1, 1, 1)
                                     + residual * (1 - policy[:, t].view(-1, 1, 1, 1)))
    return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def network(spec: ResNetSpec, state_dict: dict, layout: str) -> FlatResNet:
  """The PyTorch network of ``spec`` holding a file's own tensors (``layout``: the file's key
  naming, as ``torch_layout`` names layouts), in inference mode."""
  model = FlatResNet(spec)
  state_dict = torch_layout.strip_module_prefix(state_dict)
  renamed = {}
  for (theirs, path, _), (mine, _, _) in zip(torch_layout._modules(spec, layout),
                                             torch_layout._modules(spec, "blockdrop")):
    for key, value in state_dict.items():
      if key.startswith(theirs + "."):
        renamed[mine + key[len(theirs):]] = torch.from_numpy(np.array(value, np.float32))
  missing, _ = model.load_state_dict(renamed, strict=False)
  missing = [k for k in missing if not k.endswith("num_batches_tracked")]
  if missing:
    raise BlockDropError(f"the PyTorch network of {spec.name} lacks {missing[:4]}")
  return model.eval()


def logits(model: FlatResNet, images: np.ndarray, policy: Optional[np.ndarray] = None,
           batch_size: int = 250) -> np.ndarray:
  """Logits of uint8 NHWC ``images`` (centre-cropped to the network's size)."""
  size = model.spec.image_size
  top, left = (images.shape[1] - size) // 2, (images.shape[2] - size) // 2
  out = []
  with torch.no_grad():
    for start in range(0, len(images), batch_size):
      x = images[start:start + batch_size, top:top + size, left:left + size]
      x = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float() / 255.0
      p = None if policy is None else torch.from_numpy(
          np.asarray(policy[start:start + batch_size], np.float32))
      out.append(model(x, p).numpy())
  return np.concatenate(out)


def original_update(agent, rnet, optimizer, x, labels, uniforms, k: int, finetune: bool,
                    alpha: float = 0.8, beta: float = 0.1, penalty: float = -1.0) -> float:
  """One update as the original scripts make it (their code written out for PyTorch 2): the
  policy network in training mode; the ResNet frozen in inference mode for the curriculum, in
  training mode for finetuning, its greedy pass first, without gradient; the Bernoulli samples
  drawn as ``uniforms < p'``. The gradients stay in the parameters' ``.grad``; returns the loss."""
  agent.train()
  rnet.train(finetune)
  probs = torch.sigmoid(agent(x))
  policy_map = (probs.detach() >= 0.5).float()
  probs = probs * alpha + (1 - probs) * (1 - alpha)
  distr = torch.distributions.Bernoulli(probs)
  policy = (uniforms < probs.detach()).float()  # distr.sample() with the given uniform draws
  num_blocks = policy.shape[1]
  mask = None
  if k < num_blocks:
    policy[:, :-k] = 1
    policy_map[:, :-k] = 1
    mask = torch.ones_like(policy)
    mask[:, :-k] = 0

  def reward(preds, policy):
    sparse = 1.0 - (policy.sum(1) / num_blocks) ** 2
    return torch.where(preds.argmax(1) == labels, sparse, torch.full_like(sparse, penalty))[:, None]

  with torch.no_grad():
    preds_map = rnet(x, policy_map)
  if finetune:
    preds_sample = rnet(x, policy)
    advantage = reward(preds_sample.detach(), policy) - reward(preds_map, policy_map)
    loss = (-distr.log_prob(policy).sum(1, keepdim=True) * advantage).sum()
    loss = loss + F.cross_entropy(preds_sample, labels)
  else:
    with torch.no_grad():
      preds_sample = rnet(x, policy)
    advantage = reward(preds_sample, policy) - reward(preds_map, policy_map)
    loss = -distr.log_prob(policy) * advantage.expand_as(policy)
    loss = (mask * loss if mask is not None else loss).sum()
    probs = probs.clamp(1e-15, 1 - 1e-15)
    loss = (loss - beta * (-probs * torch.log(probs)).sum()) / x.shape[0]
  optimizer.zero_grad()
  loss.backward()
  optimizer.step()
  return loss.item()
