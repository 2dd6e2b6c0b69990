"""PyTorch state dicts and our Flax trees, both ways: akamaster, original BlockDrop and torchvision
layouts, and the network a state dict describes (``infer_spec``).

Every layout is described once, as a map from PyTorch module prefixes to our Flax module paths;
import and export both walk that map, and import is strict (missing, unexpected and mis-shaped
keys are all listed in one error).
"""

from __future__ import annotations

import functools
import re
from typing import Iterator, Optional

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
