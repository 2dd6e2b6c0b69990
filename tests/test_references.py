"""The references a run is set against: the static subset search equals a plain search written
out here, on real images and pretrained weights; the validation split holds out the same images
for a seed."""

import jax
import numpy as np
import optax
import pytest

from blockdrop_jax import convert, data, references, steps
from blockdrop_jax.errors import BlockDropError

from conftest import akamaster_file


@pytest.fixture(scope="module")
def resnet20(shared_data, test_records):
  spec, variables = convert.load_pretrained(akamaster_file(shared_data, 20))
  dataset = data.load_dataset(test_records).head(48)
  return (steps.Nets(spec), {"resnet": variables["params"]},
          {"resnet": variables["batch_stats"]}, dataset)


def test_greedy_elimination_equals_dropping_the_cheapest_block_each_round(resnet20):
  nets, params, stats, dataset = resnet20
  K = nets.resnet.num_blocks
  subsets = references.greedy_elimination(nets, params, stats, dataset, smallest=5, batch_size=96)
  assert sorted(subsets) == list(range(5, K + 1))
  evaluate = jax.jit(steps.resnet_eval, static_argnums=0)
  keep = np.ones(K, np.float32)
  for k in range(K - 1, 4, -1):
    losses = {}
    for t in np.flatnonzero(keep):
      candidate = keep.copy()
      candidate[t] = 0
      logits = evaluate(nets, params, stats, dataset.images,
                        np.broadcast_to(candidate, (len(dataset), K)))
      losses[t] = float(optax.softmax_cross_entropy_with_integer_labels(
          logits, dataset.labels).mean())
    keep[min(losses, key=losses.get)] = 0
    np.testing.assert_array_equal(subsets[k], keep, err_msg=f"k = {k}")


def test_references_report_fixed_policies_at_the_mean_blocks(resnet20):
  nets, params, stats, dataset = resnet20
  refs = references.references(nets, params, stats, dataset, 6.6, selection=dataset.head(24),
                               mode=False, batch_size=48)
  assert list(refs) == ["full", "first7", "random7", "static7"]
  for name in ("first7", "random7", "static7"):
    assert refs[name]["blocks_mean"] == 7 and refs[name]["blocks_std"] == 0
  assert refs["static7"]["unique_policies"] == 1 and len(refs["static7"]["blocks"]) == 7
  assert refs["full"]["flops_mean"] > refs["static7"]["flops_mean"]


def test_most_frequent_policy():
  policies = np.array([[1, 0, 1], [1, 1, 1], [1, 0, 1], [0, 0, 1]], np.float32)
  np.testing.assert_array_equal(references.most_frequent_policy(policies), [1, 0, 1])


def test_validation_split_holds_out_images_by_seed(train_records):
  train = data.load_dataset(train_records, "train").head(400)
  rest, validation = data.split_validation(train, 100, seed=3)
  assert len(rest) == 300 and len(validation) == 100
  images = {image.tobytes() for image in train.images}
  assert {i.tobytes() for i in rest.images} | {i.tobytes() for i in validation.images} == images
  assert not {i.tobytes() for i in rest.images} & {i.tobytes() for i in validation.images}
  again = data.split_validation(train, 100, seed=3)[1]
  np.testing.assert_array_equal(again.labels, validation.labels)
  other = data.split_validation(train, 100, seed=4)[1]
  assert not np.array_equal(other.images, validation.images)
  assert data.split_validation(train, 0, seed=3) == (train, None)
  with pytest.raises(BlockDropError, match="config.data.validation = 400"):
    data.split_validation(train, 400, seed=3)
