"""Defaults shared by every experiment: the original BlockDrop hyper-parameters (docs/method.md).

Experiments import this and override. Variants: ``NAME:smoke`` shrinks a config to
a seconds-long run for tests; ``:recipe`` applies the short-run recipe; ``:static`` makes the
static-subset reference of a config (``:recipe,static`` that of the recipe); several combine
(``:recipe,smoke``).
"""

import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Stages run in order; each starts from the previous one's weights.
  c.stages = ("curriculum", "finetune")
  # Base ResNet: a PyTorch/safetensors file (architecture inferred from its keys), or, for the
  # pretrain stage, an architecture trained from scratch.
  c.base = ml_collections.ConfigDict(dict(
      # arch: inferred from a checkpoint's keys (set it to override); required for pretraining.
      checkpoint="", arch="", shortcut="", num_classes=10,
      # Input normalisation of the base; empty: what the weights' source used (see convert.py).
      input_mean=(), input_std=()))
  c.init_from = ""  # an earlier run's workdir: start from its latest weights (base and policy)
  c.policy_arch = ""  # default: ResNet-8 (CIFAR) or ResNet-10 at 112 px (ImageNet)
  # A ResNet (file or name) whose stem and first block of each stage start the policy network,
  # as the original starts its ImageNet one from torchvision's ResNet-18; empty: random.
  c.policy_init = ""
  # Beyond the original (docs/method.md, "Short runs"); the defaults keep the original's behaviour.
  # The policy classifier's bias starts at this value (0: its initialisation, zeros; 10 is the
  # original test.py's "every block on"; 3 starts each block at p = 0.95, still trainable).
  c.policy_init_bias = 0.0
  # True: the bias starts at +policy_init_bias (3 if 0) for the blocks of the best static subset
  # of the block budget's size and at minus that for the others (the subset chosen as ``:static``
  # chooses it, on the validation images), so that the policy learns per-image departures from
  # the strongest fixed policy instead of finding it; False: the same bias for every block.
  c.policy_init_static = False
  # Average-pool the policy's input by this factor (0: the original's, 1 on CIFAR and 2 on
  # ImageNet); 2 on CIFAR cuts the ResNet-8 policy's FLOPs by 4.
  c.policy_input_pool = 0
  c.data = _data()
  c.pretrain = ml_collections.ConfigDict(dict(
      epochs=160, batch_size=128, lr=0.1, momentum=0.9, nesterov=False, weight_decay=1e-4))
  c.curriculum = _curriculum()
  c.finetune = _finetune()
  # The original's quirks are the defaults; each switch restores the textbook form.
  c.quirks = ml_collections.ConfigDict(dict(
      full_entropy=False,  # True: full Bernoulli entropy instead of only -p' log p'
      finetune_pg_mean=False,  # True: average the finetune policy-gradient term over the batch
      # True: the curriculum's entropy bonus only over the blocks the policy controls; the original
      # sums it over all K, which pulls the forced-on blocks towards p = 0.28 before they are
      # handed over (docs/method.md).
      entropy_controlled_only=False,
  ))
  # Beyond the original: a budget of blocks (docs/method.md). With fraction > 0 the policy stages
  # run at most that fraction of the K blocks per image on average, through a Lagrange multiplier
  # on the reward (raised by lr times the excess fraction a step once every block is controlled,
  # lowered below the budget, never below 0); 0: no budget, the original.
  c.block_budget = ml_collections.ConfigDict(dict(fraction=0.0, lr=0.25))
  _set_bookkeeping(c)
  return apply_variant(c, variant)


def _set_bookkeeping(c: ml_collections.ConfigDict) -> None:
  """When to evaluate, save and log: keys that change no result, which a resumed run may change."""
  c.eval_every = 10  # epochs
  # Checkpoints: at the end of every N-th epoch, of each evaluated epoch (so that the best can be
  # kept) and of each stage's last epoch. Raise N where an epoch is short beside a save (an
  # asynchronous save of a ResNet-56 run holds the steps about 0.2 s on a CPU;
  # benchmarks/checkpoint_save.py).
  c.checkpoint_every_epochs = 1
  c.checkpoint_every_steps = 0  # also inside epochs, every N steps; 0: never
  c.keep_checkpoints = 3
  c.eval_batch_size = 500
  # Steps between fetches of the training metrics to the host (progress bar, NaN check); the
  # steps in between run without the host waiting for them.
  c.log_every_steps = 10
  # Trace N steps, from the run's second, with jax.profiler into WORKDIR/tensorboard (TensorBoard's
  # profile tab; pip install tensorboard-plugin-profile). 0: none.
  c.profile_steps = 0


def _data() -> ml_collections.ConfigDict:
  """Where the images come from, and the validation images held out of them."""
  return ml_collections.ConfigDict(dict(
      train="cifar10", test="cifar10", train_split="train", test_split="test", dataset="cifar10",
      data_dir="", download=False, train_limit=0, test_limit=0, augment=True,
      # Training images held out (drawn with the seed) to choose on: the best checkpoint,
      # recipes, sweeps and the static references. 0: none, and the best checkpoint is chosen on
      # the test set, as the original.
      validation=0))


