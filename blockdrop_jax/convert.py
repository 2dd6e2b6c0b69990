"""PyTorch weights in and out: akamaster, original BlockDrop and torchvision layouts; safetensors.

Every layout is described once, as a map from PyTorch module prefixes to our Flax module paths;
import and export both walk that map, and import is strict (missing, unexpected and mis-shaped
keys are all listed in one error).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import re
from typing import Iterator, Optional, Sequence

import numpy as np

import jax

from blockdrop_jax.errors import BlockDropError
from blockdrop_jax.models import resnet
from blockdrop_jax.models.resnet import (ARCHITECTURES, IMAGENET_MEAN, IMAGENET_STD, ResNetSpec,
                                         make_spec)

LAYOUTS = ("akamaster", "blockdrop", "blockdrop_policy", "torchvision")
# Keys that PyTorch stores but that carry no weights we use.
_IGNORED = re.compile(r"(^|\.)num_batches_tracked$|^vnet\.(weight|bias)$")


def _modules(spec: ResNetSpec, layout: str) -> Iterator[tuple[str, tuple[str, ...], str]]:
  """(PyTorch module prefix, Flax module path, kind) for every weighted module of ``spec``."""
  prefix = "features." if layout == "blockdrop_policy" else ""
  yield f"{prefix}conv1", ("stem_conv",), "conv"
  yield f"{prefix}bn1", ("stem_bn",), "bn"
  convs = ("conv1", "conv2", "conv3") if spec.block == "bottleneck" else ("conv1", "conv2")
  for t, (stage, b, in_ch, width, stride) in enumerate(spec.block_layout()):
    block = (f"{prefix}blocks.{stage}.{b}" if layout.startswith("blockdrop")
             else f"layer{stage + 1}.{b}")
    for i, conv in enumerate(convs, start=1):
      yield f"{block}.{conv}", (f"block{t}", conv), "conv"
      yield f"{block}.bn{i}", (f"block{t}", f"bn{i}"), "bn"
    projects = spec.shortcut == "projection" and (stride != 1 or in_ch != width * spec.expansion)
    if projects:
      shortcut = {"akamaster": f"{block}.shortcut", "torchvision": f"{block}.downsample"}.get(
          layout, f"{prefix}ds.{stage}")
      yield f"{shortcut}.0", (f"block{t}", "shortcut_conv"), "conv"
      yield f"{shortcut}.1", (f"block{t}", "shortcut_bn"), "bn"
  head = {"akamaster": "linear", "blockdrop_policy": "logit"}.get(layout, "fc")
  yield head, ("fc",), "linear"


# kind -> [(PyTorch suffix, Flax collection, Flax leaf, PyTorch->Flax transpose)]
_TENSORS = {
    "conv": [("weight", "params", "kernel", (2, 3, 1, 0))],
    "linear": [("weight", "params", "kernel", (1, 0)), ("bias", "params", "bias", None)],
    "bn": [("weight", "params", "scale", None), ("bias", "params", "bias", None),
           ("running_mean", "batch_stats", "mean", None),
           ("running_var", "batch_stats", "var", None)],
}


def _entries(spec: ResNetSpec, layout: str):
  for module, path, kind in _modules(spec, layout):
    for suffix, collection, leaf, perm in _TENSORS[kind]:
      yield f"{module}.{suffix}", (collection, *path, leaf), perm


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _set(tree: dict, path, value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def from_torch_state_dict(state_dict: dict, spec: ResNetSpec, layout: Optional[str] = None) -> dict:
  """Flax variables ({'params', 'batch_stats'}) from a PyTorch state dict, strictly."""
  state_dict = strip_module_prefix(state_dict)
  layout = layout or detect_layout(state_dict)
  expected = {key: (path, perm) for key, path, perm in _entries(spec, layout)}
  missing = sorted(set(expected) - set(state_dict))
  unexpected = sorted(k for k in state_dict if k not in expected and not _IGNORED.search(k))
  variables, misshaped = {}, []
  for key, (path, perm) in expected.items():
    if key not in state_dict:
      continue
    value = np.asarray(state_dict[key], dtype=np.float32)
    value = value.transpose(perm) if perm else value
    want = _expected_shape(spec, path)
    if want is not None and value.shape != want:
      misshaped.append(f"{key}: file {value.shape} vs model {want}")
      continue
    _set(variables, path, value)
  problems = []
  for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
    if items:
      problems.append(f"{len(items)} {label}: {', '.join(items[:8])}" + (" ..." if len(items) > 8 else ""))
  if problems:
    raise BlockDropError(
        f"checkpoint does not match {spec.name} (K={spec.num_blocks}, shortcut {spec.shortcut}, "
        f"{spec.num_classes} classes) in the {layout} layout: " + "; ".join(problems)
        + ". Pick the architecture the file was trained with (--arch), or the right file.")
  return variables


def _expected_shape(spec: ResNetSpec, path) -> Optional[tuple[int, ...]]:
  """Shape of one variable of ``spec``, computed abstractly (no FLOPs, no memory)."""
  shapes = _abstract_shapes(spec)
  try:
    return tuple(_get(shapes, path))
  except KeyError:
    return None


@functools.lru_cache(maxsize=16)
def _abstract_shapes(spec: ResNetSpec) -> dict:
  tree = jax.eval_shape(lambda: resnet.init(spec, jax.random.key(0)))
  return jax.tree.map(lambda a: a.shape, tree)


def to_torch_state_dict(variables: dict, spec: ResNetSpec, layout: str = "blockdrop") -> dict:
  """Our variables as a PyTorch-layout dict of numpy arrays (default: BlockDrop ``FlatResNet``)."""
  out = {}
  for key, path, perm in _entries(spec, layout):
    value = np.asarray(_get(variables, path), dtype=np.float32)
    out[key] = np.ascontiguousarray(value.transpose(np.argsort(perm)) if perm else value)
  return out


def strip_module_prefix(state_dict: dict) -> dict:
  """DataParallel checkpoints (akamaster) prefix every key with 'module.'."""
  if state_dict and all(k.startswith("module.") for k in state_dict):
    return {k[len("module."):]: v for k, v in state_dict.items()}
  return dict(state_dict)


def detect_layout(state_dict: dict) -> str:
  keys = set(strip_module_prefix(state_dict))
  if any(k.startswith("features.blocks.") for k in keys):
    return "blockdrop_policy"
  if any(k.startswith("blocks.") for k in keys):
    return "blockdrop"
  if "linear.weight" in keys and any(k.startswith("layer1.") for k in keys):
    return "akamaster"
  if "fc.weight" in keys and any(k.startswith("layer1.") for k in keys):
    return "torchvision"
  raise BlockDropError(
      "cannot tell the layout of this state dict (expected akamaster 'layer1.*' + 'linear.*', "
      "BlockDrop 'blocks.*' / 'features.blocks.*', or torchvision 'layer1.*' + 'fc.*' keys)")


def infer_spec(state_dict: dict, arch: Optional[str] = None,
               shortcut: Optional[str] = None) -> tuple[ResNetSpec, str]:
  """Architecture and layout of a PyTorch state dict from its keys; ``arch`` overrides depth.

  Input normalisation follows the source: akamaster nets and every ImageNet net (torchvision's,
  the original BlockDrop R101) use ImageNet mean/std; the original BlockDrop CIFAR nets and their
  felixgwu bases (``layerN.*`` + ``fc`` keys with a CIFAR stem) raw [0, 1] pixels. The original's
  R32_C10 alone was trained on CIFAR mean/std: ``blockdrop_jax/configs/r32_c10.py`` sets it, and
  ``config.base.input_mean/std`` or ``evaluate.py --input_mean/--input_std`` override any file.
  """
  sd = strip_module_prefix(state_dict)
  layout = detect_layout(sd)
  policy = layout == "blockdrop_policy"
  prefix = "features." if policy else ""
  block_re = (re.compile(rf"^{re.escape(prefix)}blocks\.(\d+)\.(\d+)\.") if layout.startswith("blockdrop")
              else re.compile(r"^layer(\d+)\.(\d+)\."))
  per_stage: dict[int, set] = {}
  for key in sd:
    m = block_re.match(key)
    if m:
      per_stage.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
  stages = tuple(len(per_stage[s]) for s in sorted(per_stage))
  bottleneck = any(".conv3." in k for k in sd)
  head = {"akamaster": "linear", "blockdrop_policy": "logit"}.get(layout, "fc")
  num_classes = int(np.shape(sd[f"{head}.weight"])[0])
  stem_kernel = np.shape(sd[f"{prefix}conv1.weight"])[-1]
  stem = "imagenet" if stem_kernel == 7 else "cifar"
  if arch is None:
    block = "bottleneck" if bottleneck else "basic"
    matches = [name for name, (b, st, sm) in ARCHITECTURES.items()
               if (b, st, sm) == (block, stages, stem)]
    if not matches:
      raise BlockDropError(f"no known architecture has {block} blocks {stages} with a {stem} stem; "
                           "pass --arch")
    arch = matches[0]
  if shortcut is None:
    projections = any(re.search(r"(^|\.)(ds\.\d+|shortcut|downsample)\.0\.weight$", k) for k in sd)
    shortcut = ("projection" if projections or stem == "imagenet"
                else "A" if layout == "akamaster" else "avgpool")
  normalised = layout == "akamaster" or stem == "imagenet"
  spec = make_spec(arch, num_classes=num_classes, shortcut=shortcut,
                   input_mean=IMAGENET_MEAN if normalised else (0.0, 0.0, 0.0),
                   input_std=IMAGENET_STD if normalised else (1.0, 1.0, 1.0),
                   input_pool=2 if policy and stem == "imagenet" else 1)
  return spec, layout


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


def _is_state_dict(obj) -> bool:
  return isinstance(obj, dict) and bool(obj) and all(hasattr(v, "shape") for v in obj.values())


def is_blockdrop_checkpoint(checkpoint: dict) -> bool:
  """A file of the original's ``cl_training.py`` or ``finetune.py``: a policy network under
  ``agent`` (``net`` in early files), and after finetuning the ResNet under ``resnet``."""
  return any(_is_state_dict(checkpoint.get(key)) for key in ("agent", "net"))


def state_dict_of(checkpoint: dict, path: str) -> dict:
  """The state dict of a base network's file: the dict itself, or its ``state_dict`` (felixgwu,
  akamaster), ``model`` or ``resnet`` (a BlockDrop checkpoint's ResNet) entry."""
  if _is_state_dict(checkpoint):
    return checkpoint
  for key in ("state_dict", "model", "resnet"):
    if _is_state_dict(checkpoint.get(key)):
      return checkpoint[key]
  raise BlockDropError(f"{path} holds no state dict of tensors (keys: {', '.join(map(str, checkpoint))})")


def load_torch_file(path: str) -> dict:
  """A network's state dict from a PyTorch or safetensors file."""
  if path.endswith(".safetensors"):
    return load_safetensors(path)[0]
  return state_dict_of(read_torch_file(path), path)


def save_safetensors(path: str, variables: dict, spec: ResNetSpec, layout: str = "blockdrop") -> None:
  """Our weights in PyTorch layout, with the spec in the metadata so the file is self-describing."""
  from safetensors.numpy import save_file
  tmp = f"{path}.tmp"
  save_file(to_torch_state_dict(variables, spec, layout), tmp,
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
    state_dict, spec, layout = load_safetensors(path)
  else:
    state_dict = load_torch_file(path)
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
  inferred, inferred_layout = infer_spec(state_dict, arch, shortcut)
  if spec is None or arch is not None or shortcut is not None:
    spec = inferred
  layout = layout or inferred_layout
  return spec, from_torch_state_dict(state_dict, spec, layout)


def blockdrop_state_dicts(path: str, base: Optional[str] = None) -> tuple[dict, dict]:
  """(policy network, ResNet) state dicts of one of the original's BlockDrop checkpoints: the
  policy from ``agent`` (``net`` in early files; a legacy ``features.fc`` dropped), the ResNet
  from ``resnet``, or from the ``base`` file for a curriculum checkpoint, which holds the policy
  alone."""
  checkpoint = read_torch_file(path)
  if not is_blockdrop_checkpoint(checkpoint):
    raise BlockDropError(f"{path} is not a BlockDrop checkpoint (no 'agent' policy network inside)")
  agent = checkpoint["agent"] if _is_state_dict(checkpoint.get("agent")) else checkpoint["net"]
  agent = {k: v for k, v in agent.items() if not k.startswith("features.fc.")}
  if _is_state_dict(checkpoint.get("resnet")):
    return agent, checkpoint["resnet"]
  if not base:
    raise BlockDropError(f"{path} holds a policy network alone (a curriculum checkpoint): give "
                         "the ResNet it was trained on (evaluate.py --base FILE, or "
                         "config.base.checkpoint)")
  from blockdrop_jax import registry
  return agent, load_torch_file(registry.resolve_weights(base))


def load_blockdrop_checkpoint(path: str, base: Optional[str] = None,
                              input_mean: Optional[Sequence[float]] = None,
                              input_std: Optional[Sequence[float]] = None):
  """(nets, params, batch_stats) of one of the original's BlockDrop checkpoints
  (``blockdrop_state_dicts``). The policy network sees the ResNet's normalised input."""
  from blockdrop_jax import steps
  agent, resnet_state = blockdrop_state_dicts(path, base)
  spec, base_vars = load_pretrained_state(resnet_state)
  spec = with_normalisation(spec, input_mean, input_std)
  policy, policy_vars = load_pretrained_state(agent)
  if policy.num_classes != spec.num_blocks:
    raise BlockDropError(f"{path}: the policy network decides {policy.num_classes} blocks but "
                         f"{spec.name} has {spec.num_blocks}; give the base it was trained on")
  policy = dataclasses.replace(policy, input_mean=spec.input_mean, input_std=spec.input_std)
  nets = steps.Nets(spec, policy)
  return (nets, {"resnet": base_vars["params"], "policy": policy_vars["params"]},
          {"resnet": base_vars["batch_stats"], "policy": policy_vars["batch_stats"]})


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
