"""An offline Cloud Storage server for bucket workdirs: gcp-storage-emulator's JSON API in a
thread of the test process, and the environment that sends every client a run uses to it (gcsfs
for epath, tensorstore for orbax's checkpoints, google-cloud-storage for TensorBoard)."""

import contextlib
import logging
import socket


@contextlib.contextmanager
def serving(bucket: str):
  """Yields the environment variables that point a process's clients at a fresh in-memory server
  holding an empty ``bucket``."""
  from gcp_storage_emulator import server
  from gcp_storage_emulator.exceptions import NotFound
  from gcp_storage_emulator.handlers import objects

  download = objects.download

  def download_with_generation(request, response, storage, *args, **kwargs):
    # The emulator sends an object's generation only in its metadata; tensorstore (orbax's OCDBT
    # manifests) reads it from the media download's header, as Cloud Storage sends it.
    download(request, response, storage, *args, **kwargs)
    with contextlib.suppress(NotFound):
      stored = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
      response["x-goog-generation"] = stored["generation"]
      response["x-goog-metageneration"] = stored["metageneration"]

  with socket.socket() as probe:
    probe.bind(("localhost", 0))
    port = probe.getsockname()[1]
  logging.getLogger("gcp_storage_emulator").setLevel(logging.WARNING)
  objects.download = download_with_generation
  emulator = server.create_server("localhost", port, in_memory=True, default_bucket=bucket)
  emulator.start()
  url = f"http://localhost:{port}"
  try:
    yield {"STORAGE_EMULATOR_HOST": url,  # gcsfs and google-cloud-storage
           "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
           # gcsfs would otherwise ask the (absent) control API for each bucket's type
           "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
  finally:
    emulator.stop()
    objects.download = download
