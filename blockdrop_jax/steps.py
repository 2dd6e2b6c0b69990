"""Pure train and eval steps for the three stages: pretrain, curriculum, finetune.

Each step is ``step(nets, ..., state, images, labels, key, ..., options) -> (state, metrics)``
with all randomness from ``key``, so it runs under ``jit``, ``shard_map``/``pmap`` and in a
notebook alike: ``Nets`` says what is trained (the networks' specs), ``StepOptions`` how the step
computes it (augmentation, device axis, execution of the curriculum's passes). Images are uint8;
augmentation happens inside the step.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh, PartitionSpec

from blockdrop_jax import compact, compact_finetune, curriculum, rewards
from blockdrop_jax.data import apply_crop_flip, center_crop, crop_flip_draws, to_unit_float
from blockdrop_jax.models import resnet
from blockdrop_jax.models.resnet import ResNetSpec


@struct.dataclass
class TrainState:
  """Everything a step changes. ``params``/``batch_stats`` hold 'resnet' and (after pretraining)
  'policy' entries; the optimiser decides which of them train."""

  step: jax.Array
  params: dict
  batch_stats: dict
  opt_state: Any
  # The Lagrange multiplier of the block budget (PolicyLoss.block_budget); stays 0 without one.
  budget_multiplier: jax.Array


def create_state(params: dict, batch_stats: dict, tx: optax.GradientTransformation,
                 budget_multiplier: float = 0.0) -> TrainState:
  return TrainState(jnp.zeros((), jnp.int32), params, batch_stats, tx.init(params),
                    jnp.asarray(budget_multiplier, jnp.float32))


def make_optimizer(stage: str, cfg, steps_per_epoch: int) -> optax.GradientTransformation:
  """The stage's optimiser over the networks it trains; the others get zero updates."""
  if stage == "pretrain":
    boundaries = {int(cfg.epochs * f) * steps_per_epoch: 0.1 for f in (0.5, 0.75)}
    lr = optax.piecewise_constant_schedule(cfg.lr, boundaries)
    inner = optax.chain(optax.add_decayed_weights(cfg.weight_decay),
                        optax.sgd(lr, cfg.momentum, nesterov=cfg.nesterov))
    trained = ("resnet",)
  elif stage == "curriculum":
    inner = optax.chain(optax.add_decayed_weights(cfg.weight_decay), optax.adam(cfg.lr))
    trained = ("policy",)
  else:
    lr = optax.exponential_decay(cfg.lr, cfg.lr_decay_every * steps_per_epoch, 0.1, staircase=True)
    inner = optax.chain(optax.add_decayed_weights(cfg.weight_decay), optax.adam(lr))
    trained = ("resnet", "policy")

  def labels(params):
    return {name: jax.tree.map(lambda _: "train" if name in trained else "frozen", sub)
            for name, sub in params.items()}

  return optax.multi_transform({"train": inner, "frozen": optax.set_to_zero()}, labels)


@dataclasses.dataclass(frozen=True)
class Distillation:
  """Beyond the original: the ResNet also learns the softened outputs of a teacher (the ResNet a
  stage starts from, every block): (1 - weight) cross-entropy + weight T^2 KL(teacher || student)
  at temperature T. Weight 0: cross-entropy alone, the original."""

  weight: float = 0.0
  temperature: float = 4.0


def classification_loss(distillation: Distillation, logits, labels, teacher_logits=None):
  """The ResNet's loss on a batch: mean cross-entropy, with ``distillation`` from
  ``teacher_logits`` (needed when its weight is not 0)."""
  cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  if not distillation.weight:
    return cross_entropy
  t = distillation.temperature
  kl = optax.losses.kl_divergence(jax.nn.log_softmax(logits / t),
                                  jax.nn.softmax(jax.lax.stop_gradient(teacher_logits) / t)).mean()
  return (1 - distillation.weight) * cross_entropy + distillation.weight * t * t * kl


