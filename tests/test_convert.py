import argparse
import fractions
import os

import jax
import numpy as np
import pytest

from blockdrop_jax import BlockDropError, convert, safetensors_file, torch_file, torch_layout
from blockdrop_jax.models import resnet
from conftest import akamaster_file


def _random_variables(spec, seed=0):
  variables = resnet.init(spec, jax.random.key(seed))
  leaves, tree = jax.tree.flatten(variables)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(tree, [rng.random(x.shape, np.float32) + 0.5 for x in leaves])


@pytest.mark.parametrize("name,shortcut", [("cifar_resnet20", "avgpool"), ("cifar_resnet20", "projection"),
                                           ("imagenet_resnet18", "projection")])
def test_safetensors_round_trip_is_exact(tmp_path, name, shortcut):
  spec = resnet.make_spec(name, shortcut=shortcut, input_mean=(0.5, 0.5, 0.5))
  variables = _random_variables(spec)
  path = str(tmp_path / "w.safetensors")
  safetensors_file.save_safetensors(path, variables, spec)
  spec2, variables2 = convert.load_pretrained(path)
  assert spec2 == spec
  jax.tree.map(np.testing.assert_array_equal, variables2, jax.tree.map(np.asarray, variables))


def test_export_uses_pytorch_layout_names_and_shapes():
  spec = resnet.make_spec("cifar_resnet20", shortcut="projection")
  state = torch_layout.to_torch_state_dict(_random_variables(spec), spec)
  assert state["conv1.weight"].shape == (16, 3, 3, 3)
  assert state["blocks.1.0.conv1.weight"].shape == (32, 16, 3, 3)
  assert state["ds.1.0.weight"].shape == (32, 16, 1, 1)
  assert state["fc.weight"].shape == (10, 64)


def _akamaster_state(shared_data):
  return torch_file.load_torch_file(akamaster_file(shared_data, 20))


def test_missing_unexpected_and_misshaped_keys_are_listed(shared_data):
  state = _akamaster_state(shared_data)
  del state["module.layer1.0.conv1.weight"]
  state["module.extra.weight"] = np.zeros(3)
  state["module.linear.weight"] = np.zeros((11, 64))
  spec = resnet.make_spec("cifar_resnet20")
  with pytest.raises(BlockDropError) as err:
    torch_layout.from_torch_state_dict(state, spec)
  message = str(err.value)
  assert "1 missing: layer1.0.conv1.weight" in message
  assert "1 unexpected: extra.weight" in message
  assert "linear.weight: file (64, 11) vs model (64, 10)" in message


def test_depth_mismatch_is_refused(shared_data):
  with pytest.raises(BlockDropError, match="does not match cifar_resnet32.*unexpected|missing"):
    convert.load_pretrained(akamaster_file(shared_data, 20), arch="cifar_resnet32")


def test_architecture_is_inferred_from_keys(shared_data):
  for depth in (20, 56):
    spec, layout = torch_layout.infer_spec(torch_file.load_torch_file(akamaster_file(shared_data, depth)))
    assert (spec.name, spec.shortcut, layout) == (f"cifar_resnet{depth}", "A", "akamaster")
    assert spec.input_mean == resnet.IMAGENET_MEAN


class Payload:
  def __reduce__(self):
    return (os.system, ("echo owned",))


@pytest.mark.parametrize("payload", [Payload(), fractions.Fraction(1, 3)],
                         ids=["a function call", "a class not on the list"])
def test_files_needing_arbitrary_unpickling_are_refused(tmp_path, payload):
  """Only tensors, containers and the allow-list (the Namespace of felixgwu's files) load."""
  torch = pytest.importorskip("torch")
  path = str(tmp_path / "evil.pt")
  torch.save({"state_dict": {"w": torch.zeros(1)}, "args": argparse.Namespace(lr=0.1),
              "payload": payload}, path)
  with pytest.raises(BlockDropError, match="refusing to load .*weights_only=True"):
    torch_file.load_torch_file(path)


def test_missing_checkpoint_file():
  with pytest.raises(BlockDropError, match="checkpoint file not found"):
    convert.load_pretrained("/nonexistent/resnet.th")
