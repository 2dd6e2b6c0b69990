"""Data parallelism on 8 fake CPU devices (conftest sets XLA_FLAGS before JAX starts)."""

import collections
import dataclasses
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from blockdrop_jax import BlockDropError, parallel, steps
from blockdrop_jax.models import resnet
from conftest import REPO, cli_env

TOL = dict(rtol=2e-4, atol=2e-5)  # float32 sums in a different order across devices
UPDATE_TOL = 2e-3  # of the largest update in each tensor: gradients summed in another order


@pytest.fixture(scope="module")
def setup():
  if jax.device_count() < 8:
    pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8 before JAX starts")
  base = resnet.make_spec("cifar_resnet8", shortcut="avgpool")
  nets = steps.Nets(base, resnet.policy_spec(base))
  b, p = resnet.init(base, jax.random.key(0)), resnet.init(nets.policy, jax.random.key(1))
  params = {"resnet": b["params"], "policy": p["params"]}
  stats = {"resnet": b["batch_stats"], "policy": p["batch_stats"]}
  images = np.asarray(jax.random.randint(jax.random.key(2), (16, 32, 32, 3), 0, 256), np.uint8)
  labels = np.arange(16) % 10
  return nets, params, stats, images, labels


def _step(kind, nets, tx, options=steps.StepOptions()):
  """The step of ``kind``: "curriculum", "finetune" or "compact finetune"."""
  loss = steps.PolicyLoss(penalty=-5.0)
  if kind == "compact finetune":
    options = dataclasses.replace(options, finetune_passes="compact")
  if kind == "curriculum":
    return lambda s, x, y, key, k: steps.curriculum_step(nets, loss, tx, s, x, y, key, k, options)
  return lambda s, x, y, key, k: steps.finetune_step(nets, loss, tx, s, x, y, key,
                                                     options=options)


def _close(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), **TOL), a, b)


def _same_updates(new, reference, old):
  """Parameter updates agree to UPDATE_TOL of each tensor's largest update."""
  def check(n, r, o):
    delta, ref = np.asarray(n) - np.asarray(o), np.asarray(r) - np.asarray(o)
    assert np.abs(delta - ref).max() <= UPDATE_TOL * np.abs(ref).max() + 1e-7
  jax.tree.map(check, new, reference, old)


@pytest.mark.parametrize("kind", ["curriculum", "finetune", "compact finetune"])
def test_sharded_and_pmap_steps_equal_single_device(setup, kind):
  nets, params, stats, images, labels = setup
  tx = optax.sgd(0.5)  # linear in the gradients, so parameters compare gradients (Adam's first
  state = steps.create_state(params, stats, tx)  # step is sign(g): noise near g = 0 would flip)
  key, k = jax.random.key(7), jnp.int32(2)

  single, m_single = jax.jit(_step(kind, nets, tx))(state, images, labels, key, k)

  mesh = parallel.data_mesh()
  sharded_state = parallel.replicate(state, mesh)
  x, y = parallel.global_batch(mesh, len(images), images, labels)
  sharded, m_sharded = parallel.sharded_step(
      _step(kind, nets, tx, steps.StepOptions(mesh=mesh)), mesh, donate=False)(
          sharded_state, x, y, key, k)
  assert len(x.sharding.device_set) == 8

  pmapped_step = parallel.pmap_step(_step(kind, nets, tx, parallel.with_axis(steps.StepOptions())))
  stacked = parallel.stack_for_pmap(state, 8)
  pm, m_pm = pmapped_step(stacked, parallel.split_for_pmap(images, 8),
                          parallel.split_for_pmap(labels, 8), key, k)
  pm = jax.tree.map(lambda a: a[0], pm)
  m_pm = jax.tree.map(lambda a: a[0], m_pm)

  for other, metrics in ((sharded, m_sharded), (pm, m_pm)):
    _same_updates(other.params, single.params, params)
    _close(other.batch_stats, single.batch_stats)
    _close(metrics, m_single)
  # The step really moved the parameters it trains.
  assert not np.allclose(single.params["policy"]["fc"]["kernel"], params["policy"]["fc"]["kernel"])


def _collectives(compiled_hlo: str) -> collections.Counter:
  return collections.Counter(re.findall(
      r" (all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)(?:-start)?\(",
      compiled_hlo))


def test_sharded_compact_curriculum_passes_move_no_rows_between_devices(setup):
  """Compact passes gather each block's kept rows; over a sharded batch they run per device
  (shard_map), so the step communicates exactly what the masked step does: the gradient and
  metric means. Under plain GSPMD they moved rows between devices (all-to-all, permutes)."""
  nets, params, stats, images, labels = setup
  tx = optax.sgd(0.5)
  mesh = parallel.data_mesh()
  state = parallel.replicate(steps.create_state(params, stats, tx), mesh)
  x, y = parallel.global_batch(mesh, len(images), images, labels)
  compiled = {}
  for passes in steps.CURRICULUM_PASSES:
    step = _step("curriculum", nets, tx, steps.StepOptions(curriculum_passes=passes, mesh=mesh))
    compiled[passes] = _collectives(parallel.sharded_step(step, mesh, donate=False).lower(
        state, x, y, jax.random.key(0), jnp.int32(2)).compile().as_text())
  assert compiled["compact"] == compiled["masked"] and compiled["masked"]["all-reduce"] > 0


def test_uneven_global_batch_is_a_clear_error(setup):
  with pytest.raises(BlockDropError, match="does not split over 8 devices"):
    parallel.check_divisible(12, parallel.data_mesh().size)
  with pytest.raises(BlockDropError, match="does not split over 8 devices"):
    parallel.split_for_pmap(np.zeros((12, 3)), 8)


def _train(workdir, devices, *overrides):
  return subprocess.run([sys.executable, os.path.join(REPO, "train.py"), "--config",
                         "scratch_r20_subset" + ":smoke",
                         "--workdir", str(workdir), "--noprogress", *overrides],
                        cwd=REPO, capture_output=True, text=True, timeout=600,
                        env=cli_env(devices))


def test_batch_that_does_not_split_over_devices_in_train(tmp_path, shared_data):
  proc = _train(tmp_path, 8, "--config.pretrain.batch_size=12")
  assert proc.returncode == 2 and "does not split over 8 devices" in proc.stderr, proc.stderr
