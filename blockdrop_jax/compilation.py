"""How this project's functions are compiled: ``jax.jit`` plus XLA options chosen per backend.

On CPU, jaxlib 0.10's XLA may hand convolutions to YNNPACK fusions, which on the 2-core AMD EPYC
first measured ran the ResNets' convolutions and the policy network's first weight gradient slower
than XLA's own kernels. So on CPU every function compiled through ``jit`` here compiles with
YNNPACK fusions off. Where jaxlib makes no such fusion (the CPU of ``docs/results.md``) the
option changes nothing. A jaxlib without that option compiles with its defaults;
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
