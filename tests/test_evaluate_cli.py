"""evaluate.py as a user runs it: exact accuracies on the lossless subset, clear errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, akamaster_file

EXPECTED_CORRECT = {20: 915, 32: 928, 44: 933, 56: 926}


def run_evaluate(*args):
  return subprocess.run([sys.executable, os.path.join(REPO, "evaluate.py"), *args], cwd=REPO,
                        capture_output=True, text=True, timeout=600)


def evaluate_in_process(*args) -> int:
  """evaluate.py's main() after its flags are parsed from ``args``, as the command does."""
  from blockdrop_jax.commands import evaluate
  from absl import flags
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["evaluate.py", *args])
  return evaluate.main(["evaluate.py"])


# The smallest and the largest (ResNet-32 through TFDS is tests/test_tfds.py's): every depth loads
# through the same code; docs/results.md, section 1, has all four.
@pytest.mark.parametrize("depth", [20, 56])
def test_akamaster_accuracy_and_predictions_match_pytorch(tmp_path, shared_data, test_records, depth,
                                                         capsys):
  torch = pytest.importorskip("torch")
  import torch_reference as ref
  from blockdrop_jax import data, torch_file

  out = tmp_path / "out.json"
  # In-process (the same main() the command runs; the error tests below run the command itself).
  assert evaluate_in_process("--checkpoint", akamaster_file(shared_data, depth), "--data",
                             test_records, "--json", str(out)) == 0
  result = json.loads(out.read_text())
  assert result["correct"] == EXPECTED_CORRECT[depth] and result["n"] == 1000
  assert f"({EXPECTED_CORRECT[depth]}/1000)" in capsys.readouterr().out

  model = ref.AkamasterResNet((depth - 2) // 6)
  state = torch_file.load_torch_file(akamaster_file(shared_data, depth))
  model.load_state_dict({k.removeprefix("module."): torch.from_numpy(v) for k, v in state.items()})
  images, _ = data.read_cifar_records(test_records)
  with torch.no_grad():
    theirs = model.eval()(ref.to_nchw(images, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))).argmax(1)
  np.testing.assert_array_equal(result["predictions"], theirs.numpy())


def _one_line_error(proc, pattern):
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error:") and pattern in lines[0], proc.stderr


def test_missing_checkpoint(test_records):
  _one_line_error(run_evaluate("--checkpoint", "nope.th", "--data", test_records), "not found: nope.th")


def test_truncated_data_file(tmp_path, shared_data, test_records):
  bad = tmp_path / "bad.bin"
  bad.write_bytes(open(test_records, "rb").read()[:5000])
  _one_line_error(run_evaluate("--checkpoint", akamaster_file(shared_data, 20), "--data", str(bad)),
                  "not a whole number of 3073-byte")


def test_depth_mismatch(shared_data, test_records):
  _one_line_error(run_evaluate("--checkpoint", akamaster_file(shared_data, 20), "--data", test_records,
                               "--arch", "cifar_resnet32"), "does not match cifar_resnet32")


def test_unknown_architecture(shared_data, test_records):
  _one_line_error(run_evaluate("--checkpoint", akamaster_file(shared_data, 20), "--data", test_records,
                               "--arch", "resnet33"), "unknown architecture 'resnet33'")


@pytest.mark.parametrize("args, message", [
    (("--batch_size", "0"), "--batch_size=0: 0 is not a positive integer"),
    (("--batchsize", "4"), "Unknown command line flag 'batchsize'"),
    (("--mode", "fast"), "value should be one of"),
    (("--input_mean", "0.5,x"), "--input_mean: expected numbers separated by commas")])
def test_bad_flags_are_one_line(test_records, args, message, capsys):
  """As the command parses them (cli.run's parser, then main), in-process."""
  from blockdrop_jax.commands import evaluate
  from absl import flags
  from blockdrop_jax import cli
  flags.FLAGS.unparse_flags()
  with pytest.raises(SystemExit) as exit_info:
    argv = cli._parse(["evaluate.py", "--checkpoint", "x.th", "--data", test_records, *args])
    cli.guarded(evaluate.main)(argv)
  assert exit_info.value.code == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], lines


def test_positional_arguments_are_refused(test_records):
  _one_line_error(run_evaluate("--checkpoint", "x.th", "--data", test_records, "extra"),
                  "unexpected arguments extra")
