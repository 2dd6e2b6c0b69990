"""The original BlockDrop code's checkpoints (``cl_training.py``, ``finetune.py``): a policy network,
and after finetuning the ResNet, read into our networks."""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

from blockdrop_jax import convert, torch_file
from blockdrop_jax.errors import BlockDropError


def is_blockdrop_checkpoint(checkpoint: dict) -> bool:
  """A file of the original's ``cl_training.py`` or ``finetune.py``: a policy network under
  ``agent`` (``net`` in early files), and after finetuning the ResNet under ``resnet``."""
  return any(torch_file.is_state_dict(checkpoint.get(key)) for key in ("agent", "net"))


def blockdrop_state_dicts(path: str, base: Optional[str] = None) -> tuple[dict, dict]:
  """(policy network, ResNet) state dicts of one of the original's BlockDrop checkpoints: the
  policy from ``agent`` (``net`` in early files; a legacy ``features.fc`` dropped), the ResNet
  from ``resnet``, or from the ``base`` file for a curriculum checkpoint, which holds the policy
  alone."""
  checkpoint = torch_file.read_torch_file(path)
  if not is_blockdrop_checkpoint(checkpoint):
    raise BlockDropError(f"{path} is not a BlockDrop checkpoint (no 'agent' policy network inside)")
  agent = checkpoint["agent"] if torch_file.is_state_dict(checkpoint.get("agent")) else checkpoint["net"]
  agent = {k: v for k, v in agent.items() if not k.startswith("features.fc.")}
  if torch_file.is_state_dict(checkpoint.get("resnet")):
    return agent, checkpoint["resnet"]
  if not base:
    raise BlockDropError(f"{path} holds a policy network alone (a curriculum checkpoint): give "
                         "the ResNet it was trained on (evaluate.py --base FILE, or "
                         "config.base.checkpoint)")
  from blockdrop_jax import registry
  return agent, torch_file.load_torch_file(registry.resolve_weights(base))


def load_blockdrop_checkpoint(path: str, base: Optional[str] = None,
                              input_mean: Optional[Sequence[float]] = None,
                              input_std: Optional[Sequence[float]] = None):
  """(nets, params, batch_stats) of one of the original's BlockDrop checkpoints
  (``blockdrop_state_dicts``). The policy network sees the ResNet's normalised input."""
  from blockdrop_jax import steps
  agent, resnet_state = blockdrop_state_dicts(path, base)
  spec, base_vars = convert.load_pretrained_state(resnet_state)
  spec = convert.with_normalisation(spec, input_mean, input_std)
  policy, policy_vars = convert.load_pretrained_state(agent)
  if policy.num_classes != spec.num_blocks:
    raise BlockDropError(f"{path}: the policy network decides {policy.num_classes} blocks but "
                         f"{spec.name} has {spec.num_blocks}; give the base it was trained on")
  policy = dataclasses.replace(policy, input_mean=spec.input_mean, input_std=spec.input_std)
  nets = steps.Nets(spec, policy)
  return (nets, {"resnet": base_vars["params"], "policy": policy_vars["params"]},
          {"resnet": base_vars["batch_stats"], "policy": policy_vars["batch_stats"]})
