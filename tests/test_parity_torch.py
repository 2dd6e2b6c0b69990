"""Cross-framework parity: our logits equal PyTorch's on real CIFAR-10 images."""

import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch_reference as ref  # noqa: E402
from blockdrop_jax import convert, data, torch_file  # noqa: E402
from blockdrop_jax.models import resnet  # noqa: E402
from conftest import akamaster_file  # noqa: E402

TOL = 1e-4


def _ours(spec, variables, images, policy=None):
  return np.asarray(resnet.apply(spec, variables, data.to_unit_float(images), policy))


def _theirs(model, images, spec, policy=None):
  with torch.no_grad():
    x = ref.to_nchw(images, spec.input_mean, spec.input_std)
    return model(x, None if policy is None else torch.from_numpy(policy)).numpy()


@pytest.fixture(scope="module")
def images(test_records):
  return data.read_cifar_records(test_records)[0][:64]


@pytest.fixture(scope="module")
def akamaster32(shared_data):
  state = torch_file.load_torch_file(akamaster_file(shared_data, 32))
  model = ref.AkamasterResNet(5)
  model.load_state_dict({k.removeprefix("module."): torch.from_numpy(v) for k, v in state.items()})
  spec, variables = convert.load_pretrained(akamaster_file(shared_data, 32))
  return model.eval(), spec, variables


def test_akamaster_plain_logits_match(akamaster32, images):
  model, spec, variables = akamaster32
  np.testing.assert_allclose(_ours(spec, variables, images), _theirs(model, images, spec), atol=TOL)


def test_akamaster_random_policy_logits_match(akamaster32, images):
  model, spec, variables = akamaster32
  policy = np.random.default_rng(0).integers(0, 2, (len(images), spec.num_blocks)).astype(np.float32)
  ours = _ours(spec, variables, images, policy)
  np.testing.assert_allclose(ours, _theirs(model, images, spec, policy), atol=TOL)
  assert np.abs(ours - _ours(spec, variables, images)).max() > 1e-2  # the policy really gates


def test_all_ones_policy_equals_no_policy(akamaster32, images):
  _, spec, variables = akamaster32
  ones = np.ones((len(images), spec.num_blocks), np.float32)
  np.testing.assert_array_equal(_ours(spec, variables, images, ones), _ours(spec, variables, images))


def _state(model):
  return {k: v.numpy() for k, v in model.state_dict().items()}


def test_blockdrop_flatresnet_avgpool_layout(images):
  torch.manual_seed(0)
  model = ref.randomise_batch_norm(ref.FlatResNet(ref.BasicBlock, [3, 3, 3], (16, 32, 64), (1, 2, 2), 10))
  spec, variables = convert.load_pretrained_state(_state(model))
  assert (spec.name, spec.shortcut, spec.input_std) == ("cifar_resnet20", "avgpool", (1.0, 1.0, 1.0))
  policy = np.random.default_rng(1).integers(0, 2, (len(images), 9)).astype(np.float32)
  np.testing.assert_allclose(_ours(spec, variables, images, policy),
                             _theirs(model, images, spec, policy), atol=TOL)


def test_blockdrop_policy32_layout_with_value_head(images):
  torch.manual_seed(0)
  model = ref.randomise_batch_norm(ref.Policy32(num_blocks=15))
  spec, variables = convert.load_pretrained_state(_state(model))
  assert (spec.name, spec.num_classes, spec.shortcut) == ("cifar_resnet8", 15, "avgpool")
  with torch.no_grad():
    theirs = model(ref.to_nchw(images)).numpy()
  np.testing.assert_allclose(_ours(spec, variables, images), theirs, atol=TOL)


@pytest.mark.parametrize("layout", ["blockdrop", "torchvision"])
def test_imagenet_bottleneck_layouts(layout):
  torch.manual_seed(0)
  model = ref.randomise_batch_norm(
      ref.FlatResNet(ref.Bottleneck, [3, 4, 6, 3], (64, 128, 256, 512), (1, 2, 2, 2), 7, imagenet=True))
  state = _state(model)
  if layout == "torchvision":
    state = {re.sub(r"^ds\.(\d+)\.", lambda m: f"layer{int(m.group(1)) + 1}.0.downsample.", k): v
             for k, v in state.items()}
    state = {re.sub(r"^blocks\.(\d+)\.", lambda m: f"layer{int(m.group(1)) + 1}.", k): v
             for k, v in state.items()}
  spec, variables = convert.load_pretrained_state(state)
  assert (spec.name, spec.shortcut, spec.num_classes) == ("imagenet_resnet50", "projection", 7)
  images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
  policy = np.array([[1] * 16, [1, 0] * 8], np.float32)
  np.testing.assert_allclose(_ours(spec, variables, images, policy),
                             _theirs(model, images, spec, policy), atol=TOL)
