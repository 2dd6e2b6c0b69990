"""Shared fixtures. Real data comes from $BLOCKDROP_SHARED_DATA (default ../shared/data)."""

import glob
import importlib.util
import os
import shutil
import tempfile

# The tests compile many small programs and run each a few times, so XLA's backend optimisations
# and LLVM's costlier passes take more compile time than they save (about a third of the suite's
# time); what the tests check holds at any level. Set for the test processes and the
# train.py/evaluate.py processes they start.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
# Eight fake CPU devices for the data-parallel tests; must be set before JAX starts.
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {TEST_XLA_FLAGS}")

import pytest  # noqa: E402

from blockdrop_jax.registry import SHARED_DATA_ENV, shared_data_dir  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A persistent compilation cache for the train.py and evaluate.py processes the tests start: each
# compiles the same steps again (tests/test_train.py alone: 2.9 minutes without it, 1.8 with it,
# on 2 cores). Made by the process that loads this
# file first (xdist's controller, whose workers inherit the variable) and removed when that
# process ends. The test processes do without: there writing it cost more than it saved.
CACHE_ENV, CACHE_OWNER_ENV = "BLOCKDROP_TEST_COMPILATION_CACHE", "BLOCKDROP_TEST_CACHE_OWNER"
if CACHE_ENV not in os.environ:
  os.environ[CACHE_ENV] = tempfile.mkdtemp(prefix="blockdrop-jax-test-cache-")
  os.environ[CACHE_OWNER_ENV] = str(os.getpid())


def pytest_unconfigure(config):
  if os.environ.get(CACHE_OWNER_ENV) == str(os.getpid()):
    shutil.rmtree(os.environ[CACHE_ENV], ignore_errors=True)


def cli_env(devices: int, cache: str = "") -> dict:
  """The environment of a train.py or evaluate.py process that a test starts: ``devices`` fake
  CPU devices and a compilation cache for every program it compiles, the test run's unless
  ``cache`` names another (a finite cache size turns on JAX's file lock: no process reads an entry
  half written)."""
  return dict(os.environ,
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {TEST_XLA_FLAGS}",
              JAX_COMPILATION_CACHE_DIR=cache or os.environ[CACHE_ENV],
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_COMPILATION_CACHE_MAX_SIZE=str(4 << 30))


@pytest.fixture(scope="session")
def shared_data():
  path = shared_data_dir()
  if not os.path.isdir(os.path.join(path, "cifar10", "subset")):
    pytest.skip(f"shared data not found at {path}; set {SHARED_DATA_ENV} to the folder holding "
                "cifar10/subset and pretrained/")
  return path


@pytest.fixture(scope="session")
def test_records(shared_data):
  return os.path.join(shared_data, "cifar10", "subset", "test_batch_first1000.bin")


@pytest.fixture(scope="session")
def train_records(shared_data):
  return os.path.join(shared_data, "cifar10", "subset", "data_batch_1_first4000.bin")


def first_records(records, n, folder) -> str:
  """A CIFAR record file (3,073 bytes a record) of the first ``n`` images of ``records``."""
  path = os.path.join(folder, f"first{n}.bin")
  with open(records, "rb") as f, open(path, "wb") as out:
    out.write(f.read(n * 3073))
  return path


def akamaster_file(shared_data, depth):
  return glob.glob(os.path.join(shared_data, "pretrained", "akamaster_cifar10", f"resnet{depth}-*.th"))[0]


def load_benchmark(name):
  """benchmarks/NAME.py as a module (the benchmarks are scripts, not a package)."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "benchmarks", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
