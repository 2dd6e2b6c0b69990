"""The BlockDrop objective, term by term, against docs/method.md written out in numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blockdrop_jax import curriculum, rewards, steps


def test_reward_values():
  policy = jnp.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0], [1] * 6])
  r = rewards.reward(policy, jnp.array([True, False, True]), penalty=-5.0)
  np.testing.assert_allclose(r, [1 - 0.25, -5.0, 0.0])


@pytest.mark.parametrize("alpha", [0.8, 0.95, 1.0])
def test_bounded_probabilities(alpha):
  logits = jnp.array([-1e4, -30.0, -1.0, 0.0, 2.0, 30.0, 1e4])
  log_p, log_not_p = rewards.bounded_log_probs(logits, alpha)
  p = jax.nn.sigmoid(logits)
  np.testing.assert_allclose(jnp.exp(log_p), alpha * p + (1 - alpha) * (1 - p), rtol=1e-6)
  np.testing.assert_allclose(jnp.exp(log_p) + jnp.exp(log_not_p), 1.0, rtol=1e-6)
  assert np.all(np.isfinite(log_p)) and np.all(np.isfinite(log_not_p))
  if alpha < 1:
    assert np.all(jnp.exp(log_p) >= 1 - alpha - 1e-6) and np.all(jnp.exp(log_p) <= alpha + 1e-6)


def test_greedy_uses_unbounded_probability():
  logits = jnp.array([-0.1, 0.0, 0.1])
  np.testing.assert_array_equal(rewards.greedy_policy(logits), [0, 1, 1])


def test_sampling_frequency_matches_bounded_probability():
  log_p, _ = rewards.bounded_log_probs(jnp.full((20000, 2), jnp.array([-50.0, 0.0])), 0.8)
  u = rewards.sample_policy(jax.random.key(0), log_p)
  np.testing.assert_allclose(u.mean(0), [0.2, 0.5], atol=0.015)


def test_entropy_terms():
  log_p, log_not_p = rewards.bounded_log_probs(jnp.array([0.3]), 0.8)
  p = float(jnp.exp(log_p)[0])
  np.testing.assert_allclose(rewards.entropy_bonus(log_p, log_not_p), [-p * np.log(p)], rtol=1e-6)
  np.testing.assert_allclose(rewards.entropy_bonus(log_p, log_not_p, full=True),
                             [-p * np.log(p) - (1 - p) * np.log(1 - p)], rtol=1e-6)


def test_curriculum_schedule_forcing_and_mask():
  assert [curriculum.controlled_blocks(e, 4) for e in range(6)] == [1, 2, 3, 4, 4, 4]
  assert [curriculum.controlled_blocks(e, 4, 2) for e in range(6)] == [1, 1, 2, 2, 3, 3]
  # Per step: every 3 steps, whatever the epoch.
  assert [curriculum.controlled_blocks(0, 4, 1, s, 3) for s in range(0, 14, 2)] == [1, 1, 2, 3, 3, 4, 4]
  mask = curriculum.controlled_mask(jnp.int32(2), 5)
  np.testing.assert_array_equal(mask, [0, 0, 0, 1, 1])
  np.testing.assert_array_equal(curriculum.force_prefix(jnp.zeros((1, 5)), mask), [[1, 1, 1, 0, 0]])


def _numpy_loss(logits, u, u_map, correct_u, correct_map, mask, loss, entropy, mean):
  """docs/method.md's losses written out directly."""
  p = 1 / (1 + np.exp(-logits))
  pb = loss.alpha * p + (1 - loss.alpha) * (1 - p)
  K = u.shape[1]
  r = np.where(correct_u, 1 - (u.sum(1) / K) ** 2, loss.penalty)
  r_map = np.where(correct_map, 1 - (u_map.sum(1) / K) ** 2, loss.penalty)
  log_lik = np.log(np.where(u == 1, pb, 1 - pb))
  total = -(log_lik * mask * (r - r_map)[:, None]).sum()
  if entropy:
    bonus = -pb * np.log(pb)
    total -= loss.beta * (bonus * mask if loss.entropy_controlled_only else bonus).sum()
  return total / len(u) if mean else total


@pytest.mark.parametrize("entropy,mean,controlled_only",
                         [(True, True, False), (True, True, True), (False, False, False)])
def test_policy_gradient_loss_matches_the_formula(entropy, mean, controlled_only):
  rng = np.random.default_rng(0)
  B, K = 6, 5
  logits = rng.normal(size=(B, K)).astype(np.float32)
  u = rng.integers(0, 2, (B, K)).astype(np.float32)
  u_map = (logits >= 0).astype(np.float32)
  labels = rng.integers(0, 3, B)
  logits_u = np.eye(3, dtype=np.float32)[rng.integers(0, 3, B)]
  logits_map = np.eye(3, dtype=np.float32)[rng.integers(0, 3, B)]
  mask = np.array([0, 0, 1, 1, 1], np.float32)
  loss = steps.PolicyLoss(alpha=0.8, beta=0.1, penalty=-3.0,
                          entropy_controlled_only=controlled_only)
  log_p, log_not_p = rewards.bounded_log_probs(jnp.asarray(logits), loss.alpha)
  ours, _ = steps.policy_gradient_loss(loss, log_p, log_not_p, u, u_map, logits_u, logits_map,
                                       labels, mask, entropy=entropy, mean=mean)
  expected = _numpy_loss(logits, u, u_map, logits_u.argmax(1) == labels,
                         logits_map.argmax(1) == labels, mask, loss, entropy, mean)
  np.testing.assert_allclose(ours, expected, rtol=1e-5)


def test_forced_blocks_get_no_policy_gradient():
  loss = steps.PolicyLoss(alpha=0.8, penalty=-1.0)
  logits = jnp.asarray(np.random.default_rng(1).normal(size=(4, 5)), jnp.float32)
  u = jnp.ones((4, 5)).at[:, 3].set(0.0)
  mask = jnp.array([0, 0, 0, 1, 1], jnp.float32)
  labels = jnp.array([0, 1, 0, 1])
  wrong = jnp.eye(2)[1 - labels]

  def pg(lg):
    log_p, log_not_p = rewards.bounded_log_probs(lg, loss.alpha)
    return steps.policy_gradient_loss(loss, log_p, log_not_p, u, jnp.ones((4, 5)), wrong,
                                      jnp.eye(2)[labels], labels, mask, entropy=False,
                                      mean=True)[0]

  grad = jax.grad(pg)(logits)
  np.testing.assert_array_equal(grad[:, :3], 0.0)
  assert np.all(np.abs(grad[:, 3:]) > 0)
