"""Training equals the original step by step: the curriculum and finetune steps against a PyTorch
transcription of one step of the original's ``cl_training.py`` and ``finetune.py``, from the same
weights, batch, crops and flips and the same uniform draws for the Bernoulli samples, on a CIFAR
ResNet-20 with the original's CIFAR policy and on an ImageNet-layout ResNet-10 (7x7 stem, max
pool, projection shortcuts, 224-pixel crops) with its ImageNet policy."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blockdrop_jax import convert, data, steps
from blockdrop_jax.configs import default

torch = pytest.importorskip("torch")
import torch_reference as ref  # noqa: E402

from blockdrop_jax import torch_nets  # noqa: E402

ALPHA, BETA = 0.8, 0.1
GRADIENT_ATOL = 2e-3  # of the largest gradient in the tensor


def _networks(layout):
  """(base, policy, batch size, number of steps): random PyTorch nets, BatchNorm calibrated."""
  torch.manual_seed(0)
  if layout == "cifar":  # a ResNet-20
    base = ref.FlatResNet(ref.BasicBlock, [3, 3, 3], (16, 32, 64), (1, 2, 2), 10)
    policy, batch, num_steps = ref.Policy32(9), 32, 10
  else:  # a ResNet-10 with the ImageNet stem
    base = ref.FlatResNet(ref.BasicBlock, [1, 1, 1, 1], (64, 128, 256, 512), (1, 2, 2, 2), 10,
                          imagenet=True)
    policy, batch, num_steps = ref.Policy224(4), 4, 2
  return ref.randomise_batch_norm(base), ref.randomise_batch_norm(policy, seed=1), batch, num_steps


def _original_step(agent, rnet, optimizer, x, labels, uniforms, k, penalty, finetune):
  """``torch_nets.original_update``; returns the loss and the gradients of the update
  ({"policy/NAME" or "resnet/NAME": array})."""
  loss = torch_nets.original_update(agent, rnet, optimizer, x, labels, uniforms, k, finetune,
                                    ALPHA, BETA, penalty)
  grads = {name: (p.grad.detach().numpy().copy() if p.grad is not None else np.zeros(p.shape,
                                                                                   np.float32))
           for model, prefix in ((agent, "policy"), (rnet, "resnet"))
           for name, p in [(f"{prefix}/{n}", p) for n, p in model.named_parameters()]}
  return loss, grads


def _as_ours(rnet, agent):
  spec, base = convert.load_pretrained_state(_state(rnet))
  policy, policy_vars = convert.load_pretrained_state(_state(agent))
  return (steps.Nets(spec, policy),
          {"resnet": base["params"], "policy": policy_vars["params"]},
          {"resnet": base["batch_stats"], "policy": policy_vars["batch_stats"]})


def _gradients_as_ours(grads, rnet, agent):
  """Torch gradients in our parameter layout (the state dicts with gradients for parameters)."""
  def state(model, prefix):
    return {**_state(model), **{k.removeprefix(f"{prefix}/"): v for k, v in grads.items()
                                if k.startswith(f"{prefix}/")}}
  _, base = convert.load_pretrained_state(state(rnet, "resnet"))
  _, policy = convert.load_pretrained_state(state(agent, "policy"))
  return {"resnet": base["params"], "policy": policy["params"]}


def _state(model):
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _batches(train_records, layout, batch, num_steps):
  """Subset images; for the ImageNet layout resized to 256 pixels (the size stored for ImageNet
  training, cropped to 224) with pixel noise, so that no 3x3 max-pool window holds a tie, which
  PyTorch and XLA would break differently in the stem's gradient."""
  images, labels = data.read_cifar_records(train_records)
  images, labels = images[:batch * num_steps], labels[:batch * num_steps]
  if layout == "imagenet":
    resized = jax.image.resize(images.astype(np.float32), (len(images), 256, 256, 3), "bilinear")
    noise = np.random.default_rng(0).uniform(-4, 4, resized.shape)
    images = np.clip(np.asarray(resized) + noise, 0, 255).astype(np.uint8)
  return [(images[i * batch:(i + 1) * batch], labels[i * batch:(i + 1) * batch])
          for i in range(num_steps)]


