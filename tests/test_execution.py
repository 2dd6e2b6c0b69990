"""Every execution mode gives the masked outputs, on real images and pretrained weights."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blockdrop_jax import compact, convert, data, execution, steps
from blockdrop_jax.models import resnet
from conftest import akamaster_file

TOL = 1e-4


@pytest.fixture(scope="module")
def net(shared_data, test_records):
  spec, variables = convert.load_pretrained(akamaster_file(shared_data, 20))
  images = np.asarray(data.to_unit_float(data.read_cifar_records(test_records)[0][:48]))
  return spec, variables, images


def _policies(n, K, seed=0, keep=0.4, unique=None):
  rng = np.random.default_rng(seed)
  if unique is None:
    return (rng.random((n, K)) < keep).astype(np.float32)
  pool = (rng.random((unique, K)) < keep).astype(np.float32)
  return pool[rng.integers(0, unique, n)]


_masked = jax.jit(resnet.apply, static_argnums=0)
_compact = jax.jit(compact.compact_apply, static_argnums=0)


def masked(spec, variables, images, policy):
  return _masked(spec, variables, images, policy)


def test_looped_skip_equals_masked(net):
  """Runs of blocks as loops over stacked weights: per-example policies, a block nobody runs, and
  a whole run nobody runs (its loop runs zero times)."""
  spec, variables, images = net
  assert execution.block_runs(spec) == [(0, 3), (3, 1), (4, 2), (6, 1), (7, 2)]
  assert execution.block_runs(resnet.make_spec("cifar_resnet110")) == [
      (0, 18), (18, 1), (19, 17), (36, 1), (37, 17)]
  assert execution.block_runs(resnet.make_spec("imagenet_resnet50")) == [
      (0, 1), (1, 2), (3, 1), (4, 3), (7, 1), (8, 5), (13, 1), (14, 2)]
  stacked = execution.stack_runs(spec, variables)
  assert {"block0", "block4", "block7"} <= set(stacked["params"]) and "block1" not in stacked["params"]
  policy = _policies(len(images), spec.num_blocks, seed=5)
  policy[:, 1] = 0.0
  policy[:, 4:6] = 0.0
  looped = jax.jit(execution.looped_skip_apply, static_argnums=0)
  np.testing.assert_allclose(looped(spec, stacked, images, policy),
                             masked(spec, variables, images, policy), atol=TOL)


def test_packed_weights_unpack_exactly(net):
  """Runner and GroupedExecutor pass packed weights: far fewer arrays per call, the same values."""
  spec, variables, _ = net
  packed, packing = execution.pack(variables)
  assert len(jax.tree.leaves(packed)) <= len(jax.tree.leaves(variables)) // 4
  chex.assert_trees_all_equal(jax.jit(execution.unpack, static_argnums=1)(packed, packing),
                              variables)


def test_runner_equals_the_plain_network(net):
  """Every Runner mode at batch 16 (with a block no image runs: skipped for the whole batch) and
  at batch 1, where batch_skip runs exactly that image's blocks."""
  spec, variables, images = net
  policy = _policies(16, spec.num_blocks, seed=2)
  policy[:, 4] = 0.0
  np.testing.assert_allclose(execution.Runner("masked", spec, variables)(images[:16]),
                             masked(spec, variables, images[:16], None), atol=TOL)
  expected = masked(spec, variables, images[:16], policy)
  for mode in execution.RUNNER_MODES:
    runner = execution.Runner(mode, spec, variables)
    np.testing.assert_allclose(runner(images[:16], policy), expected, atol=TOL, err_msg=mode)
    if mode in ("batch_skip", "looped"):  # the batch-1 modes
      single = np.concatenate([runner(images[i:i + 1], policy[i:i + 1]) for i in range(4)])
      np.testing.assert_allclose(single, expected[:4], atol=TOL, err_msg=f"{mode} at batch 1")
  with pytest.raises(ValueError, match="unknown execution mode 'grouped' for a Runner"):
    execution.Runner("grouped", spec, variables)


@pytest.mark.skipif(jax.config.jax_use_simplified_jaxpr_constants,
                    reason="this JAX passes closed-over arrays to the program as arguments")
def test_runner_compiles_its_weights_into_the_program(net):
  """A Runner's program takes only the images and the policy: its weights are constants of the
  program, which saves about 0.1 ms per batch_skip call (docs/results.md)."""
  spec, variables, images = net
  policy = _policies(1, spec.num_blocks, seed=3)
  for mode in ("masked", "batch_skip"):
    program = execution.Runner(mode, spec, variables)._apply.lower(images[:1], policy).as_text()
    arguments = re.search(r"func\.func public @main\((.*?)\) ->", program).group(1)
    assert arguments.count("%arg") == 2, (mode, arguments[:300])


