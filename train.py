"""Train BlockDrop: ``blockdrop_jax/commands/train.py`` (installed as ``blockdrop-train``); ``--help``
lists its flags."""

from blockdrop_jax.commands import train

if __name__ == "__main__":
  train.run()
