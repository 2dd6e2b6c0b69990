"""Training equals the original step by step: the curriculum and finetune steps against a PyTorch
transcription of one step of the original's ``cl_training.py`` and ``finetune.py``, from the same
weights, batch, crops and flips and the same uniform draws for the Bernoulli samples."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blockdrop_jax import convert, data, steps
from configs import default

torch = pytest.importorskip("torch")
import torch_reference as ref  # noqa: E402

BATCH, STEPS = 32, 10
ALPHA, BETA = 0.8, 0.1


def _original_step(agent, rnet, optimizer, x, labels, uniforms, k, penalty, finetune):
  """One update as the original scripts make it (their code written out for PyTorch 2: the policy
  network in training mode; the ResNet frozen in inference mode for the curriculum, in training
  mode for finetuning, its greedy pass first, without gradient). Returns the loss and the
  gradients ({"policy/NAME" or "resnet/NAME": array}) of the update."""
  agent.train()
  rnet.train(finetune)
  probs = torch.sigmoid(agent(x))
  policy_map = (probs.detach() >= 0.5).float()
  probs = probs * ALPHA + (1 - probs) * (1 - ALPHA)
  distr = torch.distributions.Bernoulli(probs)
  policy = (uniforms < probs.detach()).float()  # distr.sample() with the given uniform draws
  num_blocks = policy.shape[1]
  mask = None
  if k < num_blocks:
    policy[:, :-k] = 1
    policy_map[:, :-k] = 1
    mask = torch.ones_like(policy)
    mask[:, :-k] = 0

  def reward(preds, policy):
    sparse = 1.0 - (policy.sum(1) / num_blocks) ** 2
    return torch.where(preds.argmax(1) == labels, sparse, torch.full_like(sparse, penalty))[:, None]

  with torch.no_grad():
    preds_map = rnet(x, policy_map)
  if finetune:
    preds_sample = rnet(x, policy)
    advantage = reward(preds_sample.detach(), policy) - reward(preds_map, policy_map)
    loss = (-distr.log_prob(policy).sum(1, keepdim=True) * advantage).sum()
    loss = loss + torch.nn.functional.cross_entropy(preds_sample, labels)
  else:
    with torch.no_grad():
      preds_sample = rnet(x, policy)
    advantage = reward(preds_sample, policy) - reward(preds_map, policy_map)
    loss = -distr.log_prob(policy) * advantage.expand_as(policy)
    loss = (mask * loss if mask is not None else loss).sum()
    probs = probs.clamp(1e-15, 1 - 1e-15)
    loss = (loss - BETA * (-probs * torch.log(probs)).sum()) / x.shape[0]
  optimizer.zero_grad()
  loss.backward()
  grads = {name: (p.grad.detach().numpy().copy() if p.grad is not None else np.zeros(p.shape,
                                                                                   np.float32))
           for model, prefix in ((agent, "policy"), (rnet, "resnet"))
           for name, p in [(f"{prefix}/{n}", p) for n, p in model.named_parameters()]}
  optimizer.step()
  return loss.item(), grads


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


@pytest.fixture(scope="module")
def batches(train_records):
  images, labels = data.read_cifar_records(train_records)
  return [(images[i * BATCH:(i + 1) * BATCH], labels[i * BATCH:(i + 1) * BATCH])
          for i in range(STEPS)]


@pytest.mark.parametrize("stage", ["curriculum", "finetune"])
def test_ten_steps_equal_the_original_in_pytorch(batches, stage):
  torch.manual_seed(0)
  rnet = ref.randomise_batch_norm(
      ref.FlatResNet(ref.BasicBlock, [3, 3, 3], (16, 32, 64), (1, 2, 2), 10))  # a ResNet-20
  agent = ref.randomise_batch_norm(ref.Policy32(9), seed=1)
  nets, params, stats = _as_ours(rnet, agent)
  K = nets.resnet.num_blocks
  finetune = stage == "finetune"
  cfg = default.get_config()[stage]
  penalty = -5.0 if finetune else -1.0
  trained = list(agent.parameters()) + (list(rnet.parameters()) if finetune else [])
  optimizer = torch.optim.Adam(trained, lr=cfg.lr)
  tx = steps.make_optimizer(stage, cfg, 1)
  loss_fn = steps.PolicyLoss(alpha=ALPHA, beta=BETA, penalty=penalty)
  state = steps.create_state(params, stats, tx)
  nets = steps.Nets(nets.resnet, nets.policy, curriculum_passes="masked")
  step = jax.jit(steps.finetune_step if finetune else steps.curriculum_step,
                 static_argnums=(0, 1, 2))
  loss_of = steps.finetune_loss if finetune else steps.curriculum_loss
  for i, (images, labels) in enumerate(batches):
    key, k = jax.random.key(i), min(i + 1, K) if not finetune else K
    # The step's own crops, flips and uniform draws, given to PyTorch.
    aug_key, sample_key = jax.random.split(key)
    x = steps._inputs(nets, aug_key, images)
    uniforms = np.asarray(jax.random.uniform(sample_key, (BATCH, K)))
    theirs, their_grads = _original_step(
        agent, rnet, optimizer, torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()),
        torch.from_numpy(labels.astype(np.int64)), torch.from_numpy(uniforms.copy()), k, penalty,
        finetune)
    if i == 0:  # the gradients of the first update
      extra = () if finetune else (k,)
      ours = jax.grad(lambda p: loss_of(nets, loss_fn, p, state.batch_stats, x, labels,
                                        sample_key, *extra)[0])(state.params)
      jax.tree.map(lambda a, b: np.testing.assert_allclose(
          a, b, rtol=1e-3, atol=2e-3 * np.abs(b).max() + 1e-9), ours,
          _gradients_as_ours(their_grads, rnet, agent))
    args = (state, jnp.asarray(images), jnp.asarray(labels), key)
    state, metrics = step(nets, loss_fn, tx, *args) if finetune else step(
        nets, loss_fn, tx, *args, jnp.int32(k))
    # The same loss at every step; the weights move apart only by float rounding, which Adam
    # turns into up to a learning-rate step on weights whose gradient is rounding-sized
    # (convolutions before a BatchNorm are scale-invariant).
    np.testing.assert_allclose(metrics["loss"], theirs, rtol=1e-4, atol=1e-5, err_msg=f"step {i}")
    _, params_now, stats_now = _as_ours(rnet, agent)
    drift = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))),
                                             state.params, params_now))) / cfg.lr
    assert drift <= (0.05 if i == 0 else 3.0), f"step {i}: weights {drift:.3f} lr apart"
    if i == 0:
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                   state.batch_stats, stats_now)