def test_grouped_equals_masked_with_one_compilation_and_one_packing(net, monkeypatch):
  """2 programs in flight from threads; one compilation for any policies and any number of images
  up to the same power of 2; the weights packed once, when the executor is built (packing
  ResNet-110's costs 8 ms)."""
  spec, variables, images = net
  packed = []
  pack = execution.pack
  monkeypatch.setattr(execution, "pack", lambda tree: packed.append(tree) or pack(tree))
  executor = execution.GroupedExecutor(spec, variables)
  assert executor.buckets == (1, 2, 4, 8, 16)
  # 48 images: groups of up to 48 cut into batches of at most 16; 33 images: the same power of 2.
  for seed, (unique, n) in enumerate(((3, 48), (7, 48), (None, 48), (5, 33), (1, 48))):
    policy = _policies(n, spec.num_blocks, seed=seed, unique=unique)
    np.testing.assert_allclose(executor(images[:n], policy),
                               masked(spec, variables, images[:n], policy),
                               atol=TOL, err_msg=f"unique policies {unique}, {n} images")
  assert executor.trace_count == 1 and len(packed) == 1
  with pytest.raises(ValueError, match="workers must be at least 1"):
    execution.GroupedExecutor(spec, variables, workers=0)


def test_share_out_balances_the_work():
  shares = execution.share_out([16, 1, 8, 4, 16, 2, 8, 1], 2)
  assert sorted(i for share in shares for i in share) == list(range(8))
  assert [sum([16, 1, 8, 4, 16, 2, 8, 1][i] for i in share) for share in shares] == [28, 28]
  assert execution.share_out([5.0], 3) == [[0], [], []]


def test_grouping_and_bucketing():
  policies = np.array([[1, 0], [0, 1], [1, 0], [1, 0], [0, 1]], np.float32)
  groups = execution.group_by_policy(policies)
  assert [g.tolist() for g in groups] == [[0, 2, 3], [1, 4]]
  plan = execution.plan_batches([np.arange(11), np.arange(11, 14)], (1, 2, 4, 8))
  assert [len(chunk) for chunk in plan] == [8, 2, 1, 2, 1]
  assert np.concatenate(plan).tolist() == list(range(14))
  assert execution.bucket_sizes(256, growth=4) == (1, 4, 16, 64, 256)
  assert execution.bucket_sizes(250, growth=2)[-2:] == (128, 250)


def test_compact_equals_masked_with_one_compilation(net):
  spec, variables, images = net
  compacted = jax.jit(compact.compact_apply, static_argnums=0)
  for seed, keep in enumerate((0.0, 0.3, 0.7, 1.0)):  # every switch branch, none to all rows
    policy = _policies(len(images), spec.num_blocks, seed=seed, keep=keep)
    np.testing.assert_allclose(compacted(spec, variables, images, policy),
                               masked(spec, variables, images, policy), atol=TOL)
  assert compacted._cache_size() == 1
  odd = images[:37]  # not a multiple of the chunk: padded with dropped rows
  policy = _policies(len(odd), spec.num_blocks, seed=5)
  np.testing.assert_allclose(compacted(spec, variables, odd, policy),
                             masked(spec, variables, odd, policy), atol=TOL)


def test_compact_covers_every_remainder_of_a_chunk(net):
  """Kept rows per block from none to all of 48: exact chunks of 16, a remainder of at most 8
  (one half chunk) and of more than 8 (one more full chunk), at every block position."""
  spec, variables, images = net
  counts = np.array([0, 3, 8, 9, 13, 16, 19, 48, 25])[:spec.num_blocks]
  rng = np.random.default_rng(7)
  policy = np.zeros((len(images), spec.num_blocks), np.float32)
  for t, count in enumerate(counts):
    policy[rng.permutation(len(images))[:count], t] = 1.0
  np.testing.assert_allclose(_compact(spec, variables, images, policy),
                             masked(spec, variables, images, policy), atol=TOL)

def test_curriculum_pair_equals_two_masked_passes(net):
  spec, variables, images = net
  K = spec.num_blocks
  batch = 13  # the 26 rows of both passes are padded to 32, two chunks of 16
  greedy, sampled = _policies(batch, K, seed=2), _policies(batch, K, seed=3)
  pair = jax.jit(compact.curriculum_pair, static_argnums=0)
  for k in (0, 1, 4, K):  # k = 0: every block forced, the sampled rows copied before the head
    mask = np.arange(K) >= K - k
    g, s = np.where(mask, greedy, 1.0), np.where(mask, sampled, 1.0)
    ours = pair(spec, variables, images[:batch], g, s, K - k)
    for logits, policy in zip(ours, (g, s)):
      np.testing.assert_allclose(
          logits, masked(spec, variables, images[:batch], policy), atol=TOL)
  assert pair._cache_size() == 1


