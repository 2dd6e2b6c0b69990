"""Train steps: gradients go where docs/method.md says, and nowhere else."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from blockdrop_jax import data, steps
from blockdrop_jax.models import resnet


@pytest.fixture(scope="module")
def setup():
  base = resnet.make_spec("cifar_resnet8", shortcut="avgpool")
  nets = steps.Nets(base, resnet.policy_spec(base))
  b, p = resnet.init(base, jax.random.key(0)), resnet.init(nets.policy, jax.random.key(1))
  params = {"resnet": b["params"], "policy": p["params"]}
  stats = {"resnet": b["batch_stats"], "policy": p["batch_stats"]}
  images = jax.random.randint(jax.random.key(2), (8, 32, 32, 3), 0, 256).astype(jnp.uint8)
  labels = jnp.arange(8) % 10
  return nets, params, stats, images, labels


def test_curriculum_loss_has_no_gradient_into_the_resnet(setup):
  nets, params, stats, images, labels = setup
  loss = steps.PolicyLoss(penalty=-5.0)
  x = data.to_unit_float(images)
  grads = jax.jit(jax.grad(lambda p: steps.curriculum_loss(nets, loss, p, stats, x, labels,
                                                           jax.random.key(3), 3)[0]))(params)
  assert all(np.all(g == 0) for g in jax.tree.leaves(grads["resnet"]))
  assert any(np.any(g != 0) for g in jax.tree.leaves(grads["policy"]))


@pytest.mark.parametrize("greedy", [False, True])
def test_finetune_resnet_gradient_is_the_sampled_cross_entropy_alone(setup, greedy):
  """Rewards and the greedy pass carry no gradient: the ResNet learns only from the sampled CE
  (with ``resnet_learns_greedy``, only from the greedy pass's)."""
  nets, params, stats, images, labels = setup
  loss = steps.PolicyLoss(penalty=-5.0, resnet_learns_greedy=greedy)
  x = data.to_unit_float(images)
  key = jax.random.key(4)
  (_, (metrics, _)), grads = jax.jit(jax.value_and_grad(
      lambda p: steps.finetune_loss(nets, loss, p, stats, x, labels, key), has_aux=True))(params)
  _, _, sampled, greedy_policy, _ = steps.policy_pass(nets, loss, params, stats, x, key)
  assert not np.array_equal(sampled, greedy_policy)
  sampled = greedy_policy if greedy else sampled

  def ce(resnet_params):
    logits, _ = resnet.ResNet(nets.resnet).apply(
        {"params": resnet_params, "batch_stats": stats["resnet"]}, x, sampled, train=True,
        mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  expected = jax.jit(jax.grad(ce))(params["resnet"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4),
               grads["resnet"], expected)
  assert float(metrics["blocks_sampled"]) > 0


def test_finetune_policy_term_is_summed_over_the_batch_by_default(setup):
  nets, params, stats, images, labels = setup
  x = data.to_unit_float(images)
  key = jax.random.key(5)
  summed = steps.finetune_loss(nets, steps.PolicyLoss(penalty=-5.0), params, stats, x, labels, key)
  averaged = steps.finetune_loss(nets, steps.PolicyLoss(penalty=-5.0, finetune_pg_mean=True),
                                 params, stats, x, labels, key)
  ce = summed[1][0]["cross_entropy"]
  np.testing.assert_allclose(summed[0] - ce, (averaged[0] - ce) * 8, rtol=1e-4, atol=1e-5)


def test_steps_are_jittable_and_deterministic(setup):
  nets, params, stats, images, labels = setup
  tx = optax.adam(1e-3)
  step = jax.jit(lambda s, k, c: steps.curriculum_step(
      steps.Nets(nets.resnet, nets.policy), steps.PolicyLoss(), tx, s, images, labels, k, c))
  state = steps.create_state(params, stats, tx)
  a, ma = step(state, jax.random.key(0), jnp.int32(2))
  b, mb = step(state, jax.random.key(0), jnp.int32(3))
  c, _ = step(state, jax.random.key(0), jnp.int32(2))
  assert step._cache_size() == 1  # the curriculum k is traced: one compilation for all epochs
  jax.tree.map(np.testing.assert_array_equal, a.params, c.params)
  assert int(a.step) == 1 and set(ma) >= {"loss", "reward", "blocks_sampled", "accuracy_sampled"}


def test_block_budget_prices_the_blocks_a_sample_runs_beyond_the_greedy_policy(setup):
  """With multiplier m the advantage is R(sampled) - R(greedy) - m (|sampled| - |greedy|) / K:
  the policy-gradient term moves by m times the sum of log p'(sampled) times that difference."""
  nets, params, stats, images, labels = setup
  loss = steps.PolicyLoss(penalty=-5.0)
  x = data.to_unit_float(images)
  key = jax.random.key(6)
  free = steps.finetune_loss(nets, loss, params, stats, x, labels, key)[0]
  priced = steps.finetune_loss(nets, loss, params, stats, x, labels, key, budget_multiplier=0.7)[0]
  log_p, log_not_p, sampled, greedy, _ = steps.policy_pass(nets, loss, params, stats, x, key)
  log_lik = jnp.sum(sampled * log_p + (1 - sampled) * log_not_p, -1)
  extra = jnp.mean(sampled, -1) - jnp.mean(greedy, -1)
  assert float(jnp.abs(extra).sum()) > 0  # the samples differ from the greedy policy
  np.testing.assert_allclose(priced - free, 0.7 * jnp.sum(log_lik * extra), rtol=1e-4, atol=1e-5)


def test_block_budget_multiplier_follows_the_greedy_blocks_once_every_block_is_controlled(setup):
  nets, params, stats, images, labels = setup
  K = nets.resnet.num_blocks
  tx = optax.adam(1e-3)
  loss = steps.PolicyLoss(block_budget=0.25, budget_lr=2.0)
  step = jax.jit(lambda s, k: steps.curriculum_step(nets, loss, tx, s, images, labels,
                                                    jax.random.key(7), k))
  state = steps.create_state(params, stats, tx)
  handing_over, _ = step(state, jnp.int32(K - 1))
  assert float(handing_over.budget_multiplier) == 0.0  # not every block controlled yet
  raised, metrics = step(state, jnp.int32(K))
  expected = max(0.0, 2.0 * (float(metrics["blocks_greedy"]) / K - 0.25))
  assert expected > 0
  np.testing.assert_allclose(raised.budget_multiplier, expected, rtol=1e-6)
  assert metrics["budget_multiplier"] == raised.budget_multiplier
  below = jax.jit(lambda s: steps.curriculum_step(
      nets, steps.PolicyLoss(block_budget=0.99, budget_lr=2.0), tx, s, images, labels,
      jax.random.key(7), jnp.int32(K)))(steps.create_state(params, stats, tx, 0.01))[0]
  assert float(below.budget_multiplier) == 0.0  # lowered, never below 0
  off, metrics = jax.jit(lambda s: steps.finetune_step(nets, steps.PolicyLoss(), tx, s, images,
                                                       labels, jax.random.key(7)))(state)
  assert float(off.budget_multiplier) == 0.0 and "budget_multiplier" not in metrics


@pytest.mark.parametrize("weight", [0.5, 1.0])
def test_finetune_distils_the_teacher_at_temperature(setup, weight):
  """With distillation the ResNet's gradient is that of (1 - w) CE + w T^2 KL(teacher || student)
  of the sampled pass, written out here from the softmax."""
  nets, params, stats, images, labels = setup
  distillation = steps.Distillation(weight, temperature=3.0)
  loss = steps.PolicyLoss(penalty=-5.0, distillation=distillation)
  x = data.to_unit_float(images)
  key = jax.random.key(4)
  teacher = {"params": jax.tree.map(lambda a: a * 1.1, params["resnet"]),
             "batch_stats": stats["resnet"]}
  teacher_logits = resnet.ResNet(nets.resnet).apply(teacher, x)
  grads = jax.jit(jax.grad(lambda p: steps.finetune_loss(
      nets, loss, p, stats, x, labels, key, teacher_logits=teacher_logits)[0]))(params)
  sampled = steps.policy_pass(nets, loss, params, stats, x, key)[2]

  def written_out(resnet_params):
    logits, _ = resnet.ResNet(nets.resnet).apply(
        {"params": resnet_params, "batch_stats": stats["resnet"]}, x, sampled, train=True,
        mutable=["batch_stats"])
    ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))
    target = jax.nn.softmax(teacher_logits / 3.0)
    kl = jnp.mean(jnp.sum(target * (jnp.log(target) - jax.nn.log_softmax(logits / 3.0)), -1))
    return (1 - weight) * ce + weight * 9.0 * kl

  expected = jax.jit(jax.grad(written_out))(params["resnet"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4),
               grads["resnet"], expected)


def test_static_step_trains_only_the_kept_blocks_under_a_fixed_subset(setup):
  """The static reference's step: every image runs the same blocks; a dropped block's weights get
  no gradient, the kept ones do."""
  nets, params, stats, images, labels = setup
  tx = optax.sgd(0.1)
  state = steps.create_state(params, stats, tx)
  keep = jnp.array([1.0, 0.0, 1.0])
  new, metrics = jax.jit(lambda s: steps.pretrain_step(nets, tx, s, images, labels,
                                                       jax.random.key(0), keep))(state)
  blocks = {name: (bool(np.any([np.any(a != b) for a, b in zip(
      jax.tree.leaves(new.params["resnet"][name]), jax.tree.leaves(params["resnet"][name]))])))
            for name in params["resnet"] if name.startswith("block")}
  assert blocks == {"block0": True, "block1": False, "block2": True}
  assert float(metrics["loss"]) > 0
