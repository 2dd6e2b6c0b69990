"""What a run starts from: its datasets (training, validation, test) and initial weights, and the
references it is compared with, computed from the same sources."""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import jax
import jax.numpy as jnp

from blockdrop_jax import checkpoint, configs, convert, original_checkpoint, references
from blockdrop_jax.data import Dataset, load_dataset, split_validation
from blockdrop_jax.errors import BlockDropError
from blockdrop_jax.models import resnet
from blockdrop_jax.steps import Nets

def load_data(config) -> tuple[Dataset, Optional[Dataset], Dataset]:
  """(training, validation or None, test) datasets of ``config``."""
  d = config.data
  if not d.train or not d.test:
    raise BlockDropError("config.data.train / config.data.test is empty: give a CIFAR file, folder "
                         "or name, or an image folder such as ImageNet's (<split>/<class>/*.JPEG)")
  kwargs = dict(dataset=d.dataset, data_dir=d.data_dir or None, download=d.download)
  train = load_dataset(d.train, d.train_split, **kwargs)
  test = load_dataset(d.test, d.test_split, **kwargs)
  train, validation = split_validation(train.head(d.train_limit) if d.train_limit else train,
                                       d.validation, config.seed)
  return train, validation, test.head(d.test_limit) if d.test_limit else test


def initial_variables(config, key) -> tuple[Nets, dict, dict]:
  """Specs and (params, batch_stats) of the base ResNet and the policy network: from
  ``config.init_from`` (an earlier run's workdir, or a checkpoint of the original code, whose
  ResNet comes from ``config.base.checkpoint`` if it holds the policy alone), else a base file
  plus a fresh policy."""
  if config.init_from and os.path.isfile(config.init_from):  # the original's BlockDrop checkpoint
    nets, params, stats = original_checkpoint.load_blockdrop_checkpoint(
        config.init_from, config.base.checkpoint or None, config.base.input_mean or None,
        config.base.input_std or None)
    return nets, params, stats
  if config.init_from:
    return checkpoint.load_run(config.init_from)[:3]
  if config.base.checkpoint:
    spec, base = convert.load_pretrained(config.base.checkpoint, config.base.arch or None,
                                         config.base.shortcut or None)
  else:
    spec = resnet.make_spec(config.base.arch, config.base.num_classes, config.base.shortcut or None)
    base = resnet.init(spec, jax.random.fold_in(key, 1))
  if config.base.input_mean or config.base.input_std:
    spec = dataclasses.replace(spec, input_mean=tuple(config.base.input_mean or spec.input_mean),
                               input_std=tuple(config.base.input_std or spec.input_std))
  policy_spec = resnet.policy_spec(spec, config.policy_arch or None,
                                   config.policy_input_pool or None)
  policy = resnet.init(policy_spec, jax.random.fold_in(key, 2))
  if config.policy_init:
    policy = convert.policy_from_resnet(policy_spec, policy, config.policy_init)
  if config.policy_init_bias:
    policy = resnet.with_policy_bias(policy, config.policy_init_bias)
  nets = Nets(spec, policy_spec)
  params = {"resnet": base["params"], "policy": policy["params"]}
  stats = {"resnet": base["batch_stats"], "policy": policy["batch_stats"]}
  return nets, jax.tree.map(jnp.asarray, params), jax.tree.map(jnp.asarray, stats)


def selection_images(config) -> Dataset:
  """The images a run's choices are made on, never the test set: its validation split, or,
  without one, its first 500 training images (the run trained on them)."""
  train, validation, _ = load_data(config)
  return validation if validation is not None else train.head(500)


def run_references(nets: Nets, params, stats, meta: Optional[dict], dataset: Dataset,
                   mean_blocks: float, batch_size: int = 250,
                   more_static: tuple[int, ...] = ()) -> dict:
  """``references.references`` of a run's checkpoint (``meta``): against the ResNet it started
  from, with its static subsets and mode chosen on its ``selection_images``. Without ``meta``
  (the original's checkpoint, no config): the full network, FirstK and RandomK."""
  if meta is None:
    return references.references(nets, params, stats, dataset, mean_blocks,
                                 batch_size=batch_size)
  config = configs.from_json(meta["config"])
  return references.references(nets, params, stats, dataset, mean_blocks,
                               selection=selection_images(config),
                               pretrained=starting_resnet(config), batch_size=batch_size,
                               more_static=more_static,
                               mode=checkpoint.static_keep(meta) is None)


def starting_resnet(config) -> Optional[tuple[resnet.ResNetSpec, dict]]:
  """(spec, variables) of the ResNet a run of ``config`` starts from, before any of its training:
  its base file or its ``init_from`` run; None if it pretrains its own."""
  if "pretrain" in tuple(config.stages):
    return None
  nets, params, stats = initial_variables(config, jax.random.key(config.seed))
  return nets.resnet, {"params": params["resnet"], "batch_stats": stats["resnet"]}

