"""PyTorch checkpoint files read safely: ``torch.load(weights_only=True)`` with an explicit
allow-list, tensors as numpy arrays, and the state dict found inside the file's dict."""

from __future__ import annotations

import argparse
import os

from blockdrop_jax import safetensors_file
from blockdrop_jax.errors import BlockDropError


# Globals the original release's files pickle besides tensors and containers: its felixgwu
# bases keep the ``argparse.Namespace`` of their training run. Anything else is refused.
ALLOWED_GLOBALS = (argparse.Namespace,)


def read_torch_file(path: str) -> dict:
  """The dict a PyTorch checkpoint holds, read with ``torch.load(weights_only=True)`` and only
  ``ALLOWED_GLOBALS`` besides tensors (never arbitrary pickles); tensors become numpy arrays."""
  if not os.path.isfile(path):
    raise BlockDropError(f"checkpoint file not found: {path}")
  try:
    import torch
  except ImportError as e:
    raise BlockDropError("reading PyTorch files needs torch: pip install 'blockdrop-jax[torch]' "
                         "(CPU build: pip install torch==2.13.0)") from e
  try:
    with torch.serialization.safe_globals(list(ALLOWED_GLOBALS)):
      obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises UnpicklingError, RuntimeError or others for bad files
    raise BlockDropError(
        f"refusing to load {path}: it cannot be read with torch.load(weights_only=True) "
        f"({type(e).__name__}: {str(e).splitlines()[0][:200]}). Only tensor checkpoints are "
        "accepted; re-save the state_dict alone, or convert it to safetensors.") from e
  if not isinstance(obj, dict):
    raise BlockDropError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict")
  return _to_numpy(obj)


def _to_numpy(obj):
  if hasattr(obj, "detach"):
    return obj.detach().cpu().numpy()
  if isinstance(obj, dict):
    return {key: _to_numpy(value) for key, value in obj.items()}
  return obj


def is_state_dict(obj) -> bool:
  return isinstance(obj, dict) and bool(obj) and all(hasattr(v, "shape") for v in obj.values())


def state_dict_of(checkpoint: dict, path: str) -> dict:
  """The state dict of a base network's file: the dict itself, or its ``state_dict`` (felixgwu,
  akamaster), ``model`` or ``resnet`` (a BlockDrop checkpoint's ResNet) entry."""
  if is_state_dict(checkpoint):
    return checkpoint
  for key in ("state_dict", "model", "resnet"):
    if is_state_dict(checkpoint.get(key)):
      return checkpoint[key]
  raise BlockDropError(f"{path} holds no state dict of tensors (keys: {', '.join(map(str, checkpoint))})")


def load_torch_file(path: str) -> dict:
  """A network's state dict from a PyTorch or safetensors file."""
  if path.endswith(".safetensors"):
    return safetensors_file.load_safetensors(path)[0]
  return state_dict_of(read_torch_file(path), path)
