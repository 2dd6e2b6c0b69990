"""The original release's own files, written as its code wrote them, load and evaluate as PyTorch
runs them: a felixgwu base (``pk_E_*.t7``), a finetuned BlockDrop checkpoint (``agent`` +
``resnet``) and a curriculum one (``agent`` alone, with ``--base``)."""

import argparse
import json
import os

import numpy as np
import pytest

from blockdrop_jax import BlockDropError, convert, data, original_checkpoint
from conftest import first_records
from test_evaluate_cli import _one_line_error, evaluate_in_process, run_evaluate

torch = pytest.importorskip("torch")
import torch_reference as ref  # noqa: E402

K = 15  # ResNet-32: the same layout as the R110 files, at a third of the cost
IMAGES = 250  # the first test images: every comparison is image for image


def _calibrate(model, images):
  """Random weights with BatchNorm statistics of real images, so activations are well scaled."""
  for m in model.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
      m.momentum = None  # a cumulative average over the calibration batches
  model.train()
  with torch.no_grad():
    for start in range(0, len(images), 250):
      model(ref.to_nchw(images[start:start + 250]))
  return model.eval()


def _felixgwu_keys(state_dict):
  """FlatResNet's ``blocks.{s}.{b}`` as felixgwu's ``layer{s+1}.{b}``, DataParallel-prefixed."""
  out = {}
  for key, value in state_dict.items():
    if key.startswith("blocks."):
      _, segment, rest = key.split(".", 2)
      key = f"layer{int(segment) + 1}.{rest}"
    out[f"module.{key}"] = value
  return out


