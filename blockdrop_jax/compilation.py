"""How this project's functions are compiled: ``jax.jit`` plus XLA options chosen per backend.

On CPU, jaxlib 0.10's XLA hands convolutions to YNNPACK fusions by default. On a 2-core AMD EPYC
those run the ResNets' forward convolutions up to about 2x slower, and the weight gradient of a
3x3 convolution at 32x32 pixels (the policy network's first block) about 10x slower, than XLA's
own kernels. So on CPU every function compiled through ``jit``
here compiles with YNNPACK fusions off. A jaxlib without that option compiles with its defaults;
``BLOCKDROP_XLA_DEFAULTS=1`` keeps XLA's defaults everywhere (to compare, or if they are faster on
another CPU).
"""

from __future__ import annotations

import functools
import os
from typing import Callable

import jax

DEFAULTS_ENV = "BLOCKDROP_XLA_DEFAULTS"
CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}  # the empty list: no YNNPACK fusion


@functools.cache
def compiler_options() -> dict:
  """The XLA options for the default backend: ``CPU_OPTIONS`` on a CPU whose XLA knows them."""
  if os.environ.get(DEFAULTS_ENV, "") not in ("", "0") or jax.default_backend() != "cpu":
    return {}
  try:
    jax.jit(lambda x: x + 1, compiler_options=CPU_OPTIONS).lower(1.0).compile()
  except Exception:  # noqa: BLE001 - an XLA that lacks or renamed the option rejects it here
    return {}
  return dict(CPU_OPTIONS)


def jit(fun: Callable, **jit_kwargs) -> Callable:
  """``jax.jit(fun, **jit_kwargs)`` compiled with ``compiler_options()``; ``.lower`` as jax.jit's.

  The options are looked up at the first call, so defining a jitted function (say at import) does
  not start a JAX backend."""

  @functools.cache
  def jitted():
    return jax.jit(fun, compiler_options=compiler_options() or None, **jit_kwargs)

  @functools.wraps(fun)
  def call(*args, **kwargs):
    return jitted()(*args, **kwargs)

  call.lower = lambda *args, **kwargs: jitted().lower(*args, **kwargs)
  return call
