"""The package as users install it (``pip install .``, no checkout on the path): the installed
commands train, resume and evaluate from any folder, with the configs shipped in the package."""

import os
import site
import subprocess
import sys

from blockdrop_jax.registry import SHARED_DATA_ENV
from conftest import REPO, cli_env


def test_installed_commands_train_resume_and_evaluate_from_any_folder(tmp_path, shared_data,
                                                                      test_records):
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
  # The dependencies come from this environment's site-packages, added as a plain path (its
  # .pth files, among them an editable install of this checkout, are not read).
  new_site = next((venv / "lib").glob("python3*/site-packages"))
  (new_site / "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
  python = venv / "bin" / "python"
  subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
                  "--no-deps", "--no-build-isolation", REPO], check=True, cwd=tmp_path,
                 capture_output=True)
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  env = dict(cli_env(devices=1), **{SHARED_DATA_ENV: shared_data})  # no checkout beside it

  def command(name, *args):
    proc = subprocess.run([str(venv / "bin" / name), *args], cwd=elsewhere, capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout

  located = subprocess.run([str(python), "-c", "import blockdrop_jax; print(blockdrop_jax.__file__)"],
                           cwd=elsewhere, capture_output=True, text=True, check=True).stdout
  assert located.startswith(str(venv)), located  # the installed copy, not the checkout
  # The smoke variant of the experiment that pretrains its own small base: the heavier ones
  # compile for minutes more, and load their weights through the same package paths.
  train = ["--config", "scratch_r20_subset:smoke", "--workdir", "run", "--noprogress",
           "--config.curriculum.epochs=1"]
  command("blockdrop-train", *train)
  resumed = command("blockdrop-train", *train[:-1], "--config.curriculum.epochs=2")
  assert "Finished finetune epoch 1" in resumed
  evaluated = command("blockdrop-evaluate", "--checkpoint", "run", "--data", test_records,
                      "--baselines", "--report", "evaluation")
  assert "mode: Accuracy: " in evaluated and (elsewhere / "evaluation" / "report.md").exists()
  assert not os.path.exists(os.path.join(REPO, "run"))
