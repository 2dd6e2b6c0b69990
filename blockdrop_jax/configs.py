"""Loading experiment configs (``configs/NAME.py[:variant]``) and ``--config.key=value`` overrides."""

from __future__ import annotations

import ast
import importlib.util
import os
import sys

import ml_collections

from blockdrop_jax.errors import BlockDropError


def load(spec: str, overrides: list[str] = ()) -> ml_collections.ConfigDict:
  """The config of ``path[:variant]`` with overrides applied; unknown keys are errors."""
  path, _, variant = spec.partition(":")
  if not os.path.isfile(path):
    raise BlockDropError(f"config file not found: {path}")
  root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
  if root not in sys.path:
    sys.path.insert(0, root)  # configs import each other as ``configs.default``
  module_spec = importlib.util.spec_from_file_location(f"_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  try:
    config = module.get_config(variant)
  except ValueError as e:
    raise BlockDropError(f"{path}: {e}") from e
  from configs import default  # the schema every experiment extends
  check_keys(config, default.get_config())
  config.lock()
  for override in overrides:
    apply_override(config, override)
  return config


def check_keys(config, schema, prefix: str = "config") -> None:
  """A key the default config does not have is a typo, not a new setting."""
  for key, value in config.items():
    if key not in schema:
      raise BlockDropError(f"unknown config key {prefix}.{key}; known keys: {', '.join(sorted(schema))}")
    if isinstance(value, ml_collections.ConfigDict):
      check_keys(value, schema[key], f"{prefix}.{key}")


def apply_override(config: ml_collections.ConfigDict, override: str) -> None:
  """``--config.a.b=value``: the value is parsed as a Python literal and must keep the key's type."""
  if not override.startswith("--config.") or "=" not in override:
    raise BlockDropError(f"unknown argument {override!r}; overrides look like --config.finetune.penalty=-10")
  dotted, text = override[len("--config."):].split("=", 1)
  *parents, leaf = dotted.split(".")
  node = config
  for i, name in enumerate(parents + [leaf]):
    if not isinstance(node, ml_collections.ConfigDict) or name not in node:
      known = ", ".join(sorted(node)) if isinstance(node, ml_collections.ConfigDict) else "none"
      raise BlockDropError(f"unknown config key config.{'.'.join((parents + [leaf])[:i + 1])}; "
                           f"known keys there: {known}")
    if name != leaf or i < len(parents):
      node = node[name]
  value = _parse(text, config_value := node[leaf])
  try:
    node[leaf] = value
  except (TypeError, ValueError) as e:
    raise BlockDropError(f"config.{dotted}: cannot set {text!r} on a {type(config_value).__name__} "
                         f"value ({e})") from e


def _parse(text: str, current):
  if isinstance(current, bool):
    if text.lower() in ("true", "1", "yes"):
      return True
    if text.lower() in ("false", "0", "no"):
      return False
  if isinstance(current, str):
    return text
  if isinstance(current, tuple):
    return tuple(part.strip() for part in text.split(",") if part.strip())
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text
  return float(value) if isinstance(current, float) and isinstance(value, int) else value
