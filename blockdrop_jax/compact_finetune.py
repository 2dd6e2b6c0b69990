"""Compact joint finetuning: each block's residual branch runs, forward and backward, only on the
rows (images) whose policy keeps the block.

The original finetunes with masked passes: every block runs for every image in training mode and
the dropped outputs are thrown away. Here block t gathers its kept rows a chunk at a time, in
loops whose trip count follows the number of kept rows (a batch-level number), so a dropped row
costs no convolution forward or backward. Loops with such trip counts have no reverse-mode derivative,
so the block's backward pass is written out (``custom_vjp``): it walks the same chunks back.

BatchNorm in training mode then normalises each block's branch with the statistics of the images
that run it; the original's masked pass also counts the images whose output it discards
(docs/method.md, section 6, "Compact finetuning"). With every block kept the two are the same
(tests/test_compact_finetune.py). Under ``shard_map`` each device runs its own rows and the
statistics are summed over devices, outside the loops.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from blockdrop_jax.models import resnet
from blockdrop_jax.models.batch_norm import running_statistics, sum_rows, varying_like
from blockdrop_jax.models.resnet import BATCH_NORM_EPSILON, BATCH_NORM_MOMENTUM, ResNetSpec

# Rows per chunk of a block's branch. On the 2-core CPU, in a loop, a forward convolution of 64
# rows costs about what one of 32 does and twice one of 16, while the backward pass (both
# gradients) is fastest at 16: the forward pass runs whole chunks of FORWARD_CHUNK rows and the
# rest, like the backward pass, in chunks of CHUNK.
CHUNK, FORWARD_CHUNK = 16, 64


def branch_strides(spec: ResNetSpec, t: int) -> tuple[int, ...]:
  """The strides of block t's branch convolutions, in order (its layers' kernels set the rest)."""
  stride = spec.block_layout()[t][4]
  return (stride, 1) if spec.block == "basic" else (1, stride, 1)


def _conv(x, kernel, stride: int):
  """``resnet._conv``: symmetric padding of kernel // 2, as PyTorch."""
  pad = kernel.shape[0] // 2
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), ((pad, pad), (pad, pad)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _conv_backward(inputs, kernel, stride: int, d_out):
  """(input gradient, kernel gradient) of ``_conv``, each written as a forward convolution or a
  matrix product. Inside a loop XLA:CPU runs the backward convolutions that autodiff emits 10-70
  times slower than these (docs/method.md, section 6); the values are the same."""
  size, pad = kernel.shape[0], kernel.shape[0] // 2
  extra = (inputs.shape[1] + 2 * pad - size) % stride
  edges = ((size - 1 - pad, size - 1 - pad + extra),) * 2
  d_inputs = jax.lax.conv_general_dilated(
      d_out, jnp.flip(kernel, (0, 1)).swapaxes(2, 3), (1, 1), edges, lhs_dilation=(stride, stride),
      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  height, width = d_out.shape[1:3]
  padded = jnp.pad(inputs, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  patches = jnp.concatenate(
      [padded[:, h:h + stride * (height - 1) + 1:stride, w:w + stride * (width - 1) + 1:stride]
       for h in range(size) for w in range(size)], axis=-1)
  d_kernel = jnp.dot(patches.reshape(-1, patches.shape[-1]).T, d_out.reshape(-1, d_out.shape[-1]),
                     precision=jax.lax.Precision.HIGHEST)
  return d_inputs, d_kernel.reshape(kernel.shape)


def _masked_sum(values, valid):
  """Per-channel sum over the valid rows (and every position) of a chunk."""
  rows = jnp.where(valid[:, None, None, None], values, 0.0).reshape(-1, values.shape[-1])
  return sum_rows(rows, None)


class _Rows:
  """A block's rows in kept-first order, and how many keep it (here and over all devices)."""

  def __init__(self, keep, axis_name: Optional[str]):
    self.rows = keep.shape[0]
    self.padded = -(-self.rows // CHUNK) * CHUNK  # every loop stops within this many positions
    self.kept = jnp.sum(keep, dtype=jnp.int32)
    self.total = self.kept if axis_name is None else jax.lax.psum(self.kept, axis_name)
    self.order = jnp.pad(jnp.argsort(~keep, stable=True), (0, self.padded - self.rows))


class _Chunk:
  """``size`` positions of ``_Rows`` from ``start``: the rows to read, the rows to write (out of
  range where not kept, so that writes drop them) and which positions are kept."""

  def __init__(self, rows: _Rows, start, size: int):
    self.start, self.size = start, size
    self.valid = start + jnp.arange(size) < rows.kept
    self.read = jax.lax.dynamic_slice_in_dim(rows.order, start, size)
    self.write = jnp.where(self.valid, self.read, rows.rows)

  def slice(self, buffer):
    """This chunk's positions of a buffer in kept-first order."""
    return jax.lax.dynamic_slice_in_dim(buffer, self.start, self.size)

  def put(self, buffer, values):
    return jax.lax.dynamic_update_slice_in_dim(buffer, values, self.start, 0)


def _over_chunks(rows: _Rows, sizes: tuple[int, ...], body, carry):
  """``body(chunk, carry)`` over the kept positions: as many whole chunks of ``sizes[0]`` rows as
  the kept rows fill, then (with ``(big, CHUNK)``) the rest in chunks of ``CHUNK``. Loops whose
  trip counts are batch-level numbers, so dropped rows cost nothing."""
  first = sizes[0]
  whole = rows.kept // first if len(sizes) > 1 else (rows.kept + first - 1) // first
  carry = jax.lax.fori_loop(0, whole, lambda i, c: body(_Chunk(rows, i * first, first), c), carry)
  if len(sizes) == 1:
    return carry
  start = whole * first
  rest = (rows.kept - start + CHUNK - 1) // CHUNK
  return jax.lax.fori_loop(0, rest, lambda i, c: body(_Chunk(rows, start + i * CHUNK, CHUNK), c),
                           carry)


def _zeros(shape, dtype, like):
  """A loop's initial zeros, varying over the ``shard_map`` axes that ``like`` varies over (the
  values the loop adds to them do)."""
  return varying_like(jnp.zeros(shape, dtype), like)


def _normalise(h, mean, inv_std, scale, bias):
  return (h - mean) * (inv_std * scale) + bias


def _layer_input(chunk: _Chunk, x, hidden, stats, scales, biases, j: int):
  """The input of layer j of the branch for a chunk: the gathered block input, or the previous
  layer's convolution output after its BatchNorm and ReLU."""
  if j == 0:
    return x[chunk.read]
  mean, inv_std = stats[j - 1]
  return jax.nn.relu(_normalise(chunk.slice(hidden[j - 1]), mean, inv_std, scales[j - 1],
                                biases[j - 1]))


def _forward(strides, axis_name, x, shortcut, keep, kernels, scales, biases):
  rows = _Rows(keep, axis_name)
  sizes = (FORWARD_CHUNK, CHUNK) if rows.rows >= FORWARD_CHUNK else (CHUNK,)
  over_chunks = functools.partial(_over_chunks, rows, sizes)
  hidden, stats, moments = [], [], []
  for j, (kernel, stride) in enumerate(zip(kernels, strides)):
    shape = jax.eval_shape(functools.partial(_conv, stride=stride),
                           jax.ShapeDtypeStruct((rows.padded,) + (hidden[-1] if j else x).shape[1:],
                                                x.dtype), kernel).shape

    def convolve(chunk, carry, j=j, kernel=kernel, stride=stride):
      buffer, total = carry
      h = _conv(_layer_input(chunk, x, hidden, stats, scales, biases, j), kernel, stride)
      return chunk.put(buffer, h), total + _masked_sum(h, chunk.valid)

    buffer, total = over_chunks(convolve, (_zeros(shape, x.dtype, x),
                                           _zeros(shape[-1:], x.dtype, x)))
    n = rows.total * shape[1] * shape[2]
    mean = _psum(total, axis_name) / jnp.maximum(n, 1)

    def squares(chunk, total, buffer=buffer, mean=mean):
      centred = chunk.slice(buffer) - mean
      return total + _masked_sum(centred * centred, chunk.valid)

    squared = over_chunks(squares, _zeros(mean.shape, mean.dtype, x))
    var = _psum(squared, axis_name) / jnp.maximum(n, 1)
    hidden.append(buffer)
    stats.append((mean, jax.lax.rsqrt(var + BATCH_NORM_EPSILON)))
    moments.append((mean, var, n.astype(mean.dtype)))

  def finish(chunk, out):
    mean, inv_std = stats[-1]
    branch = _normalise(chunk.slice(hidden[-1]), mean, inv_std, scales[-1], biases[-1])
    return out.at[chunk.write].set(jax.nn.relu(shortcut[chunk.read] + branch), mode="drop")

  out = over_chunks(finish, shortcut)
  residuals = (x, keep, kernels, scales, biases, out, hidden, stats)
  return (out, tuple(moments)), residuals


def _psum(value, axis_name):
  return value if axis_name is None else jax.lax.psum(value, axis_name)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def kept_rows_block(strides, axis_name, x, shortcut, keep, kernels, scales, biases):
  """A residual block in training mode on the rows that ``keep`` it: ``relu(shortcut + F(x))``
  there and ``shortcut`` elsewhere, F the branch of convolutions (``kernels``, ``strides``) with
  BatchNorm (``scales``, ``biases``) over the kept rows of every device of ``axis_name``. Also
  returns each BatchNorm's (batch mean, batch variance, values per channel) for the running
  statistics."""
  return _forward(strides, axis_name, x, shortcut, keep, kernels, scales, biases)[0]


def _backward(strides, axis_name, residuals, cotangents):
  x, keep, kernels, scales, biases, out, hidden, stats = residuals
  d_out = cotangents[0]  # the batch statistics only feed the running averages: no gradient
  rows = _Rows(keep, axis_name)
  over_chunks = functools.partial(_over_chunks, rows, (CHUNK,))
  layers = len(kernels)

  def sums(g, chunk, j):
    """(sum of g, sum of g x normalised) over the chunk's kept rows: BatchNorm j's bias and scale
    gradients, and what its input gradient needs."""
    mean, inv_std = stats[j]
    normalised = (chunk.slice(hidden[j]) - mean) * inv_std
    return _masked_sum(g, chunk.valid), _masked_sum(g * normalised, chunk.valid)

  def into_branch(chunk, carry):
    """The output's gradient where the block ran: through the final ReLU into the branch (and,
    equally, the shortcut)."""
    grads, d_shortcut, d_bias, d_scale = carry
    g = jnp.where(chunk.valid[:, None, None, None] & (out[chunk.read] > 0), d_out[chunk.read], 0.0)
    g_bias, g_scale = sums(g, chunk, layers - 1)
    return (chunk.put(grads, g), d_shortcut.at[chunk.write].set(g, mode="drop"),
            d_bias + g_bias, d_scale + g_scale)

  def zeros_like(a):
    return _zeros(a.shape, a.dtype, x)

  grads, d_shortcut, d_bias, d_scale = over_chunks(
      into_branch, (zeros_like(hidden[-1]), d_out, zeros_like(scales[-1]), zeros_like(scales[-1])))
  d_kernels, d_scales, d_biases = [None] * layers, [None] * layers, [None] * layers
  d_x = zeros_like(x)
  for j in reversed(range(layers)):
    d_biases[j], d_scales[j] = d_bias, d_scale
    total_bias, total_scale = _psum((d_bias, d_scale), axis_name)
    mean, inv_std = stats[j]
    shape = hidden[j].shape
    n = jnp.maximum(rows.total * shape[1] * shape[2], 1)

    def layer_back(chunk, carry, j=j, total_bias=total_bias, total_scale=total_scale, mean=mean,
                   inv_std=inv_std, n=n, grads=grads):
      d_kernel, previous, d_x, d_bias, d_scale = carry
      valid = chunk.valid[:, None, None, None]
      normalised = (chunk.slice(hidden[j]) - mean) * inv_std
      d_h = (scales[j] * inv_std) * (chunk.slice(grads) - total_bias / n
                                     - normalised * (total_scale / n))
      d_h = jnp.where(valid, d_h, 0.0)
      inputs = _layer_input(chunk, x, hidden, stats, scales, biases, j)
      d_inputs, d_kernel_chunk = _conv_backward(inputs, kernels[j], strides[j], d_h)
      d_kernel = d_kernel + d_kernel_chunk
      if j == 0:
        return d_kernel, previous, d_x.at[chunk.write].add(d_inputs, mode="drop"), d_bias, d_scale
      g = jnp.where(valid & (inputs > 0), d_inputs, 0.0)
      g_bias, g_scale = sums(g, chunk, j - 1)
      return d_kernel, chunk.put(previous, g), d_x, d_bias + g_bias, d_scale + g_scale

    empty = zeros_like(x[:0, 0, 0, 0])
    previous = zeros_like(hidden[j - 1]) if j else empty
    below = zeros_like(scales[j - 1]) if j else empty
    d_kernels[j], grads, d_x, d_bias, d_scale = over_chunks(
        layer_back, (zeros_like(kernels[j]), previous, d_x, below, below))
  return d_x, d_shortcut, None, tuple(d_kernels), tuple(d_scales), tuple(d_biases)


kept_rows_block.defvjp(_forward, _backward)


def _stage_apply(spec, axis_name, variables, x, method):
  """A part of the network in training mode: (output, its updated batch statistics)."""
  return resnet.ResNet(spec, axis_name=axis_name).apply(variables, x, method=method,
                                                        mutable=["batch_stats"])


def train_forward(spec: ResNetSpec, params, batch_stats, images, policy,
                  axis_name: Optional[str] = None):
  """(logits, new batch statistics) of the ResNet in training mode under a per-example
  ``policy``, each block's branch computed on only the images that keep it (``kept_rows_block``).
  The stem, the shortcuts and the head run on every image as in masked execution; a block no
  image keeps leaves its running statistics as they were, as the original."""
  resnet.check_policy(policy, images.shape[0], spec.num_blocks)
  variables = {"params": params, "batch_stats": batch_stats}
  stats = dict(batch_stats)
  x, updates = _stage_apply(spec, axis_name, variables, images, lambda m, x: m.stem(x, True))
  stats.update(updates["batch_stats"])
  keep = policy > 0.5
  for t in range(spec.num_blocks):
    name = f"block{t}"
    shortcut, updates = _stage_apply(spec, axis_name, variables, x,
                                     lambda m, x, t=t: m.blocks[t](x, True, True))
    block_stats = {**stats[name], **updates["batch_stats"].get(name, {})}
    block = params[name]
    strides = branch_strides(spec, t)
    layers = [str(i + 1) for i in range(len(strides))]
    x, moments = kept_rows_block(
        strides, axis_name, x, shortcut, keep[:, t],
        *[tuple(varying_like(block[f"{kind}{i}"][leaf], x) for i in layers)
          for kind, leaf in (("conv", "kernel"), ("bn", "scale"), ("bn", "bias"))])
    runs = _psum(jnp.sum(keep[:, t], dtype=jnp.int32), axis_name) > 0
    for i, (mean, var, n) in zip(layers, moments):
      old = block_stats[f"bn{i}"]
      new_mean, new_var = running_statistics(old["mean"], old["var"], mean, var, n,
                                             BATCH_NORM_MOMENTUM, runs)
      block_stats[f"bn{i}"] = {"mean": new_mean, "var": new_var}
    stats[name] = jax.lax.stop_gradient(block_stats)
  logits = resnet.ResNet(spec).apply(variables, x, method=lambda m, x: m.head(x))
  return logits, stats