@pytest.fixture(scope="module")
def first_test_images(tmp_path_factory, test_records):
  return first_records(test_records, IMAGES, tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def original_files(tmp_path_factory, shared_data, first_test_images):
  """The files, and what PyTorch computes from them on the test images: per-image
  predictions of the base, and greedy policies and predictions of BlockDrop, as test.py does."""
  folder = tmp_path_factory.mktemp("original")
  train_images, _ = data.read_cifar_records(
      os.path.join(shared_data, "cifar10", "subset", "data_batch_1_first4000.bin"))
  torch.manual_seed(0)
  rnet = _calibrate(ref.FlatResNet(ref.BasicBlock, [5, 5, 5], (16, 32, 64), (1, 2, 2), 10),
                    train_images[:250])
  agent = ref.Policy32(K)
  agent.features = _calibrate(agent.features, train_images[:250])
  with torch.no_grad():  # logits far from 0, so that no greedy decision sits on the threshold
    agent.logit.weight.mul_(20.0)
  base = folder / "pk_E_130_A_0.932.t7"
  torch.save({"epoch": 130, "arch": "resnet", "best_prec1": 93.2,
              "state_dict": _felixgwu_keys(rnet.state_dict()),
              "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "momentum": 0.9}]},
              "args": argparse.Namespace(arch="resnet", depth=32, lr=0.1, data="cifar10+")},
             base)
  finetuned = folder / "ckpt_E_2000_A_0.936_R_1.95E-01_S_16.93_#_469.t7"
  torch.save({"agent": agent.state_dict(), "resnet": rnet.state_dict(), "epoch": 2000,
              "reward": torch.tensor(0.195), "acc": torch.tensor(0.936)}, finetuned)
  curriculum = folder / "ckpt_E_5300_A_0.754_R_2.22E-01_S_20.10_#_7787.t7"
  torch.save({"agent": agent.state_dict(), "epoch": 5300, "reward": 0.222, "acc": 0.754},
             curriculum)

  images, labels = data.read_cifar_records(first_test_images)
  x = ref.to_nchw(images)  # the original's CIFAR nets take raw [0, 1] pixels
  with torch.no_grad():
    full = rnet(x).argmax(1).numpy()
    policies = (torch.sigmoid(agent(x)) >= 0.5).float()
    predictions = rnet(x, policies).argmax(1).numpy()
  return dict(base=str(base), finetuned=str(finetuned), curriculum=str(curriculum), labels=labels,
              full=full, policies=policies.numpy().astype(np.int8), predictions=predictions,
              report=_test_py_report(rnet, agent, policies, predictions == labels))


def _test_py_report(rnet, agent, policies, matches) -> str:
  """The lines the original test.py prints: FLOPs counted per convolution and linear layer that
  runs (its FConv2d/FLinear, the policy network's value head included), block usage with
  torch's (unbiased) std, FLOPs with numpy's."""
  counts = {}

  def count(module, inputs, output):
    kernel = np.prod(module.kernel_size) if isinstance(module, torch.nn.Conv2d) else 1
    area = output.shape[-1] * output.shape[-2] if output.ndim == 4 else 1
    cin = module.in_channels if isinstance(module, torch.nn.Conv2d) else module.in_features
    cout = module.out_channels if isinstance(module, torch.nn.Conv2d) else module.out_features
    counts[module] = 2 * cin * cout * kernel * area

  hooks = [m.register_forward_hook(count) for net in (rnet, agent) for m in net.modules()
           if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
  with torch.no_grad():
    rnet(torch.zeros(1, 3, 32, 32))
    agent.vnet(agent.features.features(torch.zeros(1, 3, 32, 32)))
    agent(torch.zeros(1, 3, 32, 32))
  for hook in hooks:
    hook.remove()
  fixed = sum(counts[m] for m in agent.modules() if m in counts) + counts[rnet.conv1] + counts[rnet.fc]
  per_block = [sum(counts[m] for m in block.modules() if m in counts)
               for segment in rnet.blocks for block in segment]
  ops = fixed + policies.numpy() @ np.asarray(per_block, np.float64)
  usage = policies.sum(1)
  unique = len({"".join(map(str, p)) for p in policies.numpy().astype(int).tolist()})
  return "\n".join([f"Accuracy: {np.mean(matches):.3f}",
                    f"Block Usage: {usage.mean().item():.3f} \u00b1 {usage.std().item():.3f}",
                    f"FLOPs/img: {np.mean(ops):.2E} \u00b1 {np.std(ops):.2E}",
                    f"Unique Policies: {unique}"])


def test_felixgwu_base_evaluates_as_pytorch(original_files, first_test_images, tmp_path):
  out = tmp_path / "base.json"
  assert evaluate_in_process("--checkpoint", original_files["base"], "--data", first_test_images,
                             "--json", str(out), "--cross_check") == 0
  result = json.loads(out.read_text())
  assert (result["arch"], result["shortcut"]) == ("cifar_resnet32", "avgpool")
  np.testing.assert_array_equal(result["predictions"], original_files["full"])
  # The library's own PyTorch definition, run on the file's tensors, agrees image for image.
  assert result["cross_check"]["predictions_agree"] == IMAGES
  assert result["cross_check"]["max_logit_difference"] < 1e-3


@pytest.mark.parametrize("which", ["finetuned", "curriculum"])
def test_blockdrop_checkpoint_evaluates_as_test_py(original_files, first_test_images, tmp_path,
                                                   capsys, which):
  out = tmp_path / f"{which}.json"
  base = ("--base", original_files["base"]) if which == "curriculum" else ()
  cross_check = ("--cross_check",) if which == "finetuned" else ()
  assert evaluate_in_process("--checkpoint", original_files[which], *base, "--data",
                             first_test_images, "--mode", "masked", "--json", str(out),
                             *cross_check) == 0
  result = json.loads(out.read_text())
  np.testing.assert_array_equal(result["policies"], original_files["policies"])
  np.testing.assert_array_equal(result["predictions"], original_files["predictions"])
  printed = capsys.readouterr().out
  assert original_files["report"] in printed
  if cross_check:
    assert (f"Cross-check with PyTorch: predictions {IMAGES}/{IMAGES}, greedy policies "
            f"{IMAGES}/{IMAGES} agree" in printed)


def test_curriculum_checkpoint_without_its_base_is_one_line(original_files, first_test_images):
  _one_line_error(run_evaluate("--checkpoint", original_files["curriculum"], "--data",
                               first_test_images), "holds a policy network alone")


def test_normalisation_follows_the_file_and_can_be_overridden(original_files):
  spec, _ = convert.load_pretrained(original_files["base"])
  assert (spec.input_mean, spec.input_std) == ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
  spec, _ = convert.load_pretrained(original_files["base"], input_mean=(0.49, 0.48, 0.45),
                                    input_std=(0.25, 0.24, 0.26))
  assert (spec.input_mean, spec.input_std) == ((0.49, 0.48, 0.45), (0.25, 0.24, 0.26))
  with pytest.raises(BlockDropError, match="input_std needs 3 numbers"):
    convert.load_pretrained(original_files["base"], input_std=(0.25,))


def test_training_continues_from_the_originals_curriculum_checkpoint(original_files):
  """train.py --config.init_from=FILE (with the base in config.base.checkpoint): the run starts
  from the original's policy network and ResNet."""
  import jax
  from blockdrop_jax import configs, run_inputs
  config = configs.load("r110_c10", [
      "--config.stages=finetune", f"--config.init_from={original_files['curriculum']}",
      f"--config.base.checkpoint={original_files['base']}"])
  nets, params, stats = run_inputs.initial_variables(config, jax.random.key(0))
  expected = original_checkpoint.load_blockdrop_checkpoint(original_files["finetuned"])
  assert (nets.resnet, nets.policy) == (expected[0].resnet, expected[0].policy)
  jax.tree.map(np.testing.assert_array_equal, (params, stats), expected[1:])
