"""Rewards, self-critical advantage and the policy-gradient terms of BlockDrop.

Conventions follow the original code (Wu et al., ``cl_training.py`` / ``finetune.py``); each of
its quirks is the default here and is switchable in the config (see ``blockdrop_jax/configs/default.py``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def reward(policy, correct, penalty: float):
  """R(u) = 1 - (|u|_1 / K)^2 for a correct prediction, else ``penalty`` (negative)."""
  usage = jnp.mean(policy.astype(jnp.float32), axis=-1)
  return jnp.where(correct, 1.0 - usage ** 2, penalty)


def bounded_log_probs(logits, alpha: float):
  """log p' and log(1 - p') for p' = alpha p + (1 - alpha)(1 - p), p = sigmoid(logits).

  Computed in log space from the logits, so alpha = 1 (no bound) stays finite as well.
  """
  log_p, log_not_p = jax.nn.log_sigmoid(logits), jax.nn.log_sigmoid(-logits)
  if alpha == 1.0:
    return log_p, log_not_p
  log_a, log_not_a = jnp.log(alpha), jnp.log1p(-alpha)
  return (jnp.logaddexp(log_a + log_p, log_not_a + log_not_p),
          jnp.logaddexp(log_not_a + log_p, log_a + log_not_p))


def greedy_policy(logits):
  """u_map = (p >= 0.5), from the unbounded p as the original; the bounded p' (alpha in (0.5, 1],
  the only values the config takes) crosses 0.5 at the same logit."""
  return (logits >= 0).astype(jnp.float32)


def sample_policy(key, log_p_bounded, uniforms=None):
  """u ~ Bernoulli(p'), from ``key`` or from given uniform draws of the same shape."""
  if uniforms is None:
    uniforms = jax.random.uniform(key, log_p_bounded.shape)
  return (uniforms < jnp.exp(log_p_bounded)).astype(jnp.float32)


def log_likelihood(policy, log_p, log_not_p):
  """log p'(u) per block."""
  return policy * log_p + (1.0 - policy) * log_not_p


def entropy_bonus(log_p, log_not_p, full: bool = False):
  """Per-block entropy of the bounded Bernoulli. The original keeps only the -p' log p' half."""
  p = jnp.exp(log_p)
  one_term = -p * log_p
  return one_term - jnp.exp(log_not_p) * log_not_p if full else one_term
