"""Named weights and data through a real HTTP server on 127.0.0.1 (no mocked download code)."""

import functools
import hashlib
import http.server
import io
import os
import shutil
import tarfile
import threading

import numpy as np
import pytest

from blockdrop_jax import BlockDropError, convert, data, registry
from conftest import akamaster_file


@pytest.fixture
def server(tmp_path):
  """Serves tmp_path/www; yields (base url, folder, request log)."""
  www = tmp_path / "www"
  www.mkdir()
  requests = []

  class Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
      requests.append(self.path)

  httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                          functools.partial(Handler, directory=str(www)))
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  yield f"http://127.0.0.1:{httpd.server_address[1]}", www, requests
  httpd.shutdown()
  httpd.server_close()


@pytest.fixture
def isolated(tmp_path, monkeypatch):
  """No offline data folder, an empty cache."""
  monkeypatch.setenv(registry.SHARED_DATA_ENV, str(tmp_path / "no-shared-data"))
  monkeypatch.setenv(registry.CACHE_ENV, str(tmp_path / "cache"))
  return tmp_path / "cache"


def test_weights_download_then_cache_hit(server, isolated, shared_data):
  url, www, requests = server
  shutil.copy(akamaster_file(shared_data, 20), www / "resnet20.th")
  path = registry.resolve_weights("akamaster/resnet20", f"{url}/resnet20.th")
  assert path == str(isolated / "resnet20-12fca82f.th") and requests == ["/resnet20.th"]
  assert registry.resolve_weights("akamaster/resnet20", f"{url}/resnet20.th") == path
  assert requests == ["/resnet20.th"]  # second time from the cache
  spec, _ = convert.load_pretrained("akamaster/resnet20")
  assert spec.name == "cifar_resnet20"


def test_sha256_mismatch_is_refused_and_not_cached(server, isolated, shared_data):
  url, www, _ = server
  shutil.copy(akamaster_file(shared_data, 32), www / "resnet20.th")  # the wrong file
  with pytest.raises(BlockDropError, match="sha256 .* expected 12fca82f0bebc413"):
    registry.resolve_weights("akamaster/resnet20", f"{url}/resnet20.th")
  assert not isolated.exists() or os.listdir(isolated) == []


def test_server_down_is_a_clear_message(isolated):
  with pytest.raises(BlockDropError, match="could not download resnet20-12fca82f.th .* by hand"):
    registry.resolve_weights("akamaster/resnet20", "http://127.0.0.1:9/resnet20.th")
  assert not isolated.exists() or os.listdir(isolated) == []


def test_partial_download_never_left_in_cache(server, isolated, shared_data):
  url, www, _ = server
  content = open(akamaster_file(shared_data, 20), "rb").read()
  (www / "resnet20.th").write_bytes(content[:len(content) // 2])  # truncated transfer
  with pytest.raises(BlockDropError):
    registry.resolve_weights("akamaster/resnet20", f"{url}/resnet20.th")
  assert not isolated.exists() or os.listdir(isolated) == []
  (www / "resnet20.th").write_bytes(content)
  assert registry.sha256_of(registry.resolve_weights("akamaster/resnet20", f"{url}/resnet20.th")) \
      == registry.WEIGHTS["akamaster/resnet20"].sha256


def test_offline_data_folder_is_used_first(shared_data, monkeypatch, tmp_path):
  monkeypatch.setenv(registry.CACHE_ENV, str(tmp_path / "cache"))
  path = registry.resolve_weights("akamaster/resnet56")
  assert path.startswith(shared_data) and not (tmp_path / "cache").exists()


def test_dataset_archive_download_gives_the_same_arrays(server, isolated, test_records):
  """A small archive in the official cifar-10-batches-bin layout, fetched and unpacked."""
  url, www, _ = server
  raw = open(test_records, "rb").read()
  buffer = io.BytesIO()
  with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
    for name, chunk in [(f"data_batch_{i}.bin", raw[(i - 1) * 3073 * 20:i * 3073 * 20])
                        for i in range(1, 6)] + [("test_batch.bin", raw[:3073 * 50])]:
      info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
      info.size = len(chunk)
      tar.addfile(info, io.BytesIO(chunk))
  (www / "small.tar.gz").write_bytes(buffer.getvalue())
  artifact = registry.Artifact("small-cifar.tar.gz", f"{url}/small.tar.gz",
                               hashlib.sha256(buffer.getvalue()).hexdigest(),
                               "cifar10/small-cifar", extract=True)
  folder = registry.fetch(artifact)
  train = data.load_dataset(folder, "train")
  images, labels = data.read_cifar_records(test_records)
  np.testing.assert_array_equal(train.images, images[:100])
  np.testing.assert_array_equal(train.labels, labels[:100])
  assert registry.fetch(artifact) == folder  # unpacked once, then from the cache
  assert sorted(os.listdir(isolated)) == ["small-cifar", "small-cifar.tar.gz"]


def test_unknown_names():
  with pytest.raises(BlockDropError, match="unknown weights 'akamaster/resnet99'"):
    registry.resolve_weights("akamaster/resnet99")
  with pytest.raises(BlockDropError, match="unknown dataset"):
    registry.resolve_dataset("mnist")
