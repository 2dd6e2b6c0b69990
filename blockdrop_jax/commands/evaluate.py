"""Evaluate a ResNet or a BlockDrop run on a CIFAR split or an image folder.

  python evaluate.py --checkpoint resnet32.th --data ../shared/data/cifar10/subset/test_batch_first1000.bin
  python evaluate.py --checkpoint runs/r32 --data ... [--best] [--baselines] [--json out.json]

A PyTorch/safetensors file of a ResNet is evaluated as a full network (accuracy, per-image
predictions); a training workdir, or a checkpoint of the original's cl_training.py/finetune.py
(``--base`` gives the ResNet of a curriculum checkpoint, which holds the policy alone), as
BlockDrop, with the original test.py report (accuracy, block usage, FLOPs/img with the policy
network, unique policies) and per-image policies.
"""

from __future__ import annotations

import os

from absl import flags

from blockdrop_jax import cli
from blockdrop_jax.errors import BlockDropError
from blockdrop_jax.evaluation import EVAL_MODES

CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "a ResNet (PyTorch .th/.pt/.t7, our .safetensors export), a BlockDrop "
    "checkpoint of the original code (.t7 with 'agent'), or a training workdir")
BASE = flags.DEFINE_string(
    "base", None, "the ResNet of a BlockDrop checkpoint that holds the policy network alone")
INPUT_MEAN = flags.DEFINE_list(
    "input_mean", None, "R,G,B mean of the input normalisation, replacing the one inferred for "
    "the file (raw [0, 1] pixels: 0,0,0 with --input_std=1,1,1)")
INPUT_STD = flags.DEFINE_list("input_std", None, "R,G,B standard deviation, as --input_mean")
DATA = flags.DEFINE_string(
    "data", None, "record file (.bin), CIFAR folder, image folder (<split>/<class>/*.JPEG), or a "
    "name (cifar10, cifar100; tfds:cifar10, tfds:cifar100, tfds:imagenet2012 with --data_dir)")
SPLIT = flags.DEFINE_string(
    "split", "test", "split for folders and TFDS (train/test; validation for tfds:imagenet2012)")
DATASET = flags.DEFINE_enum("dataset", None, ["cifar10", "cifar100"],
                            "record format of a single file (default cifar10)")
DATA_DIR = flags.DEFINE_string("data_dir", None,
                               "TFDS data_dir (default: TFDS's, ~/tensorflow_datasets)")
DOWNLOAD = flags.DEFINE_bool("download", False, "let TFDS download and prepare the dataset")
ARCH = flags.DEFINE_string("arch", None, "override the architecture inferred from the keys")
SHORTCUT = flags.DEFINE_enum("shortcut", None, ["A", "avgpool", "projection"],
                             "override the shortcut kind inferred from the keys")
BEST = flags.DEFINE_bool("best", False, "workdir: the best checkpoint, not the last")
BASELINES = flags.DEFINE_bool(
    "baselines", False, "also the references at the same mean blocks (blockdrop_jax/references.py):"
    " the pretrained ResNet (workdir), the full network, FirstK, RandomK and, for a workdir, the "
    "best static subset and the run's most frequent policy, chosen on its validation images")
MODE = flags.DEFINE_enum(
    "mode", EVAL_MODES[0], EVAL_MODES,
    "workdir: how blocks run (same outputs): compact and grouped run only the blocks each image "
    "keeps, masked runs all of them; auto: compact on CPU, masked on GPU, the fastest there")
REPORT = flags.DEFINE_string(
    "report", None, "workdir: write figures and report.md (what the policy learned) into this folder")
COMPARE = flags.DEFINE_multi_string(
    "compare", [], "with --report: another run (e.g. another penalty) for the trade-off figure; "
    "repeat the flag for more")
CROSS_CHECK = flags.DEFINE_bool(
    "cross_check", False, "PyTorch file: also run its own tensors through the library's PyTorch "
    "definition of the network on the same images, and print how many per-image predictions "
    "(and greedy policies) agree and the largest logit difference (needs torch)")
BATCH_SIZE = flags.DEFINE_integer("batch_size", 250, "images per batch", lower_bound=1)
JSON = flags.DEFINE_string("json", None, "write the results and per-image outputs here")
flags.mark_flags_as_required(["checkpoint", "data"])


def _floats(flag) -> list[float] | None:
  try:
    return [float(v) for v in flag.value] if flag.value else None
  except ValueError as e:
    raise BlockDropError(f"--{flag.name}: expected numbers separated by commas ({e})") from e


