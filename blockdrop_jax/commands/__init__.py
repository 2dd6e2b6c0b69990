"""The command-line programs, installed as ``blockdrop-train`` and ``blockdrop-evaluate``
(``train.py`` and ``evaluate.py`` in a checkout run the same)."""
