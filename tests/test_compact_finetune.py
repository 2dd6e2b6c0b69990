"""Compact finetuning (each block's branch only on the images that keep it) against masked
execution: the same step where every block is kept, and the same gradients as a masked
computation whose BatchNorm uses the kept rows where a policy drops blocks.

Both are compared in float64. In float32 the two sum in different orders, and where a ReLU's
input lies within rounding of 0 its mask can differ, which moves a gradient by more than any
tolerance that would still catch a wrong one."""

import dataclasses
import functools
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from blockdrop_jax import compact, compact_finetune, steps, trainer
from blockdrop_jax.configs import default
from blockdrop_jax.models import resnet
from blockdrop_jax.models.resnet import ResNetSpec

# A CIFAR ResNet-14 (stride-2 blocks with the parameter-free shortcut A) and a small bottleneck net
# with projection shortcuts (three-layer branches, 1x1 convolutions, BatchNorm on the shortcut).
NETS = {
    "cifar_resnet14": dataclasses.replace(resnet.make_spec("cifar_resnet8"), name="cifar_resnet14",
                                          stages=(2, 2, 2)),
    "bottleneck": ResNetSpec(name="bottleneck", block="bottleneck", stages=(2, 2),
                             widths=(4, 8), strides=(1, 2), stem="cifar", shortcut="projection",
                             num_classes=10),
}


@pytest.fixture(autouse=True)
def float64():
  with jax.enable_x64(True):
    yield


def _float64(tree):
  return jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)


def _variables(spec, seed=0):
  """Random float64 weights, BatchNorm statistics away from their initial 0 and 1."""
  variables = resnet.init(spec, jax.random.key(seed))
  keys = iter(jax.random.split(jax.random.key(seed + 1), 1000))
  stats = jax.tree.map(lambda a: a + 0.1 * jax.random.uniform(next(keys), a.shape),
                       variables["batch_stats"])
  return _float64(variables["params"]), _float64(stats)


def _close(ours, reference):
  """Equal to 1e-9 of each tensor's largest entry: float64 rounding, far below
  ``GRADIENT_ATOL`` (tests/test_step_parity.py), the tolerance against the original."""
  chex.assert_trees_all_equal_structs(ours, reference)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-7, atol=1e-9 * np.abs(b).max() + 1e-12), ours, reference)


def test_every_block_kept_gives_the_masked_finetune_step():
  """A policy that keeps every block (alpha 1 and a large bias: p' = 1): the compact step's loss,
  metrics, parameters after an SGD update (so, its gradients) and batch statistics are the
  masked step's."""
  spec = resnet.make_spec("cifar_resnet8")
  nets = steps.Nets(spec, resnet.policy_spec(spec))
  policy = _float64(resnet.with_policy_bias(resnet.init(nets.policy, jax.random.key(3)), 30.0))
  params, stats = _variables(spec)
  state = steps.create_state({"resnet": params, "policy": policy["params"]},
                             {"resnet": stats, "policy": policy["batch_stats"]}, optax.sgd(0.1))
  images = jax.random.randint(jax.random.key(4), (19, 32, 32, 3), 0, 256).astype(jnp.uint8)
  labels = jnp.arange(19) % 10
  results = {}
  for passes in steps.FINETUNE_PASSES:
    step = jax.jit(functools.partial(
        steps.finetune_step, nets, steps.PolicyLoss(alpha=1.0, penalty=-5.0), optax.sgd(0.1),
        options=steps.StepOptions(finetune_passes=passes)))
    results[passes] = step(state, images, labels, jax.random.key(5))
  (masked, masked_metrics), (ours, our_metrics) = results["masked"], results["compact"]
  assert masked_metrics["blocks_sampled"] == masked_metrics["blocks_greedy"] == spec.num_blocks
  _close(our_metrics, masked_metrics)
  _close(ours.params, masked.params)
  _close(ours.batch_stats, masked.batch_stats)


