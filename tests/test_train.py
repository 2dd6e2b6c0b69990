"""train.py end to end on tiny configs: stages chain, resume after SIGKILL, a workdir in a bucket,
bad input."""

import glob
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import CACHE_ENV, REPO, cli_env

SMOKE = "scratch_r20_subset" + ":smoke"


# Checkpoints at every step, the curriculum handing over a block every 2 steps (the smoke config
# has 3 steps an epoch and K = 3 blocks), and a block budget, whose multiplier the state carries.
PER_STEP = ("--config.checkpoint_every_steps=1", "--config.curriculum.steps_per_block=2",
            "--config.block_budget.fraction=0.2")

# One CPU device: the multi-device runs are tests/test_parallel.py's.
ENV = cli_env(devices=1)


def train_cmd(workdir, *overrides, config=SMOKE):
  return [sys.executable, os.path.join(REPO, "train.py"), "--config", config, "--workdir",
          str(workdir), "--noprogress", *overrides]


def run_train(workdir, *overrides, config=SMOKE):
  return subprocess.run(train_cmd(workdir, *overrides, config=config), cwd=REPO, capture_output=True,
                        text=True, timeout=600, env=ENV)


def _one_line_error(proc, pattern):
  assert proc.returncode == 2, proc.stdout + proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error:") and pattern in lines[0], proc.stderr


def _records(workdir):
  from blockdrop_jax import storage
  return [json.loads(line)
          for line in (storage.path(workdir) / "metrics.jsonl").read_text().splitlines()]


def _final(workdir):
  """(params, batch_stats, meta, metrics records) of a run, wall-clock fields left out: they
  differ between any two runs, the rest must not."""
  from blockdrop_jax import checkpoint, run_log

  def untimed(record):
    return {k: v for k, v in record.items() if k not in run_log.TIMING_METRICS}

  _, params, stats, meta = checkpoint.load_run(str(workdir))
  meta = {**meta, "metrics": untimed(meta["metrics"])}
  return params, stats, meta, [untimed(record) for record in _records(workdir)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, shared_data):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  proc = run_train(workdir, *PER_STEP, "--config.profile_steps=2")  # profiling changes no value
  assert proc.returncode == 0, proc.stderr
  return workdir, proc


def test_all_stages_run_and_print_the_report(uninterrupted):
  workdir, proc = uninterrupted
  for line in ("Accuracy: ", "Block Usage: ", "FLOPs/img: ", "Unique Policies: "):
    assert line in proc.stdout
  _, _, meta, records = _final(workdir)
  assert [r["stage"] for r in records] == ["pretrain", "curriculum", "curriculum", "finetune"]
  # k at the end of each epoch: steps 0-2 hand over 1, 1, 2 blocks, steps 3-5 2, 3, 3.
  assert [r["k"] for r in records if r["stage"] == "curriculum"] == [2, 3]
  # The budget's multiplier: raised from the curriculum's fifth step on (k = K), carried on.
  assert 0 < records[2]["train_budget_multiplier"] < records[3]["train_budget_multiplier"]
  assert meta["stage"] == "finetune" and meta["epoch"] == 1
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  [trace] = glob.glob(os.path.join(workdir, "tensorboard", "plugins", "profile", "*",
                                   "*.trace.json.gz"))
  with gzip.open(trace) as f:  # the traced steps ran the jitted step (the trainer's lambda)
    assert "PjitFunction(<lambda>)" in {event.get("name") for event in json.load(f)["traceEvents"]}
  # The last keep_checkpoints (3) steps and the best, which is older here.
  from blockdrop_jax import checkpoint
  steps = sorted(int(name) for name in os.listdir(os.path.join(workdir, "checkpoints")))
  best = checkpoint.load_run(str(workdir), best=True)[3]["global_step"]
  assert steps == sorted({*range(meta["global_step"] - 2, meta["global_step"] + 1), best})


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(uninterrupted, tmp_path):
  workdir = tmp_path / "killed"
  # With a copy of the shared compilation cache (which holds the uninterrupted run's programs): a
  # kill amid a write may leave a truncated entry there, not in the cache other tests read.
  cache = shutil.copytree(os.environ[CACHE_ENV], tmp_path / "cache")
  proc = subprocess.Popen(train_cmd(workdir, *PER_STEP), cwd=REPO,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          env=cli_env(devices=1, cache=str(cache)))
  # Kill once a mid-epoch checkpoint of the curriculum exists: 3 steps an epoch, pretraining takes
  # steps 1-3, so step 5 is the second batch of the curriculum's first epoch.
  target = workdir / "checkpoints" / "5"
  deadline = time.time() + 300
  while not target.exists() and time.time() < deadline and proc.poll() is None:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert target.exists(), "the run ended before the checkpoint to kill at"
  from blockdrop_jax import checkpoint
  meta = checkpoint.load_run(str(workdir))[3]
  assert meta["stage"] == "curriculum" and meta["batch"] > 0  # stopped inside an epoch
  proc = run_train(workdir, *PER_STEP)
  assert proc.returncode == 0, proc.stderr
  params, stats, meta, records = _final(workdir)
  params_ref, stats_ref, meta_ref, records_ref = _final(uninterrupted[0])
  jax.tree.map(np.testing.assert_array_equal, params, params_ref)
  jax.tree.map(np.testing.assert_array_equal, stats, stats_ref)
  assert records == records_ref
  assert meta["metrics"] == meta_ref["metrics"]