@dataclasses.dataclass(frozen=True)
class PolicyLoss:
  """The BlockDrop objective. Defaults are the original's quirks (docs/method.md)."""

  alpha: float = 0.8
  beta: float = 0.1  # entropy weight (curriculum only)
  penalty: float = -1.0
  full_entropy: bool = False  # original: only the -p' log p' half of the Bernoulli entropy
  # original: the entropy bonus is summed over all K blocks, also those the curriculum forces on
  entropy_controlled_only: bool = False
  finetune_pg_mean: bool = False  # original: finetune policy-gradient term summed over the batch
  # Beyond the original: at most this fraction of the K blocks per image on average (0: no
  # budget). The reward then pays ``budget_multiplier * |u|_1 / K`` less per image; the multiplier
  # rises while the greedy policy of the batch runs more than the budget and falls back towards 0
  # below it (dual ascent, ``budget_lr`` a step), once the policy controls every block.
  block_budget: float = 0.0
  budget_lr: float = 0.25
  distillation: Distillation = Distillation()  # finetuning's classification loss
  # Beyond the original: in finetuning the ResNet learns under the greedy policy (the one it runs
  # at test time) instead of the sampled one; the policy still learns from the sampled pass.
  resnet_learns_greedy: bool = False


CURRICULUM_PASSES = ("compact", "masked")  # config also takes "auto" (compact.resolve_auto)
FINETUNE_PASSES = ("masked", "compact")  # config also takes "auto" (trainer.epoch_finetune_passes)


@dataclasses.dataclass(frozen=True)
class Nets:
  """The networks a step trains or evaluates: the base ResNet's and the policy network's specs."""

  resnet: ResNetSpec
  policy: Optional[ResNetSpec] = None


@dataclasses.dataclass(frozen=True)
class StepOptions:
  """How a training step computes what it trains (a static jit argument): the data's
  augmentation and how the work is spread over devices and passes."""

  augment: bool = True  # random crops and flips (False: the centre crop)
  axis_name: Optional[str] = None  # set under pmap/shard_map so BatchNorm averages over devices
  # Curriculum passes: "compact" runs the forced-on prefix once for both passes and then each
  # block only on the images that keep it (compact.curriculum_pair); "masked" runs two full
  # masked passes as the original does; "auto" picks the faster on this backend. Same results.
  curriculum_passes: str = "auto"
  # Finetuning passes: "masked" (the original's) runs every block for every image; "compact" runs
  # each block's branch, forward and backward, only on the images that keep it, BatchNorm over
  # those images (compact_finetune). Other results than masked where a policy drops blocks.
  finetune_passes: str = "masked"
  # The mesh of a step jitted over a sharded global batch (parallel.sharded_step): compact passes
  # (curriculum and finetuning) then run under shard_map on each device's own rows, instead of
  # gathering kept rows from the whole batch across devices.
  mesh: Optional[Mesh] = None


def _forward(spec: ResNetSpec, params, stats, images, policy=None, train=False, axis_name=None):
  """(logits, new batch stats) of one network."""
  model = resnet.ResNet(spec, axis_name=axis_name)
  variables = {"params": params, "batch_stats": stats}
  if not train:
    return model.apply(variables, images, policy), stats
  logits, updates = model.apply(variables, images, policy, train=True, mutable=["batch_stats"])
  return logits, updates["batch_stats"]


def _mean_over_devices(tree, axis_name):
  return tree if axis_name is None else jax.lax.pmean(tree, axis_name)


def _this_devices_draws(axis_name: Optional[str], draw, key, rows: int):
  """Random numbers for this device's rows of the global batch.

  Under ``pmap``/``shard_map`` (``axis_name`` set) every device draws the whole global batch's
  numbers and keeps its own rows, so a step samples the same crops, flips and policies on 1 device,
  on 8 sharded devices and under ``pmap`` alike. ``draw(key, n)`` returns arrays of n rows."""
  if axis_name is None:
    return draw(key, rows)
  devices = jax.lax.psum(1, axis_name)
  start = jax.lax.axis_index(axis_name) * rows
  return jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, start, rows),
                      draw(key, rows * devices))


