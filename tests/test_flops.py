import numpy as np
import pytest

from blockdrop_jax import flops
from blockdrop_jax.models import resnet


@pytest.mark.parametrize("name,classes,published", [
    ("cifar_resnet32", 10, "1.377e8"), ("cifar_resnet110", 10, "5.058e8"),
    ("imagenet_resnet101", 1000, "1.560e10"), ("cifar_resnet8", 15, "2.45e7")])
def test_published_full_flops(name, classes, published):
  """Equal to every digit the paper's README prints."""
  total = flops.flops_table(resnet.make_spec(name, num_classes=classes)).full
  decimals = len(published.split("e")[0].split(".")[1])
  assert f"{total:.{decimals}e}".replace("e+0", "e").replace("e+", "e") == published


def test_dropped_blocks_cost_nothing_but_projections_always_run():
  spec = resnet.make_spec("imagenet_resnet50")
  table = flops.flops_table(spec)
  none = table.under(np.zeros((1, 16)))[0]
  assert none == table.fixed > flops.flops_table(resnet.make_spec("imagenet_resnet50", shortcut="A")).fixed
  one = np.zeros((1, 16)); one[0, 5] = 1
  assert table.under(one)[0] == table.fixed + table.per_block[5]
  assert table.under(np.ones((1, 16)))[0] == table.full


def test_policy_network_is_counted():
  base = resnet.make_spec("cifar_resnet32")
  pol = resnet.policy_spec(base)
  total = flops.policy_flops(base, pol, np.ones((2, 15)))
  np.testing.assert_allclose(total, flops.flops_table(base).full + flops.flops_table(pol).full)