def _curriculum() -> ml_collections.ConfigDict:
  """Stage 1: the policy alone, the ResNet frozen (the original's cl_training.py)."""
  return ml_collections.ConfigDict(dict(
      epochs=5000, batch_size=2048, lr=1e-3, weight_decay=0.0, alpha=0.8, beta=0.1, penalty=-1.0,
      epochs_per_block=1,
      # Hand over one more block every N steps instead of every epochs_per_block epochs (0: per
      # epoch, the original); a short run then reaches k = K early.
      steps_per_block=0,
      # "compact": the forced prefix once, then each block only on the images that keep it (on
      # several devices each runs its own rows); "masked": two full masked passes, as the
      # original; "auto": compact on CPU, masked on GPU, where it is faster (docs/results.md).
      # Same losses and gradients.
      passes="auto"))


def _finetune() -> ml_collections.ConfigDict:
  """Stage 2: the policy and the ResNet together (the original's finetune.py)."""
  return ml_collections.ConfigDict(dict(
      epochs=2000, batch_size=256, lr=1e-4, lr_decay_every=1600, weight_decay=0.0, alpha=0.8,
      penalty=-5.0,
      # Beyond the original: distillation from the ResNet the stage starts from (every block,
      # inference mode). The classification loss becomes (1 - w) cross-entropy + w T^2
      # KL(teacher || student) at temperature T; 0: cross-entropy alone, the original.
      distill_weight=0.0, distill_temperature=4.0,
      # Beyond the original: True trains the ResNet under the greedy policy, the one it runs at
      # test time (the policy still learns from sampled policies); False: under the sampled one.
      resnet_learns_greedy=False,
      # The static reference (``:static``): True finetunes the ResNet alone under one fixed
      # subset of round(block_budget.fraction K) blocks, chosen on the validation images by
      # greedy backward elimination from the starting ResNet; False: BlockDrop's finetuning.
      static=False,
      # How the two training-mode ResNet passes run the blocks. "masked": every block for every
      # image, the dropped outputs discarded, as the original; "compact": each block's branch,
      # forward and backward, only on the images that keep it, its BatchNorm statistics over
      # those images (docs/method.md); "auto": compact on CPU in epochs that follow one whose
      # sampled policies kept few enough blocks for it to be faster, masked otherwise and on
      # other backends (docs/results.md).
      passes="masked"))


def apply_variant(c: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
  """Any of ``recipe``, ``static`` and ``smoke`` (``recipe,static,smoke``), applied in that
  order."""
  names = [name for name in variant.split(",") if name]
  for name in names:
    if name not in VARIANTS:
      raise ValueError(f"unknown config variant {name!r}; use {', '.join(VARIANTS)} or none")
  for name, apply in VARIANTS.items():
    if name in names:
      apply(c)
  return c


def apply_short_run_recipe(c: ml_collections.ConfigDict) -> None:
  """BlockDrop in a few hundred curriculum steps and a few finetuning epochs: the switches beyond
  the original that the short-run measurements kept (docs/method.md, "Switches beyond the
  original"). Every block starts on, the policy learns ten times faster, a block is handed over
  every step (so that the last blocks, handed over first, are not settled before the others are
  offered), samples stay close to the greedy policy, no entropy bonus, smaller penalties for a
  wrong prediction, so that a few hundred steps learn to drop blocks, a budget of 76% of the
  blocks (with the policy on the 2x pooled image, 80% of the FLOPs), the ResNet finetuned under
  the greedy policy it runs at test time, and 500 training images held out to choose on."""
  c.policy_init_bias = 3.0
  c.policy_input_pool = 2
  c.block_budget.fraction = 0.76
  c.curriculum.update(lr=1e-2, steps_per_block=1, alpha=0.9, beta=0.0, penalty=-0.7)
  c.finetune.update(alpha=0.9, penalty=-1.0, resnet_learns_greedy=True)
  c.data.validation = 500


def apply_static_reference(c: ml_collections.ConfigDict) -> None:
  """The static reference for a BlockDrop config: the same finetuning (epochs, optimiser,
  distillation) of the ResNet alone under one fixed subset of as many blocks as the config's
  block budget allows (0.89 of them without one; ``--config.block_budget.fraction`` sets it),
  chosen from the starting ResNet on validation
  images (docs/method.md, "Static references")."""
  c.stages = ("finetune",)
  c.finetune.static = True
  c.block_budget.fraction = c.block_budget.fraction or 0.89
  c.data.validation = c.data.validation or 500


def shrink_to_smoke(c: ml_collections.ConfigDict) -> None:
  """A few steps on a few images: exercises every code path in seconds."""
  c.data.train_limit, c.data.test_limit = 48, 48
  c.pretrain.update(epochs=1, batch_size=16)
  c.curriculum.update(epochs=2, batch_size=16)
  c.finetune.update(epochs=1, batch_size=16, lr_decay_every=1)
  c.eval_every = 1
  c.eval_batch_size = 32
  if c.data.validation:
    c.data.validation = 16


VARIANTS = {"recipe": apply_short_run_recipe, "static": apply_static_reference,
            "smoke": shrink_to_smoke}