def test_a_run_in_a_bucket_equals_the_local_run(uninterrupted, test_records, tmp_path,
                                                monkeypatch):
  """train.py and evaluate.py with ``--workdir gs://bucket/run`` against an offline Cloud Storage
  server: checkpoints, metrics, TensorBoard and the report land in the bucket, the run is the
  local run value for value, evaluate.py reads it back, and nothing local is named after it."""
  import gcs_emulator
  from etils import epath
  from test_evaluate_cli import evaluate_in_process

  local, bucket = str(uninterrupted[0]), "gs://bucket/run"
  with gcs_emulator.serving("bucket") as bucket_env:
    for name, value in bucket_env.items():
      monkeypatch.setenv(name, value)
    proc = subprocess.run(train_cmd(bucket, *PER_STEP, "--report"), cwd=tmp_path,
                          capture_output=True, text=True, timeout=600, env=dict(ENV, **bucket_env))
    assert proc.returncode == 0, proc.stderr
    assert os.listdir(tmp_path) == []
    ours, theirs = _final(bucket), _final(local)
    jax.tree.map(np.testing.assert_array_equal, ours[:2], theirs[:2])
    assert ours[2]["metrics"] == theirs[2]["metrics"] and ours[3] == theirs[3]
    assert list(epath.Path(f"{bucket}/tensorboard").glob("events.out.tfevents.*"))
    assert "Accuracy" in epath.Path(f"{bucket}/report/report.md").read_text()
    evaluated = {}
    for workdir in (local, bucket):
      out = tmp_path / f"{len(evaluated)}.json"
      assert evaluate_in_process("--checkpoint", workdir, "--data", test_records,
                                 "--json", str(out)) == 0
      evaluated[workdir] = json.loads(out.read_text())
  assert evaluated[bucket]["predictions"] == evaluated[local]["predictions"]
  assert evaluated[bucket]["policies"] == evaluated[local]["policies"]


def test_rerunning_a_finished_run_changes_nothing(uninterrupted):
  workdir, _ = uninterrupted
  before = _final(workdir)[3]
  proc = run_train(workdir, *PER_STEP)
  assert proc.returncode == 0 and "Unique Policies" in proc.stdout
  assert _final(workdir)[3] == before


