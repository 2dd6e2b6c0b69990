"""Evaluate a ResNet or a BlockDrop run: ``blockdrop_jax/commands/evaluate.py`` (installed as ``blockdrop-evaluate``); ``--help``
lists its flags."""

from blockdrop_jax.commands import evaluate

if __name__ == "__main__":
  evaluate.run()
