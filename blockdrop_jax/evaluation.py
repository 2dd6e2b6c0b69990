"""Batched inference over a dataset and the original ``test.py`` report."""

from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from blockdrop_jax.data import Dataset, to_unit_float
from blockdrop_jax.models import resnet


def batched(fn: Callable, arrays: tuple, batch_size: int, desc: str = "evaluating",
            progress: bool = True) -> list[np.ndarray]:
  """Runs ``fn(*batch)`` over fixed-size batches (the last one padded, so it compiles once)."""
  n = len(arrays[0])
  outputs = []
  for start in tqdm(range(0, n, batch_size), desc=desc, unit="batch", disable=not progress,
                    leave=False):
    chunk = [a[start:start + batch_size] for a in arrays]
    valid = len(chunk[0])
    if valid < batch_size:
      chunk = [np.concatenate([c, np.repeat(c[-1:], batch_size - valid, axis=0)]) for c in chunk]
    result = fn(*chunk)
    outputs.append(jax.tree.map(lambda r: np.asarray(r)[:valid], result))
  return jax.tree.map(lambda *rs: np.concatenate(rs), *outputs)


@functools.partial(jax.jit, static_argnums=0)
def _logits(spec, variables, images):
  return resnet.apply(spec, variables, to_unit_float(images))


def evaluate_resnet(spec: resnet.ResNetSpec, variables, dataset: Dataset, batch_size: int = 250,
                    progress: bool = True) -> dict:
  """Accuracy and per-image predictions of the full (ungated) ResNet."""
  logits = batched(lambda x: _logits(spec, variables, x), (dataset.images,),
                   min(batch_size, len(dataset)), progress=progress)
  predictions = logits.argmax(-1)
  return {
      "accuracy": float(np.mean(predictions == dataset.labels)),
      "correct": int(np.sum(predictions == dataset.labels)),
      "n": len(dataset),
      "predictions": predictions.tolist(),
  }
