"""BatchNorm with the variables and results of ``flax.linen.BatchNorm``, and a faster training pass.

In training mode flax's BatchNorm leaves its reductions to autodiff: two sums over (batch, height,
width) forward and four more in the backward pass, which XLA:CPU fuses with their elementwise
inputs into slow tree reductions (a quarter of the policy network's update at batch 128 on a
2-core CPU). Here the backward pass is written out (``custom_vjp``: the textbook
BatchNorm gradient, two sums), and on CPU every sum over rows is a matrix-vector product, 2-4x
faster there; that update runs about 15% faster (docs/results.md). Other backends sum with
``jnp.sum``. Same variables ('scale', 'bias'; batch stats 'mean', 'var'), outputs and gradients
as flax's ``BatchNorm(momentum, epsilon, axis_name, use_fast_variance=False)``
(tests/test_models.py). PyTorch, whose BatchNorm the original networks were trained with, is
followed twice: the batch variance is computed in two passes, and the running variance averages
the unbiased batch variance (n / (n - 1) times the one that normalises), where flax averages the
biased one.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp


def _sum_rows_cpu(rows, lanes: int = 256):
  """Column sums of (n, C) ``rows`` as one matrix-vector product: ``lanes`` rows side by side
  (n/lanes accumulations per sum, then a small sum over the lanes), which keeps XLA's accuracy
  (relative error ~2e-7 at n = 800k, against 3e-5 for a plain product with a column of ones)."""
  n, channels = rows.shape
  lanes = math.gcd(n, lanes)
  across = jnp.dot(jnp.ones((n // lanes,), rows.dtype), rows.reshape(n // lanes, lanes * channels),
                   precision=jax.lax.Precision.HIGHEST)
  return jnp.sum(across.reshape(lanes, channels), axis=0)


def sum_rows(rows, axis_name: Optional[str]):
  """Column sums of (n, C) ``rows``, over all devices of ``axis_name`` when it is set."""
  total = jax.lax.platform_dependent(rows, cpu=_sum_rows_cpu,
                                     default=lambda r: jnp.sum(r, axis=0))
  return total if axis_name is None else jax.lax.psum(total, axis_name)


def _count(rows, axis_name: Optional[str]):
  n = rows.shape[0]
  return n if axis_name is None else n * jax.lax.psum(1, axis_name)


def _statistics(x, eps, axis_name):
  rows = x.reshape(-1, x.shape[-1])
  n = _count(rows, axis_name)
  mean = sum_rows(rows, axis_name) / n
  # Two passes, as PyTorch computes it: E[x^2] - E[x]^2 loses the variance of channels whose mean
  # is large against their spread (ImageNet-size activations after ReLU).
  centred = rows - mean
  var = sum_rows(centred * centred, axis_name) / n
  return mean, var, jax.lax.rsqrt(var + eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm_train(x, scale, bias, eps: float, axis_name: Optional[str] = None):
  """(normalised ``x``, batch mean, batch variance) over every axis but the last."""
  return _forward(x, scale, bias, eps, axis_name)[0]


def _forward(x, scale, bias, eps, axis_name):
  mean, var, inv_std = _statistics(x, eps, axis_name)
  return ((x - mean) * (inv_std * scale) + bias, mean, var), (x, scale, mean, inv_std)


def _backward(eps, axis_name, residuals, cotangents):
  del eps
  x, scale, mean, inv_std = residuals
  d_out, d_mean, d_var = cotangents
  channels = x.shape[-1]
  centred = x - mean
  normalised = centred * inv_std
  # Parameter gradients are this device's own; the input gradient sees the global batch, as
  # autodiff through the psum of the statistics would give.
  d_bias = sum_rows(d_out.reshape(-1, channels), None)
  d_scale = sum_rows((d_out * normalised).reshape(-1, channels), None)
  n = _count(x.reshape(-1, channels), axis_name)
  # d_mean, d_var: cotangents of the returned statistics (zero when only the output is
  # differentiated). One collective for all four sums.
  totals = (d_bias, d_scale, d_mean, d_var)
  total_bias, total_scale, d_mean, d_var = (totals if axis_name is None
                                            else jax.lax.psum(totals, axis_name))
  d_x = (scale * inv_std) * (d_out - total_bias / n - normalised * (total_scale / n))
  d_x = d_x + d_mean / n + centred * (2.0 * d_var / n)
  return d_x, d_scale, d_bias


batch_norm_train.defvjp(_forward, _backward)


def _varying_axes(value) -> frozenset:
  """The shard_map axes ``value`` varies over (jax >= 0.10 names them ``manual_axis_type``)."""
  aval = jax.typeof(value)
  types = getattr(aval, "manual_axis_type", None)
  return frozenset(types.varying if types is not None else getattr(aval, "vma", ()))


def varying_like(param, x):
  """``param`` marked as varying over the shard_map axes that ``x`` varies over, as autodiff
  marks it where the two meet: the gradient of a replicated parameter is then summed over
  devices, and ``batch_norm_train``'s gradient has its inputs' types. No-op elsewhere."""
  axes = tuple(sorted(_varying_axes(x) - _varying_axes(param)))
  return jax.lax.pcast(param, axes, to="varying") if axes else param


def running_statistics(running_mean, running_var, mean, var, n, momentum: float, update=True):
  """The running (mean, variance) after a training batch of ``n`` values per channel with batch
  ``mean`` and (biased) ``var``, as PyTorch: momentum running + (1 - momentum) batch, the
  variance made unbiased; unchanged where ``update`` (possibly traced) is False."""
  unbiased = var * (n / jnp.maximum(n - 1, 1))
  return tuple(jnp.where(update, momentum * old + (1 - momentum) * new, old)
               for old, new in ((running_mean, mean), (running_var, unbiased)))


class BatchNorm(nn.Module):
  """``flax.linen.BatchNorm`` over every axis but the last, with ``batch_norm_train`` in training
  mode. PyTorch's conventions: running = momentum running + (1 - momentum) batch, the variance
  unbiased."""

  momentum: float = 0.9
  epsilon: float = 1e-5
  axis_name: Optional[str] = None  # batch statistics over all devices of this axis (pmap/shard_map)

  @nn.compact
  def __call__(self, x, use_running_average: bool, update_stats=True):
    """``update_stats`` (a bool, possibly traced): whether training mode moves the running
    statistics (the original skips a block, and its BatchNorm updates, that no image keeps)."""
    channels = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (channels,))
    bias = self.param("bias", nn.initializers.zeros, (channels,))
    running_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((channels,), jnp.float32))
    running_var = self.variable("batch_stats", "var", lambda: jnp.ones((channels,), jnp.float32))
    if use_running_average:
      mean, var = running_mean.value, running_var.value
      return (x - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
    y, mean, var = batch_norm_train(x, varying_like(scale, x), varying_like(bias, x),
                                    self.epsilon, self.axis_name)
    if not self.is_initializing():
      mean, var = jax.lax.stop_gradient((mean, var))
      running_mean.value, running_var.value = running_statistics(
          running_mean.value, running_var.value, mean, var,
          _count(x.reshape(-1, channels), self.axis_name), self.momentum, update_stats)
    return y