def main(argv) -> int:
  cli.no_positional_arguments(argv)
  from blockdrop_jax import (checkpoint, convert, data, evaluation, multihost, original_checkpoint,
                             steps, storage, torch_file)
  say = print if multihost.is_chief() else lambda *lines: None  # process 0 speaks for all
  normalisation = dict(input_mean=_floats(INPUT_MEAN), input_std=_floats(INPUT_STD))
  if CROSS_CHECK.value and (not os.path.isfile(CHECKPOINT.value)
                            or CHECKPOINT.value.endswith(".safetensors")):
    raise BlockDropError("--cross_check compares a PyTorch file (.th/.pt/.t7) with PyTorch")
  dataset = multihost.process_0_first("data ready", lambda: data.load_dataset(
      DATA.value, SPLIT.value, DATASET.value, DATA_DIR.value, DOWNLOAD.value))
  blockdrop_file = (os.path.isfile(CHECKPOINT.value) and not CHECKPOINT.value.endswith(
      ".safetensors") and original_checkpoint.is_blockdrop_checkpoint(torch_file.read_torch_file(CHECKPOINT.value)))
  # A folder or a bucket (gs://...) is a training workdir; load_run says if it is not one.
  if os.path.isdir(CHECKPOINT.value) or storage.is_remote(CHECKPOINT.value) or blockdrop_file:
    meta = None
    if blockdrop_file:
      nets, params, stats = original_checkpoint.load_blockdrop_checkpoint(CHECKPOINT.value, BASE.value,
                                                              **normalisation)
      origin = "the original's checkpoint"
    else:
      nets, params, stats, meta = checkpoint.load_run(CHECKPOINT.value, best=BEST.value)
      origin = f"{meta['stage']} epoch {meta['epoch']}"
    result = evaluation.blockdrop_report(nets, params, stats, dataset, BATCH_SIZE.value,
                                         mode=MODE.value, static_keep=checkpoint.static_keep(meta))
    say(f"BlockDrop {nets.resnet.name} ({origin}) on {dataset.source}")
    say(evaluation.format_report(result))
    say(f"Speed: {result['images_per_s']:.1f} images/s ({result['mode']} execution, compilation "
          "included; benchmarks/speed.py measures steady state)")
    spec, refs = nets.resnet, None
    if REPORT.value:
      if blockdrop_file:
        raise BlockDropError("--report reads training workdirs; for the original's checkpoint "
                             "use --json, or continue it with train.py --config.init_from=FILE")
      from blockdrop_jax import report
      path, refs = report.write_report([CHECKPOINT.value, *COMPARE.value], dataset, REPORT.value,
                                       BATCH_SIZE.value, best=BEST.value)
      say(f"Report: {path}")
    if BASELINES.value:  # the report's, where it computed them
      from blockdrop_jax import references, run_inputs
      result["baselines"] = refs if refs is not None else run_inputs.run_references(
          nets, params, stats, meta, dataset, result["blocks_mean"], BATCH_SIZE.value)
      say(references.format_references(result["baselines"]))
  else:
    spec, variables = multihost.process_0_first("weights ready", lambda: convert.load_pretrained(
        CHECKPOINT.value, ARCH.value, SHORTCUT.value, **normalisation))
    result = evaluation.evaluate_resnet(spec, variables, dataset, BATCH_SIZE.value)
    say(f"{spec.name} on {dataset.source}: Accuracy: {result['accuracy']:.4f} "
          f"({result['correct']}/{result['n']})")
  if CROSS_CHECK.value:
    if not blockdrop_file:  # the ResNet as the BlockDrop paths hold it
      nets = steps.Nets(spec)
      params, stats = {"resnet": variables["params"]}, {"resnet": variables["batch_stats"]}
    result["cross_check"] = _cross_check(dataset, result, blockdrop_file, nets, params, stats)
    say(_describe(result["cross_check"]))
  result.update(checkpoint=CHECKPOINT.value, data=dataset.source, arch=spec.name,
                shortcut=spec.shortcut, num_blocks=spec.num_blocks)
  if JSON.value and multihost.is_chief():
    cli.write_json(JSON.value, result)
  return 0


def _cross_check(dataset, result: dict, blockdrop_file: bool, nets, params, stats) -> dict:
  """Our per-image outputs (``result``, and the ResNet's logits from the loaded ``nets``,
  ``params``, ``stats``) against PyTorch's from the file's own tensors."""
  import numpy as np
  from blockdrop_jax import evaluation, original_checkpoint, torch_file, torch_layout
  try:
    from blockdrop_jax import torch_nets
  except ImportError as e:
    raise BlockDropError("--cross_check needs torch: pip install 'blockdrop-jax[torch]'") from e
  n = len(dataset)
  if blockdrop_file:
    agent, resnet_state = original_checkpoint.blockdrop_state_dicts(CHECKPOINT.value, BASE.value)
    policy_layout = torch_layout.infer_spec(agent)[1]
    policy_logits = torch_nets.logits(torch_nets.network(nets.policy, agent, policy_layout),
                                      dataset.images)
    policies = (policy_logits >= 0).astype(np.float32)
    ours_policies = np.asarray(result["policies"], np.float32)
  else:
    resnet_state = torch_file.load_torch_file(CHECKPOINT.value)
    policies = ours_policies = np.ones((n, nets.resnet.num_blocks), np.float32)
  layout = torch_layout.infer_spec(resnet_state, ARCH.value, SHORTCUT.value)[1]
  theirs = torch_nets.logits(torch_nets.network(nets.resnet, resnet_state, layout),
                             dataset.images, policies)
  ours = evaluation.resnet_logits(nets, params, stats, dataset, ours_policies, BATCH_SIZE.value,
                                  progress=False)
  check = {"images": n, "predictions_agree": int(np.sum(ours.argmax(-1) == theirs.argmax(-1))),
           "max_logit_difference": float(np.max(np.abs(ours - theirs)))}
  if blockdrop_file:
    check["policies_agree"] = int(np.sum(np.all(policies == ours_policies, axis=1)))
  return check


def _describe(check: dict) -> str:
  policies = (f", greedy policies {check['policies_agree']}/{check['images']}"
              if "policies_agree" in check else "")
  return (f"Cross-check with PyTorch: predictions {check['predictions_agree']}/{check['images']}"
          f"{policies} agree; largest logit difference {check['max_logit_difference']:.2e}")


def run() -> None:
  """The program: ``blockdrop-evaluate``, or ``python evaluate.py`` in a checkout."""
  cli.run(main)