def test_corrupted_checkpoint_is_reported_and_kept(uninterrupted, tmp_path):
  workdir = tmp_path / "corrupt"
  shutil.copytree(uninterrupted[0], workdir)
  latest = max(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
  for root, _, files in os.walk(workdir / "checkpoints" / str(latest) / "state"):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")
  before = sorted(os.listdir(workdir / "checkpoints"))
  _one_line_error(run_train(workdir, *PER_STEP), "cannot be read")
  assert sorted(os.listdir(workdir / "checkpoints")) == before


def test_sparse_checkpoints_resume_to_the_same_run(tmp_path):
  """Checkpoints every 2nd epoch (and at evaluations and stage ends) only; a run stopped between
  them replays the lost epochs to the same weights and metrics."""
  workdir = tmp_path / "sparse"
  overrides = ("--config.checkpoint_every_epochs=2", "--config.eval_every=100",
               "--config.curriculum.epochs=3", "--config.keep_checkpoints=100")
  assert run_train(workdir, *overrides).returncode == 0
  # 3 steps an epoch: pretraining ends at step 3, the curriculum's epochs at 6, 9, 12, finetuning
  # at 15. Epoch 1 of the curriculum (step 6) is neither 2nd, evaluated nor last.
  saved = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
  assert saved == [3, 9, 12, 15]
  params, stats, meta, records = _final(workdir)
  assert [r["k"] for r in records if r["stage"] == "curriculum"] == [1, 2, 3]  # one an epoch
  for step in (12, 15):  # as if the run had been killed during epoch 3 of the curriculum
    shutil.rmtree(workdir / "checkpoints" / str(step))
  assert run_train(workdir, *overrides).returncode == 0
  params_again, stats_again, meta_again, records_again = _final(workdir)
  jax.tree.map(np.testing.assert_array_equal, params_again, params)
  jax.tree.map(np.testing.assert_array_equal, stats_again, stats)
  assert records_again == records and meta_again["metrics"] == meta["metrics"]


def _evaluate(run, tmp_path, test_records, *flags):
  out = tmp_path / f"{os.path.basename(run)}.json"
  proc = subprocess.run([sys.executable, os.path.join(REPO, "evaluate.py"), "--checkpoint",
                         str(run), "--data", test_records, "--json", str(out), *flags],
                        cwd=REPO, capture_output=True, text=True, timeout=600, env=ENV)
  assert proc.returncode == 0, proc.stderr
  return json.loads(out.read_text()), proc.stdout


def _assert_report_figures(out):
  import matplotlib.image
  report = (out / "report.md").read_text()
  pngs = sorted(p for p in os.listdir(out) if p.endswith(".png"))
  assert pngs == sorted(["tradeoff.png", "blocks_histogram.png", "keep_rate.png", "policy_gallery.png",
                         "confidence.png", "training_curves.png", "policy_training.png"])
  for name in pngs:
    image = matplotlib.image.imread(out / name)
    assert image.shape[0] > 200 and image.shape[1] > 300, name
    assert image[..., :3].std() > 0.02, f"{name} is blank"
    assert f"]({name})" in report
  return report


def test_validation_chooses_best_and_the_references(uninterrupted, tmp_path, test_records):
  """A finetuning run from another run's weights, with validation images held out and compact
  finetuning passes: it logs validation and test metrics, keeps the best by validation accuracy,
  and its references are set against the ResNet it started from (`pretrained`: that run's full
  network, image for image). The report of the run it started from, compared with it, draws every
  figure."""
  started_from, _ = uninterrupted
  workdir = tmp_path / "finetuned"
  proc = run_train(workdir, "--config.stages=finetune", f"--config.init_from={started_from}",
                   "--config.data.validation=16", "--config.finetune.epochs=2",
                   "--config.finetune.passes=compact")
  assert proc.returncode == 0, proc.stderr
  records = _records(workdir)
  assert all("val_accuracy" in r and "test_accuracy" in r for r in records)
  assert [r["finetune_passes"] for r in records] == ["compact", "compact"]
  from blockdrop_jax import checkpoint
  best = checkpoint.load_run(str(workdir), best=True)[3]["metrics"]
  assert best["val_accuracy"] == max(r["val_accuracy"] for r in records)
  assert best["epoch"] == next(r["epoch"] for r in records
                               if r["val_accuracy"] == best["val_accuracy"])

  before, _ = _evaluate(started_from, tmp_path, test_records, "--baselines", "--report",
                        str(tmp_path / "report"), "--compare", str(workdir))
  report = _assert_report_figures(tmp_path / "report")
  assert f"| {started_from.name} | {100 * before['accuracy']:.1f}% |" in report
  assert f"| static{round(before['blocks_mean'])} |" in report
  after, printed = _evaluate(workdir, tmp_path, test_records, "--baselines")
  assert "pretrained" not in before["baselines"]  # it pretrained its own ResNet
  k = round(after["blocks_mean"])
  assert list(after["baselines"]) == ["pretrained", "full", f"first{k}", f"random{k}",
                                      f"static{k}", "mode"]
  assert after["baselines"]["pretrained"]["predictions"] == before["baselines"]["full"]["predictions"]
  assert after["baselines"]["full"]["confidence"] != before["baselines"]["full"]["confidence"]
  assert "pretrained: Accuracy: " in printed and after["num_blocks"] == 3


def _best_two_blocks(workdir):
  """The best fixed 2-block subset of the ResNet a run started from, by greedy elimination on the
  run's validation images, computed here from the library's pieces."""
  from blockdrop_jax import checkpoint, configs, references, run_inputs
  nets, _, _, meta = checkpoint.load_run(str(workdir))
  config = configs.from_json(meta["config"])
  _, start = run_inputs.starting_resnet(config)
  return references.greedy_elimination(
      nets, {"resnet": start["params"]}, {"resnet": start["batch_stats"]},
      run_inputs.selection_images(config), 2)[2]


def test_static_reference_finetunes_one_subset_chosen_on_validation(uninterrupted, tmp_path,
                                                                    test_records):
  """`:static`: the ResNet alone, distilled from where it started, under the subset that greedy
  elimination picks on the validation images; evaluation runs that subset for every image."""
  started_from, _ = uninterrupted
  workdir = tmp_path / "static"
  proc = run_train(workdir, f"--config.init_from={started_from}",
                   "--config.block_budget.fraction=0.5", "--config.finetune.distill_weight=0.5",
                   config=SMOKE.replace(":smoke", ":static,smoke"))
  assert proc.returncode == 0, proc.stderr
  from blockdrop_jax import checkpoint
  meta = checkpoint.load_run(str(workdir))[3]
  np.testing.assert_array_equal(checkpoint.static_keep(meta), _best_two_blocks(workdir))
  result, _ = _evaluate(workdir, tmp_path, test_records)
  assert result["mode"] == "static" and result["unique_policies"] == 1
  assert result["blocks_mean"] == 2
  assert "FLOPs: " in proc.stdout and "% saved" in proc.stdout


def test_policy_can_start_at_the_best_static_subset(uninterrupted, tmp_path):
  """``policy_init_static``: the policy's bias starts at +b on the blocks greedy elimination keeps
  on the validation images and -b on the others (one curriculum epoch at Adam 1e-3 moves it by
  about 3e-3)."""
  started_from, _ = uninterrupted
  workdir = tmp_path / "static_start"
  proc = run_train(workdir, f"--config.init_from={started_from}", "--config.stages=curriculum",
                   "--config.curriculum.epochs=1", "--config.policy_init_static=true",
                   "--config.policy_init_bias=3", "--config.block_budget.fraction=0.5",
                   "--config.data.validation=16")
  assert proc.returncode == 0, proc.stderr
  from blockdrop_jax import checkpoint
  params = checkpoint.load_run(str(workdir))[1]
  np.testing.assert_allclose(params["policy"]["fc"]["bias"],
                             np.where(_best_two_blocks(workdir) > 0, 3.0, -3.0), atol=0.05)