@pytest.mark.parametrize("stage", ["curriculum", "finetune"])
@pytest.mark.parametrize("layout", ["cifar", "imagenet"])
def test_steps_equal_the_original_in_pytorch(train_records, layout, stage):
  rnet, agent, batch, num_steps = _networks(layout)
  batches = _batches(train_records, layout, batch, num_steps)
  nets, params, stats = _as_ours(rnet, agent)
  K, spec = nets.resnet.num_blocks, nets.resnet
  assert (spec.input_mean, spec.input_std) == (nets.policy.input_mean, nets.policy.input_std)
  finetune = stage == "finetune"
  cfg = default.get_config()[stage]
  penalty = -5.0 if finetune else -1.0
  trained = list(agent.parameters()) + (list(rnet.parameters()) if finetune else [])
  optimizer = torch.optim.Adam(trained, lr=cfg.lr)
  tx = steps.make_optimizer(stage, cfg, 1)
  loss_fn = steps.PolicyLoss(alpha=ALPHA, beta=BETA, penalty=penalty)
  state = steps.create_state(params, stats, tx)
  step = jax.jit(functools.partial(steps.finetune_step if finetune else steps.curriculum_step,
                                   options=steps.StepOptions(curriculum_passes="masked")),
                 static_argnums=(0, 1, 2))
  loss_of = steps.finetune_loss if finetune else steps.curriculum_loss
  for i, (images, labels) in enumerate(batches):
    key, k = jax.random.key(i), min(i + 1, K) if not finetune else K
    # The step's own crops, flips and uniform draws, given to PyTorch.
    aug_key, sample_key = jax.random.split(key)
    x = steps.training_inputs(nets, aug_key, images)
    uniforms = np.asarray(jax.random.uniform(sample_key, (batch, K)))
    # The original normalises in its data pipeline, our networks in their stem.
    normalised = ((np.asarray(x) - np.asarray(spec.input_mean, np.float32))
                  / np.asarray(spec.input_std, np.float32))
    theirs, their_grads = _original_step(
        agent, rnet, optimizer, torch.from_numpy(normalised.transpose(0, 3, 1, 2).copy()),
        torch.from_numpy(labels.astype(np.int64)), torch.from_numpy(uniforms.copy()), k, penalty,
        finetune)
    if i == 0:  # the gradients of the first update
      extra = () if finetune else (k,)
      ours = jax.jit(jax.grad(lambda p: loss_of(nets, loss_fn, p, state.batch_stats, x, labels,
                                                sample_key, *extra)[0]))(state.params)
      their_first = _gradients_as_ours(their_grads, rnet, agent)
      jax.tree.map(lambda a, b: np.testing.assert_allclose(
          a, b, rtol=1e-3, atol=GRADIENT_ATOL * np.abs(b).max() + 1e-9), ours, their_first)
    args = (state, jnp.asarray(images), jnp.asarray(labels), key)
    state, metrics = step(nets, loss_fn, tx, *args) if finetune else step(
        nets, loss_fn, tx, *args, jnp.int32(k))
    # The same loss at every step. Adam's first step moves every weight by about one learning
    # rate in the direction of its gradient's sign, so the weights agree to 5% of it wherever the
    # gradients agree in sign; where a gradient is within the gradient tolerance of zero
    # (rounding-sized: convolutions before a BatchNorm are scale-invariant) the sign may differ
    # and the weights by up to two steps. Later losses agree to 1e-3.
    np.testing.assert_allclose(metrics["loss"], theirs, rtol=1e-4 if i == 0 else 1e-3, atol=1e-5,
                               err_msg=f"step {i}")
    _, params_now, stats_now = _as_ours(rnet, agent)
    drift = jax.tree.map(lambda a, b: np.abs(a - b) / cfg.lr, state.params, params_now)
    if i == 0:
      rounding_sized = jax.tree.map(lambda g: np.abs(g) <= GRADIENT_ATOL * np.abs(g).max(),
                                    their_first)
      worst = max(float(np.max(np.where(r, 0.0, d), initial=0.0))
                  for d, r in zip(jax.tree.leaves(drift), jax.tree.leaves(rounding_sized)))
      assert worst <= 0.05, f"step 0: weights {worst:.3f} lr apart"
    worst = max(float(np.max(d)) for d in jax.tree.leaves(drift))
    assert worst <= (2.05 if i == 0 else 3.0), f"step {i}: weights {worst:.3f} lr apart"
    if i == 0:
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                   state.batch_stats, stats_now)