def test_curriculum_step_same_loss_and_gradients_with_compact_passes(net):
  spec, variables, images = net
  policy_spec = resnet.policy_spec(spec)
  pv = resnet.init(policy_spec, jax.random.key(0))
  params = {"resnet": variables["params"], "policy": pv["params"]}
  stats = {"resnet": variables["batch_stats"], "policy": pv["batch_stats"]}
  labels = jnp.arange(16) % 10
  results = []
  for passes in steps.CURRICULUM_PASSES:
    nets, options = steps.Nets(spec, policy_spec), steps.StepOptions(curriculum_passes=passes)
    fn = jax.value_and_grad(lambda p: steps.curriculum_loss(
        nets, steps.PolicyLoss(penalty=-5.0), p, stats, images[:16], labels, jax.random.key(1), 5,
        options=options), has_aux=True)
    results.append(jax.jit(fn)(params))
  (loss_a, (m_a, _)), g_a = results[0]
  (loss_b, (m_b, _)), g_b = results[1]
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5)
  for key in m_a:
    np.testing.assert_allclose(m_a[key], m_b[key], rtol=1e-5, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g_a["policy"],
               g_b["policy"])


def test_every_evaluation_mode_gives_the_same_report(net, test_records):
  from blockdrop_jax import evaluation
  spec, variables, _ = net
  policy_spec = resnet.policy_spec(spec)
  pv = resnet.init(policy_spec, jax.random.key(3))
  params = {"resnet": variables["params"], "policy": pv["params"]}
  stats = {"resnet": variables["batch_stats"], "policy": pv["batch_stats"]}
  images, labels = data.read_cifar_records(test_records)
  dataset = data.Dataset(images[:40], labels[:40], 10, "test")
  nets = steps.Nets(spec, policy_spec)
  reports = [evaluation.blockdrop_report(nets, params, stats, dataset, 16, progress=False, mode=m)
             for m in evaluation.EVAL_MODES]
  assert 0 < reports[0]["blocks_mean"] < spec.num_blocks  # some blocks dropped, not all
  # Grouped over windows of 16 images (40 = 16 + 16 + 8): the same report as one window.
  reports.append(evaluation.blockdrop_report(nets, params, stats, dataset, 16, progress=False,
                                             mode="grouped", grouped_window=16))
  assert [r["mode"] for r in reports] == ["compact", "compact", "grouped", "masked", "grouped"]
  for report in reports[1:]:
    assert report["policies"] == reports[0]["policies"]
    assert report["predictions"] == reports[0]["predictions"]
    np.testing.assert_allclose(report["confidence"], reports[0]["confidence"], atol=1e-4)
  with pytest.raises(ValueError, match="must be at least 1"):
    evaluation.blockdrop_report(nets, params, stats, dataset, 16, mode="grouped", grouped_window=0)


def test_modes_handle_projection_shortcuts():
  """ImageNet nets drop blocks onto a 1x1 projection shortcut (CIFAR ones onto option A)."""
  spec = resnet.make_spec("imagenet_resnet18", num_classes=5)  # blocks 0-1 loop in grouped
  variables = resnet.init(spec, jax.random.key(0), image_size=64)
  images = np.asarray(jax.random.uniform(jax.random.key(1), (4, 64, 64, 3)))
  policy = np.array([[1, 0, 0, 1, 1, 0, 0, 1], [0, 1, 0, 1, 1, 1, 0, 0],
                     [1, 1, 0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 0, 1, 0, 1]], np.float32)
  expected = masked(spec, variables, images, policy)
  np.testing.assert_allclose(execution.Runner("compact", spec, variables)(images, policy), expected,
                             atol=TOL, err_msg="compact")
  # Grouped runs the shape-changing blocks as batch_skip does (gated_block), the others looped.
  grouped = execution.GroupedExecutor(spec, variables, max_batch=1)  # 4 groups of 1
  np.testing.assert_allclose(grouped(images, policy), expected, atol=TOL, err_msg="grouped")


def test_auto_runs_compact_on_cpu_and_masked_where_compact_does_not_pay(net, test_records,
                                                                        monkeypatch):
  from blockdrop_jax import evaluation
  assert compact.compact_pays("cpu") and not compact.compact_pays("gpu")
  assert compact.resolve_auto("auto") == "compact"  # the tests run on CPU
  assert compact.resolve_auto("masked") == "masked"
  monkeypatch.setattr(compact, "compact_pays", lambda platform=None: False)  # as on a GPU
  assert compact.resolve_auto("auto") == "masked"
  spec, variables, _ = net
  policy_spec = resnet.policy_spec(spec)
  pv = resnet.init(policy_spec, jax.random.key(3))
  images, labels = data.read_cifar_records(test_records)
  report = evaluation.blockdrop_report(
      steps.Nets(spec, policy_spec), {"resnet": variables["params"], "policy": pv["params"]},
      {"resnet": variables["batch_stats"], "policy": pv["batch_stats"]},
      data.Dataset(images[:16], labels[:16], 10, "test"), 16, progress=False)
  assert report["mode"] == "masked"
