"""Our weights as safetensors files: PyTorch layout, with the network's spec in the metadata, so a
file describes itself."""

from __future__ import annotations

import os
from typing import Optional

from blockdrop_jax import torch_layout
from blockdrop_jax.errors import BlockDropError
from blockdrop_jax.models.resnet import ResNetSpec


def save_safetensors(path: str, variables: dict, spec: ResNetSpec, layout: str = "blockdrop") -> None:
  """Our weights in PyTorch layout, with the spec in the metadata so the file is self-describing."""
  from safetensors.numpy import save_file
  tmp = f"{path}.tmp"
  save_file(torch_layout.to_torch_state_dict(variables, spec, layout), tmp,
            metadata={"blockdrop_jax.spec": spec.to_json(), "blockdrop_jax.layout": layout})
  os.replace(tmp, path)


def load_safetensors(path: str) -> tuple[dict, Optional[ResNetSpec], Optional[str]]:
  """(state dict, spec if the file carries one, layout if the file carries one)."""
  from safetensors import safe_open
  try:
    with safe_open(path, framework="numpy") as f:
      metadata = f.metadata() or {}
      tensors = {k: f.get_tensor(k) for k in f.keys()}
  except Exception as e:
    raise BlockDropError(f"{path} is not a readable safetensors file ({e})") from e
  spec_json = metadata.get("blockdrop_jax.spec")
  return tensors, ResNetSpec.from_json(spec_json) if spec_json else None, metadata.get(
      "blockdrop_jax.layout")