def training_inputs(nets: Nets, key, images, options: StepOptions = StepOptions()):
  """Training inputs: random crop and flip. CIFAR images are padded by 4 and cropped back to 32;
  larger images (ImageNet, stored at 256) give random crops of the network's input size."""
  x = to_unit_float(images)
  size = nets.resnet.image_size
  if not options.augment:
    return center_crop(x, size)
  pad = 4 if x.shape[1] == size else 0
  max_offset = x.shape[1] + 2 * pad - size
  draws = _this_devices_draws(options.axis_name, lambda k, n: crop_flip_draws(k, n, max_offset),
                              key, x.shape[0])
  return apply_crop_flip(x, *draws, pad=pad, size=size)


def _test_inputs(nets: Nets, images):
  return center_crop(to_unit_float(images), nets.resnet.image_size)


def _apply_updates(state: TrainState, tx, grads, batch_stats) -> TrainState:
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                       batch_stats=batch_stats, opt_state=opt_state)


def _update_budget_multiplier(loss: PolicyLoss, state: TrainState, metrics: dict, num_blocks: int,
                              active=True) -> tuple[TrainState, dict]:
  """Dual ascent on the block budget's multiplier from the batch's greedy blocks (the test-time
  policy; ``metrics`` are already averaged over devices); ``active`` (may be traced): whether the
  policy controls every block. Adds the multiplier to the metrics."""
  if not loss.block_budget:
    return state, metrics
  excess = metrics["blocks_greedy"] / num_blocks - loss.block_budget
  raised = jnp.maximum(state.budget_multiplier + loss.budget_lr * excess, 0.0)
  state = state.replace(budget_multiplier=jnp.where(active, raised, state.budget_multiplier))
  return state, {**metrics, "budget_multiplier": state.budget_multiplier}


def _teacher_logits(nets: Nets, teacher, x):
  """Logits of the distillation teacher ({'params', 'batch_stats'} of a ResNet of ``nets``'s
  architecture, every block, inference mode); None without one."""
  if teacher is None:
    return None
  return jax.lax.stop_gradient(
      _forward(nets.resnet, teacher["params"], teacher["batch_stats"], x)[0])


