"""Experiment configs through ``ml_collections.config_flags``, as flax's examples load them.

Each experiment is a module of this package (``default`` documents every key) whose
``get_config(variant)`` returns a ``ConfigDict``. ``--config NAME[:variant]`` names one of them
(``quickstart:recipe``), so the configs work from an installed package; ``--config
path/to/file.py[:variant]`` loads any file with a ``get_config``, as config_flags does.
``--config.a.b=value`` overrides a key and keeps its type. On top of config_flags: a key the
default config does not have is a typo, and a tuple of names may be given comma-separated
(``--config.stages=pretrain,curriculum``).
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Optional, Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

from blockdrop_jax.errors import BlockDropError

HELP = ("an experiment of blockdrop_jax/configs by name (quickstart) or a config file (.py), "
        "optionally with variants (:smoke, :recipe, :static, combined as :recipe,smoke); override "
        "keys with --config.a.b=value")
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def experiments() -> list[str]:
  """The names of the experiment configs shipped with the package."""
  return sorted(name.removesuffix(".py") for name in os.listdir(PACKAGE_DIR)
                if name.endswith(".py") and not name.startswith("_"))


def config_file(spec: str) -> str:
  """``NAME[:variant]`` of a packaged experiment as its file path (with the variant); a path to a
  file is returned as it is."""
  name, colon, variant = spec.partition(":")
  if name.endswith(".py") or os.sep in name or "/" in name:
    return spec
  if name not in experiments():
    raise BlockDropError(f"unknown config {name!r} (--config): use one of {', '.join(experiments())}"
                         " or a path to a config file (.py)")
  return os.path.join(PACKAGE_DIR, f"{name}.py") + colon + variant


def _resolved(argv: Sequence[str]) -> list[str]:
  """``argv`` with its ``--config`` value as a file path (``config_file``)."""
  argv = list(argv)
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      argv[i] = "--config=" + config_file(arg.removeprefix("--config="))
    elif arg == "--config" and i + 1 < len(argv):
      argv[i + 1] = config_file(argv[i + 1])
  return argv


def define_config_flag(flag_values: flags.FlagValues = flags.FLAGS,
                       argv: Optional[Sequence[str]] = None) -> flags.FlagHolder:
  """The ``--config`` flag (a locked ConfigDict: overrides keep each key's type); config_flags
  defines an override flag for each ``--config.a.b`` in ``argv`` (default ``sys.argv``)."""
  argv = sys.argv if argv is None else argv
  try:
    argv = _resolved(argv)
  except BlockDropError:  # an unknown name: parse_flags says so
    pass
  return config_flags.DEFINE_config_file("config", None, HELP, flag_values=flag_values,
                                         lock_config=True, sys_argv=list(argv))


def parse_flags(flag_values: flags.FlagValues, argv: Sequence[str]) -> list[str]:
  """``flag_values(argv)`` with any flag error (a missing config file, an unknown key, a value of
  the wrong type, a bad variant) as one ``BlockDropError`` line."""
  argv = _resolved(argv)
  path = _config_path(argv)
  if path is not None and not os.path.isfile(path.partition(":")[0]):
    raise BlockDropError(f"config file not found: {path.partition(':')[0]} (--config)")
  try:
    return flag_values(list(argv))
  except (KeyError, AttributeError) as e:  # config_flags: an override of a key it does not have
    raise BlockDropError(_unknown_key(path, argv)) from e
  except flags.Error as e:  # its last line is the cause (a config file's traceback before it)
    cause = str(e).strip().splitlines()[-1]
    raise BlockDropError(re.sub(r"^\w+Error: ", "--config: ", cause)) from e


def finalize(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks ``config``'s keys against the default config and splits comma-separated names."""
  from blockdrop_jax.configs import default  # the schema every experiment extends
  check_keys(config, default.get_config())
  _split_names(config)
  return config


def load(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """The config of ``path[:variant]`` with ``--config.a.b=value`` overrides, parsed as the CLIs
  parse them (for notebooks, tests and benchmarks)."""
  argv = ["load", f"--config={path}", *overrides]
  flag_values = flags.FlagValues()
  holder = define_config_flag(flag_values, argv)
  parse_flags(flag_values, argv)
  return finalize(holder.value)


def from_json(text: str) -> ml_collections.ConfigDict:
  """A config saved by a run (``ConfigDict.to_json``) on top of today's defaults, so that keys
  added since then read as their defaults (the original's behaviour), and keys removed since then
  (switches that could not change anything) are left out."""
  from blockdrop_jax.configs import default
  config = default.get_config()
  config.update(_known(json.loads(text), config))
  return config


def _known(saved: dict, schema: ml_collections.ConfigDict) -> dict:
  return {key: _known(value, schema[key]) if isinstance(value, dict) else value
          for key, value in saved.items() if key in schema}


def check_keys(config, schema, prefix: str = "config") -> None:
  """A key the default config does not have is a typo, not a new setting."""
  for key, value in config.items():
    if key not in schema:
      raise BlockDropError(f"unknown config key {prefix}.{key}; known keys: {', '.join(sorted(schema))}")
    if isinstance(value, ml_collections.ConfigDict):
      check_keys(value, schema[key], f"{prefix}.{key}")


def _split_names(config: ml_collections.ConfigDict) -> None:
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      _split_names(value)
    elif isinstance(value, tuple) and value and all(isinstance(v, str) for v in value):
      config[key] = tuple(name.strip() for v in value for name in v.split(",") if name.strip())


def _config_path(argv: Sequence[str]) -> Optional[str]:
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.removeprefix("--config=")
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _unknown_key(path: str, argv: Sequence[str]) -> str:
  """Which ``--config.a.b`` override names no key, and the keys known where it points."""
  config = load(path)
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    dotted = arg.removeprefix("--config.").partition("=")[0]
    node = config
    for depth, name in enumerate(dotted.split(".")):
      if not isinstance(node, ml_collections.ConfigDict) or name not in node:
        where = ".".join(dotted.split(".")[:depth])
        known = ", ".join(sorted(node)) if isinstance(node, ml_collections.ConfigDict) else "none"
        return (f"unknown config key config.{dotted}; known keys in "
                f"config{'.' + where if where else ''}: {known}")
      node = node[name]
  return f"unknown config key in {' '.join(argv[1:])}"
