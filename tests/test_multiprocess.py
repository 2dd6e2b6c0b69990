"""Several processes, started as a user starts them (``python -m blockdrop_jax.launch``), against
one process with as many devices: the same training, evaluation, preemption and resume."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import portpicker
import pytest

from conftest import REPO, cli_env, first_records

SMOKE = "scratch_r20_subset:smoke"
TOL = dict(rtol=2e-4, atol=2e-5)  # float32 sums in another order across processes
# Final weights after 12 steps from scratch (SGD at lr 0.1, then Adam, which scales each update to
# about lr whatever the gradient's size): summation-order differences grow to about 2e-4.
WEIGHTS_TOL = dict(rtol=2e-4, atol=1e-3)
TIMING = ("train_seconds", "train_images_per_s")
SAVED_ON_PREEMPTION = re.compile(r"preempted \(SIGTERM\): saved step (\d+)")


def _launch(*command, processes=2, devices=2):
  return [sys.executable, "-m", "blockdrop_jax.launch", "--processes", str(processes),
          "--devices_per_process", str(devices), "--", *command]


def _train_command(workdir, *overrides):
  return [os.path.join(REPO, "train.py"), "--config", SMOKE, "--workdir", str(workdir),
          "--noprogress", *overrides]


def _run(command, devices=4):
  if command[0].endswith(".py"):
    command = [sys.executable, *command]
  return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                        env=cli_env(devices))


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


def _assert_same_run(workdir, reference):
  ours, theirs = _metrics(workdir), _metrics(reference)
  assert [r["step"] for r in ours] == [r["step"] for r in theirs]
  for a, b in zip(ours, theirs):
    assert a.keys() == b.keys()
    for key in a:
      if isinstance(a[key], float):
        np.testing.assert_allclose(a[key], b[key], err_msg=key, **TOL)
      else:
        assert a[key] == b[key], key
  from blockdrop_jax import checkpoint
  ours, theirs = checkpoint.load_run(str(workdir)), checkpoint.load_run(str(reference))
  jax.tree.map(
      lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), **WEIGHTS_TOL),
      ours[1:3], theirs[1:3])


def _lines_of(output, process):
  prefix = f"[{process}] "
  return [line[len(prefix):] for line in output.splitlines() if line.startswith(prefix)]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, shared_data):
  """The uninterrupted reference: one process with 4 devices."""
  workdir = tmp_path_factory.mktemp("one_process")
  proc = _run(_train_command(workdir))
  assert proc.returncode == 0, proc.stderr
  return workdir, proc.stdout


def test_evaluate_gives_the_same_report_on_two_processes(tmp_path, one_process, test_records):
  reference, _ = one_process
  images = first_records(test_records, 100, tmp_path)
  common = [os.path.join(REPO, "evaluate.py"), "--checkpoint", str(reference), "--data",
            str(images), "--batch_size", "32"]
  one = _run([*common, "--json", str(tmp_path / "one.json")], devices=4)
  assert one.returncode == 0, one.stderr
  two = _run(_launch(*common, "--json", str(tmp_path / "two.json"), "--report",
                     str(tmp_path / "report")), devices=2)
  assert two.returncode == 0, two.stdout[-3000:]
  ours, theirs = (json.loads((tmp_path / name).read_text()) for name in ("two.json", "one.json"))
  for key in ("accuracy", "blocks_mean", "flops_mean", "unique_policies", "predictions",
              "policies"):
    assert ours[key] == theirs[key], key
  assert (tmp_path / "report" / "report.md").exists()
  assert [line for line in _lines_of(two.stdout, 0) if line.startswith("Report: ")]
  assert not [line for line in _lines_of(two.stdout, 1) if line.startswith(("Report", "Accuracy"))]


def _preempt(command, env):
  """Runs ``command``, sends it SIGTERM once its training loop has started; (returncode, output)."""
  proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  output = []
  for line in proc.stdout:
    output.append(line)
    if "Training in" in line:
      proc.send_signal(signal.SIGTERM)
      break
  rest, _ = proc.communicate(timeout=600)
  return proc.returncode, "".join(output) + rest


def test_a_preempted_run_moves_between_two_processes_and_one(tmp_path, one_process):
  """SIGTERM on two processes of two devices: every process saves the same step. The run goes on
  as one process with two devices, is stopped there too after a step, and ends on two processes
  again: the values of one process with four devices, only process 0 printing."""
  from blockdrop_jax import multihost
  reference, reference_out = one_process
  workdir = tmp_path / "run"
  command = _train_command(workdir)
  code, output = _preempt(_launch(*command), cli_env(2))
  assert code == multihost.PREEMPTED_EXIT_CODE, output[-3000:]
  saved = [SAVED_ON_PREEMPTION.findall("\n".join(_lines_of(output, p))) for p in (0, 1)]
  assert saved[0] and saved[0] == saved[1], output[-3000:]
  code, output = _preempt([sys.executable, *command], cli_env(2))
  assert code == multihost.PREEMPTED_EXIT_CODE, output[-3000:]
  assert f"on 2 device(s) of 1 process(es), from step {saved[0][0]}" in output
  [saved_again] = SAVED_ON_PREEMPTION.findall(output)
  assert int(saved_again) > int(saved[0][0]) and "run the same command again to resume" in output
  proc = _run(_launch(*command), devices=2)
  assert proc.returncode == 0, proc.stdout[-3000:]
  _assert_same_run(workdir, reference)
  chief, other = _lines_of(proc.stdout, 0), _lines_of(proc.stdout, 1)
  assert [line for line in chief if line.endswith(f"from step {saved_again}")], chief
  summary = reference_out[reference_out.index("Finished"):].splitlines()
  assert chief[-len(summary):-1] == summary[:-1]  # all but the line naming the workdir
  assert not [line for line in other if "epoch" in line or "Accuracy" in line]


def test_unreachable_coordinator_is_one_line_within_the_timeout(tmp_path):
  proc = _run(_train_command(tmp_path / "run", "--coordinator_address",
                             f"localhost:{portpicker.pick_unused_port()}", "--num_processes=2",
                             "--process_id=1", "--coordinator_timeout=2"))
  assert proc.returncode == 2
  assert re.fullmatch(r"error: the coordinator localhost:\d+ did not answer within 2 s .*\n",
                      proc.stderr), proc.stderr


def test_batch_that_processes_cannot_split_is_one_line(tmp_path, shared_data):
  proc = _run(_launch(*_train_command(tmp_path / "run", "--config.pretrain.batch_size=15"),
                      devices=1), devices=1)
  assert proc.returncode == 2, proc.stdout[-3000:]
  assert ("error: config.pretrain.batch_size = 15 does not split over 2 devices of 2 processes; "
          "use a multiple of 2") in proc.stdout


def test_a_workdir_the_processes_do_not_share_is_one_line(tmp_path):
  """Each process writing to its own local folder, as on hosts without a shared filesystem."""
  script = tmp_path / "check.py"
  script.write_text(textwrap.dedent(f"""
      import os, sys
      import jax
      from blockdrop_jax import multihost, storage
      from blockdrop_jax.errors import BlockDropError
      env = {{field: os.environ[name] for field, name in multihost.ENVIRONMENT.items()}}
      multihost.initialize(multihost.Launch(env["coordinator_address"],
                                            int(env["num_processes"]), int(env["process_id"])))
      workdir = storage.workdir(os.path.join({str(tmp_path)!r}, f"host{{jax.process_index()}}"))
      workdir.mkdir()
      try:
        multihost.check_shared(workdir)
      except BlockDropError as e:
        print(f"error: {{e}}")
        sys.exit(2)
      """))
  proc = _run(_launch(str(script), devices=1), devices=1)
  assert proc.returncode == 2, proc.stdout[-3000:]
  for process in (0, 1):
    assert [line for line in _lines_of(proc.stdout, process)
            if line.startswith("error: ") and "is not shared" in line and "bucket" in line]


def test_rows_follow_the_batch_sharding_on_interleaved_devices(tmp_path):
  """A mesh that alternates the processes' devices: each process loads the rows its devices hold
  (not one block per process), and the global batch is the one that was split."""
  script = tmp_path / "rows.py"
  script.write_text(textwrap.dedent("""
      import os
      import jax
      import numpy as np
      from jax.experimental import multihost_utils
      from blockdrop_jax import multihost, parallel
      env = {field: os.environ[name] for field, name in multihost.ENVIRONMENT.items()}
      multihost.initialize(multihost.Launch(env["coordinator_address"],
                                            int(env["num_processes"]), int(env["process_id"])))
      by_process = [jax.devices()[:2], jax.devices()[2:]]
      mesh = parallel.data_mesh([by_process[p][d] for d in range(2) for p in range(2)])
      batch = np.arange(16, dtype=np.float32).reshape(8, 2)
      rows = parallel.process_rows(mesh, 8)
      [x] = parallel.global_batch(mesh, 8, batch[rows])
      np.testing.assert_array_equal(multihost_utils.process_allgather(x, tiled=True), batch)
      print("rows", jax.process_index(), rows.tolist())
      """))
  proc = _run(_launch(str(script), devices=2), devices=2)
  assert proc.returncode == 0, proc.stdout[-3000:]
  assert "rows 0 [0, 1, 4, 5]" in _lines_of(proc.stdout, 0)
  assert "rows 1 [2, 3, 6, 7]" in _lines_of(proc.stdout, 1)