def pretrain_step(nets: Nets, tx, state: TrainState, images, labels, key, keep=None, teacher=None,
                  distillation: Distillation = Distillation(),
                  options: StepOptions = StepOptions()):
  """Training of the ResNet alone (BatchNorm in training mode): every block, or the fixed subset
  ``keep`` (K,) for every image (the static reference), with cross-entropy or ``distillation``
  from ``teacher``."""
  x = training_inputs(nets, key, images, options)
  policy = None if keep is None else jnp.broadcast_to(keep, (x.shape[0], keep.shape[-1]))

  def loss_fn(params):
    logits, stats = _forward(nets.resnet, params["resnet"], state.batch_stats["resnet"], x,
                             policy, train=True, axis_name=options.axis_name)
    loss = classification_loss(distillation, logits, labels, _teacher_logits(nets, teacher, x))
    return loss, (logits, stats)

  (loss, (logits, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grads = _mean_over_devices(grads, options.axis_name)
  state = _apply_updates(state, tx, grads, {**state.batch_stats, "resnet": stats})
  return state, _mean_over_devices({"loss": loss, "accuracy": jnp.mean(logits.argmax(-1) == labels)},
                                   options.axis_name)


def policy_pass(nets: Nets, loss: PolicyLoss, params, stats, x, key,
                axis_name: Optional[str] = None):
  """The policy network on a batch (training mode): (log p', log(1 - p'), the sampled policy,
  the greedy policy, its new batch statistics), the sample drawn with ``key``."""
  logits, policy_stats = _forward(nets.policy, params["policy"], stats["policy"], x, train=True,
                                  axis_name=axis_name)
  log_p, log_not_p = rewards.bounded_log_probs(logits, loss.alpha)
  uniforms = _this_devices_draws(
      axis_name, lambda k, n: jax.random.uniform(k, (n, logits.shape[1])), key, logits.shape[0])
  sampled = jax.lax.stop_gradient(rewards.sample_policy(key, log_p, uniforms))
  greedy = rewards.greedy_policy(jax.lax.stop_gradient(logits))
  return log_p, log_not_p, sampled, greedy, policy_stats


def _compact_passes(nets: Nets, mesh: Optional[Mesh]):
  """compact.curriculum_pair of ``nets.resnet``, per device when the batch is sharded."""
  pair = functools.partial(compact.curriculum_pair, nets.resnet)
  if mesh is None:
    return pair
  rows, whole = PartitionSpec(mesh.axis_names), PartitionSpec()
  return jax.shard_map(pair, mesh=mesh, in_specs=(whole, rows, rows, rows, whole),
                       out_specs=(rows, rows))


def curriculum_loss(nets: Nets, loss: PolicyLoss, params, stats, x, labels, key, k,
                    budget_multiplier=0.0, options: StepOptions = StepOptions()):
  """Stage 1 loss (ResNet frozen, BN inference mode) and its measurements.

  Returns (loss, (metrics, new policy batch stats)). ``k`` is the number of policy-controlled
  blocks; it may be a traced value, so the whole curriculum compiles once.
  """
  K = nets.resnet.num_blocks
  log_p, log_not_p, sampled, greedy, policy_stats = policy_pass(nets, loss, params, stats, x, key,
                                                                options.axis_name)
  mask = curriculum.controlled_mask(k, K)
  sampled, greedy = curriculum.force_prefix(sampled, mask), curriculum.force_prefix(greedy, mask)
  frozen = jax.lax.stop_gradient(params["resnet"])
  if compact.resolve_auto(options.curriculum_passes) == "compact":
    logits_greedy, logits_sampled = _compact_passes(nets, options.mesh)(
        {"params": frozen, "batch_stats": stats["resnet"]}, x, greedy, sampled, K - k)
  else:
    logits_greedy, _ = _forward(nets.resnet, frozen, stats["resnet"], x, greedy)
    logits_sampled, _ = _forward(nets.resnet, frozen, stats["resnet"], x, sampled)
  total, metrics = policy_gradient_loss(loss, log_p, log_not_p, sampled, greedy, logits_sampled,
                                        logits_greedy, labels, mask, entropy=True, mean=True,
                                        budget_multiplier=budget_multiplier)
  return total, (metrics, policy_stats)


def policy_gradient_loss(loss: PolicyLoss, log_p, log_not_p, sampled, greedy, logits_sampled,
                         logits_greedy, labels, mask, entropy: bool, mean: bool,
                         budget_multiplier=0.0):
  """The self-critical policy-gradient loss (with the entropy bonus if ``entropy``; averaged over
  the batch if ``mean``) over the blocks in ``mask``, and the policy's metrics."""
  batch = labels.shape[0]
  correct_sampled = logits_sampled.argmax(-1) == labels
  reward_sampled = rewards.reward(sampled, correct_sampled, loss.penalty)
  reward_greedy = rewards.reward(greedy, logits_greedy.argmax(-1) == labels, loss.penalty)
  # The block budget's price of the blocks run (0 without a budget).
  extra_blocks = jnp.mean(sampled, -1) - jnp.mean(greedy, -1)
  advantage = jax.lax.stop_gradient(reward_sampled - reward_greedy
                                    - budget_multiplier * extra_blocks)
  log_lik = rewards.log_likelihood(sampled, log_p, log_not_p) * mask
  pg = -jnp.sum(log_lik * advantage[:, None])
  total = pg
  if entropy:
    bonus = rewards.entropy_bonus(log_p, log_not_p, loss.full_entropy)
    total = total - loss.beta * jnp.sum(bonus * mask if loss.entropy_controlled_only else bonus)
  if mean:
    total = total / batch
  metrics = {
      "reward": jnp.mean(reward_sampled),
      "reward_greedy": jnp.mean(reward_greedy),
      "accuracy_sampled": jnp.mean(correct_sampled),
      "accuracy_greedy": jnp.mean(logits_greedy.argmax(-1) == labels),
      "blocks_sampled": jnp.mean(jnp.sum(sampled, -1)),
      "blocks_greedy": jnp.mean(jnp.sum(greedy, -1)),
      "policy_loss": pg / batch,
      # Each block's mean sampling probability p': the curriculum's diagnosis (report.py).
      **{f"keep_probability_{t}": p for t, p in enumerate(jnp.mean(jnp.exp(log_p), axis=0))},
  }
  return total, metrics


def curriculum_step(nets: Nets, loss: PolicyLoss, tx, state: TrainState, images, labels, key, k,
                    options: StepOptions = StepOptions()):
  """One curriculum update of the policy network; the ResNet stays frozen."""
  aug_key, sample_key = jax.random.split(key)
  x = training_inputs(nets, aug_key, images, options)
  grad_fn = jax.value_and_grad(
      lambda p: curriculum_loss(nets, loss, p, state.batch_stats, x, labels, sample_key, k,
                                state.budget_multiplier, options),
      has_aux=True)
  (total, (metrics, policy_stats)), grads = grad_fn(state.params)
  grads = _mean_over_devices(grads, options.axis_name)
  new_state = _apply_updates(state, tx, grads, {**state.batch_stats, "policy": policy_stats})
  metrics = _mean_over_devices({**metrics, "loss": total}, options.axis_name)
  K = nets.resnet.num_blocks
  return _update_budget_multiplier(loss, new_state, metrics, K, active=k >= K)


def _training_passes(nets: Nets, options: StepOptions, compact_rows: bool):
  """f(params, batch stats, images, policy) -> (logits, new batch stats) of the ResNet in training
  mode: masked, or with each block's branch on its kept rows only (``compact_rows``), per device
  under ``shard_map`` when the batch is sharded."""
  if not compact_rows:
    return lambda p, s, x, policy: _forward(nets.resnet, p, s, x, policy, train=True,
                                            axis_name=options.axis_name)
  if options.mesh is None:
    return functools.partial(compact_finetune.train_forward, nets.resnet,
                             axis_name=options.axis_name)
  rows, whole = PartitionSpec(options.mesh.axis_names), PartitionSpec()
  forward = functools.partial(compact_finetune.train_forward, nets.resnet,
                              axis_name=options.mesh.axis_names[0])
  return jax.shard_map(forward, mesh=options.mesh, in_specs=(whole, whole, rows, rows),
                       out_specs=(rows, whole))


def finetune_loss(nets: Nets, loss: PolicyLoss, params, stats, x, labels, key,
                  budget_multiplier=0.0, teacher_logits=None,
                  options: StepOptions = StepOptions()):
  """Stage 2: policy gradient (summed over the batch, as the original) + cross-entropy of the
  sampled pass (or with ``loss.distillation`` from ``teacher_logits``). Both ResNet passes run
  with BatchNorm in training mode, greedy first, as the original does; gradients reach the ResNet
  only through the sampled pass (``loss.resnet_learns_greedy``: only through the greedy one).
  ``options.finetune_passes`` says how the passes run the blocks."""
  if options.finetune_passes not in FINETUNE_PASSES:
    raise ValueError(f"finetune_passes={options.finetune_passes!r}; use one of {FINETUNE_PASSES} "
                     "(the trainer resolves config.finetune.passes='auto' per epoch)")
  passes = _training_passes(nets, options, options.finetune_passes == "compact")
  axis_name = options.axis_name
  log_p, log_not_p, sampled, greedy, policy_stats = policy_pass(nets, loss, params, stats, x, key,
                                                                axis_name)
  learning, frozen = params["resnet"], jax.lax.stop_gradient(params["resnet"])
  greedy_weights, sampled_weights = ((learning, frozen) if loss.resnet_learns_greedy
                                     else (frozen, learning))
  logits_greedy, resnet_stats = passes(greedy_weights, stats["resnet"], x, greedy)
  logits_sampled, resnet_stats = passes(sampled_weights, resnet_stats, x, sampled)
  ones = jnp.ones((nets.resnet.num_blocks,))
  pg, metrics = policy_gradient_loss(loss, log_p, log_not_p, sampled, greedy, logits_sampled,
                                     jax.lax.stop_gradient(logits_greedy), labels, ones,
                                     entropy=False, mean=loss.finetune_pg_mean,
                                     budget_multiplier=budget_multiplier)
  cross_entropy = classification_loss(
      loss.distillation, logits_greedy if loss.resnet_learns_greedy else logits_sampled, labels,
      teacher_logits)
  metrics = {**metrics, "cross_entropy": cross_entropy}
  if axis_name is not None and not loss.finetune_pg_mean:
    # Gradients are averaged over devices; a sum over the global batch is n times that average.
    pg = pg * jax.lax.psum(1, axis_name)
  return pg + cross_entropy, (metrics, {"policy": policy_stats, "resnet": resnet_stats})


def finetune_step(nets: Nets, loss: PolicyLoss, tx, state: TrainState, images, labels, key,
                  teacher=None, options: StepOptions = StepOptions()):
  """One joint update of the policy network and the ResNet (``teacher``: the ResNet that
  ``loss.distillation`` distils from)."""
  aug_key, sample_key = jax.random.split(key)
  x = training_inputs(nets, aug_key, images, options)
  teacher_logits = _teacher_logits(nets, teacher, x)
  grad_fn = jax.value_and_grad(
      lambda p: finetune_loss(nets, loss, p, state.batch_stats, x, labels, sample_key,
                              state.budget_multiplier, teacher_logits, options),
      has_aux=True)
  (total, (metrics, stats)), grads = grad_fn(state.params)
  grads = _mean_over_devices(grads, options.axis_name)
  new_state = _apply_updates(state, tx, grads, stats)
  metrics = _mean_over_devices({**metrics, "loss": total}, options.axis_name)
  return _update_budget_multiplier(loss, new_state, metrics, nets.resnet.num_blocks)


def greedy_policy(nets: Nets, params, stats, images, k=None):
  """The test-time policy: p >= 0.5 from the policy net (inference mode). With ``k`` (during
  the curriculum) the blocks outside the policy's control are forced on, as in training."""
  logits, _ = _forward(nets.policy, params["policy"], stats["policy"], _test_inputs(nets, images))
  policy = (logits >= 0).astype(jnp.float32)
  if k is not None:
    policy = curriculum.force_prefix(policy, curriculum.controlled_mask(k, nets.resnet.num_blocks))
  return policy


def greedy_eval(nets: Nets, params, stats, images, k=None, only_kept_rows: bool = False):
  """Test-time BlockDrop: (logits, policy) of uint8 images, both nets in inference mode; with
  ``only_kept_rows`` each block runs only for the images that keep it (same logits, less time)."""
  policy = greedy_policy(nets, params, stats, images, k)
  return resnet_eval(nets, params, stats, images, policy, only_kept_rows), policy


def resnet_eval(nets: Nets, params, stats, images, policy=None, only_kept_rows: bool = False):
  """Logits of the ResNet alone (inference mode) under an optional fixed policy; with
  ``only_kept_rows`` (and a policy) each block runs only for the images that keep it."""
  if only_kept_rows and policy is not None:
    variables = {"params": params["resnet"], "batch_stats": stats["resnet"]}
    return compact.compact_apply(nets.resnet, variables, _test_inputs(nets, images), policy)
  return _forward(nets.resnet, params["resnet"], stats["resnet"], _test_inputs(nets, images),
                  policy)[0]