def _masked_rows_forward(spec, params, stats, images, policy):
  """The reference: masked execution (every block for every image, ``jnp.where``), its branch
  BatchNorms normalising with the statistics of the images that keep the block, by autodiff."""
  variables = {"params": params, "batch_stats": stats}
  model = resnet.ResNet(spec)
  x, updates = model.apply(variables, images, True, method=lambda m, x, tr: m.stem(x, tr),
                           mutable=["batch_stats"])
  new_stats = {**stats, **updates["batch_stats"]}
  for t in range(spec.num_blocks):
    name, keep = f"block{t}", policy[:, t] > 0.5
    shortcut, updates = model.apply(variables, x, method=lambda m, x: m.blocks[t](x, True, True),
                                    mutable=["batch_stats"])
    block_stats = {**stats[name], **updates["batch_stats"].get(name, {})}
    weights = keep.astype(jnp.float32)[:, None, None, None]
    h = x
    strides = compact_finetune.branch_strides(spec, t)
    for i, stride in enumerate(strides, start=1):
      kernel = params[name][f"conv{i}"]["kernel"]
      pad = kernel.shape[0] // 2
      h = jax.lax.conv_general_dilated(h, kernel, (stride,) * 2, ((pad, pad),) * 2,
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
      n = jnp.maximum(jnp.sum(keep) * h.shape[1] * h.shape[2], 1)
      mean = jnp.sum(h * weights, axis=(0, 1, 2)) / n
      var = jnp.sum((h - mean) ** 2 * weights, axis=(0, 1, 2)) / n
      bn = params[name][f"bn{i}"]
      h = (h - mean) * jax.lax.rsqrt(var + 1e-5) * bn["scale"] + bn["bias"]
      if i < len(strides):
        h = jax.nn.relu(h)
      old = block_stats[f"bn{i}"]
      runs = jnp.any(keep)
      block_stats[f"bn{i}"] = jax.lax.stop_gradient({
          "mean": jnp.where(runs, 0.9 * old["mean"] + 0.1 * mean, old["mean"]),
          "var": jnp.where(runs, 0.9 * old["var"] + 0.1 * var * n / jnp.maximum(n - 1, 1),
                           old["var"])})
    x = jnp.where(keep[:, None, None, None], jax.nn.relu(shortcut + h), shortcut)
    new_stats[name] = block_stats
  return model.apply(variables, x, method=lambda m, x: m.head(x)), new_stats


@pytest.mark.parametrize("name, batch", [("cifar_resnet14", 37), ("bottleneck", 83)])
def test_sparse_policy_gradients_equal_masked_with_batch_norm_over_kept_rows(name, batch):
  """A random policy keeping about a third of the blocks per image, one block kept by no image,
  one by a single image and one by all (83 images: forward chunks of 64, then 16 and a partly
  kept 16; 37: chunks of 16): logits, every parameter's gradient and the new batch statistics
  equal the reference's."""
  spec = NETS[name]
  params, stats = _variables(spec)
  images = jax.random.uniform(jax.random.key(2), (batch, 32, 32, 3), jnp.float64)
  labels = jnp.arange(batch) % 10
  policy = (jax.random.uniform(jax.random.key(6), (batch, spec.num_blocks)) < 0.35)
  policy = policy.at[:, 1].set(False).at[:, 2].set(jnp.arange(batch) == 5).at[:, 3].set(True)
  policy = policy.astype(jnp.float32)

  def loss_of(forward):
    def loss(p):
      logits, new_stats = forward(spec, p, stats, images, policy)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), (logits,
                                                                                        new_stats)
    return jax.jit(jax.value_and_grad(loss, has_aux=True))

  (loss, (logits, new_stats)), grads = loss_of(compact_finetune.train_forward)(params)
  (ref_loss, (ref_logits, ref_stats)), ref_grads = loss_of(_masked_rows_forward)(params)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-9)
  _close(logits, ref_logits)
  _close(grads, ref_grads)
  _close(new_stats, ref_stats)
  # The reference really differs from masked execution, whose BatchNorm counts every image.
  masked_logits = steps._forward(spec, params, stats, images, policy, train=True)[0]
  assert np.abs(np.asarray(masked_logits) - np.asarray(logits)).max() > 1e-2


def test_auto_finetune_passes_follow_backend_and_the_last_epochs_sparsity():
  """The trainer's choice for the next epoch, from the last epoch's record: compact on CPU after
  sampled policies that kept at most COMPACT_FINETUNE_BELOW of the blocks; masked before any
  finetuning epoch, on other backends, or denser; none outside BlockDrop's finetuning."""
  config = default.get_config()
  config.finetune.passes = "auto"
  run = types.SimpleNamespace(config=config, static_keep=None,
                              nets=steps.Nets(resnet.make_spec("cifar_resnet20")))
  sparse = "compact" if jax.default_backend() == "cpu" else "masked"
  edge = compact.COMPACT_FINETUNE_BELOW * 9
  assert trainer.epoch_finetune_passes(run, "finetune", {"train_blocks_sampled": edge}) == sparse
  assert trainer.epoch_finetune_passes(run, "finetune", {"train_blocks_sampled": edge + 0.1}) == (
      "masked")
  assert trainer.epoch_finetune_passes(run, "finetune", {}) == "masked"
  assert trainer.epoch_finetune_passes(run, "curriculum", {"train_blocks_sampled": 1.0}) is None
  config.finetune.passes = "compact"
  assert trainer.epoch_finetune_passes(run, "finetune", {}) == "compact"
  run.static_keep = np.ones(9)  # the static reference finetunes the ResNet alone
  assert trainer.epoch_finetune_passes(run, "finetune", {}) is None
