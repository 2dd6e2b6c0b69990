"""Every experiment config loads, validates its keys, and has a smoke variant."""

import os

import pytest

from blockdrop_jax import BlockDropError, configs


@pytest.mark.parametrize("name", configs.experiments())
@pytest.mark.parametrize("variant", ["", "smoke"])
def test_config_loads(name, variant):
  config = configs.load(f"{name}:{variant}" if variant else name)
  assert set(config.stages) <= {"pretrain", "curriculum", "finetune"}
  if variant == "smoke":
    assert config.data.train_limit and config.data.train_limit <= 64


def test_original_hyper_parameters():
  r110 = configs.load("r110_c10")
  assert (r110.curriculum.lr, r110.curriculum.batch_size, r110.curriculum.alpha) == (1e-3, 2048, 0.8)
  assert (r110.finetune.lr, r110.finetune.penalty, r110.finetune.batch_size) == (1e-4, -10.0, 256)
  assert (r110.finetune.epochs, r110.finetune.lr_decay_every) == (2000, 1600)
  assert r110.base.shortcut == "avgpool" and not r110.base.input_mean  # raw [0, 1] pixels


def test_recipe_is_opt_in_and_combines_with_smoke():
  """The original's behaviour stays the default; ``:recipe`` switches on what the sweep kept."""
  path = "akamaster_r56_subset"
  original, recipe = configs.load(path), configs.load(path + ":recipe,smoke")
  assert (original.policy_init_bias, original.curriculum.lr, original.curriculum.steps_per_block,
          original.curriculum.alpha, original.curriculum.beta) == (0.0, 1e-3, 0, 0.8, 0.1)
  assert (recipe.policy_init_bias, recipe.curriculum.lr, recipe.curriculum.steps_per_block,
          recipe.curriculum.alpha, recipe.curriculum.beta) == (3.0, 1e-2, 1, 0.9, 0.0)
  assert (original.curriculum.penalty, original.finetune.penalty, original.finetune.alpha) == (
      -1.0, -5.0, 0.8)
  assert (recipe.curriculum.penalty, recipe.finetune.penalty, recipe.finetune.alpha) == (
      -0.7, -1.0, 0.9)
  assert (original.block_budget.fraction, recipe.block_budget.fraction) == (0.0, 0.76)
  assert (original.policy_input_pool, recipe.policy_input_pool) == (0, 2)
  assert not original.finetune.resnet_learns_greedy and recipe.finetune.resnet_learns_greedy
  assert (original.data.validation, recipe.data.validation) == (0, 16)
  assert recipe.data.train_limit == 48


def test_a_config_is_a_name_or_a_file():
  by_name = configs.load("quickstart:recipe,static")
  by_file = configs.load(os.path.join(os.path.dirname(configs.__file__), "quickstart.py")
                         + ":recipe,static")
  assert by_name == by_file and by_name.finetune.static and by_name.stages == ("finetune",)
  with pytest.raises(BlockDropError, match="unknown config 'quikstart'.*quickstart"):
    configs.load("quikstart")


def test_overrides_keep_types_and_refuse_unknown_keys():
  path = "akamaster_r32_subset"
  config = configs.load(path, ["--config.finetune.penalty=-10", "--config.stages=finetune",
                               "--config.data.augment=false"])
  assert config.finetune.penalty == -10.0 and config.stages == ("finetune",)
  assert config.data.augment is False
  with pytest.raises(BlockDropError, match="unknown config key config.finetune.pnalty"):
    configs.load(path, ["--config.finetune.pnalty=-10"])
  with pytest.raises(BlockDropError, match="unknown variant|unknown config variant"):
    configs.load(path + ":huge")


def test_resume_may_extend_epochs_but_not_change_the_experiment():
  import json
  from blockdrop_jax import run_checks
  path = "akamaster_r32_subset"
  saved = json.loads(configs.load(path).to_json())
  del saved["curriculum"]["passes"], saved["policy_init_bias"]  # saved before the keys existed
  longer = configs.load(path, ["--config.curriculum.epochs=60", "--config.curriculum.passes=masked"])
  assert run_checks.config_changes(saved, longer.to_dict()) == []
  other = configs.load(path, ["--config.finetune.penalty=-10", "--config.seed=3"])
  assert run_checks.config_changes(saved, other.to_dict()) == ["finetune.penalty", "seed"]


def test_unknown_curriculum_passes_is_refused():
  from blockdrop_jax import run_checks
  config = configs.load("akamaster_r32_subset",
                        ["--config.curriculum.passes=fused"])
  with pytest.raises(BlockDropError, match="config.curriculum.passes = 'fused'"):
    run_checks.validate(config)
