"""Pretrained weights into our networks, from any file the project reads (a PyTorch file in any
known layout, our safetensors export, a registry name), and a policy network started from a
ResNet's blocks. The formats: ``torch_layout``, ``torch_file``, ``safetensors_file``,
``original_checkpoint``."""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence

import jax
import numpy as np

from blockdrop_jax import safetensors_file, torch_file, torch_layout
from blockdrop_jax.errors import BlockDropError
from blockdrop_jax.models.resnet import ResNetSpec


def load_pretrained(path: str, arch: Optional[str] = None, shortcut: Optional[str] = None,
                    input_mean: Optional[Sequence[float]] = None,
                    input_std: Optional[Sequence[float]] = None) -> tuple[ResNetSpec, dict]:
  """(spec, variables) from a PyTorch ``.th``/``.pt``/``.t7`` file, our safetensors export, or a
  known name such as ``akamaster/resnet32`` (resolved, downloaded if needed, and sha256-checked).
  ``input_mean``/``input_std`` replace the normalisation inferred for the file."""
  from blockdrop_jax import registry
  if path in registry.WEIGHTS:
    path = registry.resolve_weights(path)
  spec = layout = None
  if path.endswith(".safetensors") and os.path.isfile(path):
    state_dict, spec, layout = safetensors_file.load_safetensors(path)
  else:
    state_dict = torch_file.load_torch_file(path)
  spec, variables = load_pretrained_state(state_dict, arch, shortcut, spec, layout)
  return with_normalisation(spec, input_mean, input_std), variables


def with_normalisation(spec: ResNetSpec, input_mean: Optional[Sequence[float]] = None,
                       input_std: Optional[Sequence[float]] = None) -> ResNetSpec:
  """``spec`` with the input mean and std replaced where given (three numbers each)."""
  for name, value in (("input_mean", input_mean), ("input_std", input_std)):
    if value and len(value) != 3:
      raise BlockDropError(f"{name} needs 3 numbers (one per RGB channel), got {list(value)}")
  return dataclasses.replace(spec, input_mean=tuple(map(float, input_mean or spec.input_mean)),
                             input_std=tuple(map(float, input_std or spec.input_std)))


def load_pretrained_state(state_dict: dict, arch: Optional[str] = None, shortcut: Optional[str] = None,
                          spec: Optional[ResNetSpec] = None,
                          layout: Optional[str] = None) -> tuple[ResNetSpec, dict]:
  """(spec, variables) from a state dict; a stored ``spec`` wins unless arch/shortcut override it."""
  inferred, inferred_layout = torch_layout.infer_spec(state_dict, arch, shortcut)
  if spec is None or arch is not None or shortcut is not None:
    spec = inferred
  layout = layout or inferred_layout
  return spec, torch_layout.from_torch_state_dict(state_dict, spec, layout)


def policy_from_resnet(policy: ResNetSpec, variables: dict, source: str) -> dict:
  """``variables`` of a policy network with its stem and the first block of each stage (its
  downsample included) taken from the ResNet in ``source`` (a file or a registry name), as the
  original starts its ImageNet policy network (ResNet-10) from torchvision's ResNet-18; the
  classifier keeps its own weights."""
  spec, donor = load_pretrained(source)
  first_blocks = {stage: t for t, (stage, b, *_) in enumerate(spec.block_layout()) if b == 0}
  names = {"stem_conv": "stem_conv", "stem_bn": "stem_bn"}
  for t, (stage, b, *_) in enumerate(policy.block_layout()):
    if b != 0 or stage not in first_blocks:
      raise BlockDropError(f"{source} ({spec.name}) cannot start the {policy.name} policy network: "
                           "it needs one block per stage and the same stages")
    names[f"block{t}"] = f"block{first_blocks[stage]}"
  out = {collection: dict(tree) for collection, tree in variables.items()}
  for collection, tree in out.items():
    for ours, theirs in names.items():
      if ours not in tree:
        continue
      taken = donor[collection][theirs]
      if jax.tree.map(np.shape, taken) != jax.tree.map(np.shape, tree[ours]):
        raise BlockDropError(f"{source} ({spec.name}): {theirs} does not fit {policy.name}'s "
                             f"{ours}; give a ResNet with the policy network's widths")
      tree[ours] = taken
  return out
