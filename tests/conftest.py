"""Shared fixtures. Real data comes from $BLOCKDROP_SHARED_DATA (default ../shared/data)."""

import glob
import importlib.util
import os

# Eight fake CPU devices for the data-parallel tests; must be set before JAX starts.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import pytest  # noqa: E402

from blockdrop_jax.data import SHARED_DATA_ENV, shared_data_dir  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def akamaster_file(shared_data, depth):
  return glob.glob(os.path.join(shared_data, "pretrained", "akamaster_cifar10", f"resnet{depth}-*.th"))[0]


def load_benchmark(name):
  """benchmarks/NAME.py as a module (the benchmarks are scripts, not a package)."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "benchmarks", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
