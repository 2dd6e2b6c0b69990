"""Prepared TFDS datasets built offline from local files, as TFDS stores its own: ``cifar10``
with its builder's feature spec, version, example keys and ids, written by TFDS's writer
(``store_as_tfds_dataset``, which shuffles by key as every TFDS builder does) in ArrayRecord files;
``imagenet2012`` prepared by TFDS's own builder from archives in the official layout."""

import io
import os
import tarfile

from blockdrop_jax import data


def prepare_cifar10(records: dict, data_dir: str) -> str:
  """``records``: {split: CIFAR-10 record file}; example i of a split gets key i and id
  ``{split}_{i:05d}``, as TFDS's cifar10 builder numbers the official files' records."""
  import tensorflow_datasets as tfds
  features = tfds.builder("cifar10", data_dir=data_dir).info.features
  splits = {}
  for split, path in records.items():
    images, labels = data.read_cifar_records(path)
    splits[split] = [(i, {"id": f"{split}_{i:05d}", "image": images[i], "label": int(labels[i])})
                     for i in range(len(labels))]
  tfds.dataset_builders.store_as_tfds_dataset(
      name="cifar10", version="3.0.2", features=features, split_datasets=splits,
      data_dir=data_dir, file_format="array_record")
  return data_dir


def _tar(members: dict) -> bytes:
  buffer = io.BytesIO()
  with tarfile.open(fileobj=buffer, mode="w") as archive:
    for name, payload in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(payload)
      archive.addfile(info, io.BytesIO(payload))
  return buffer.getvalue()


def prepare_imagenet2012(image_folder: str, manual_dir: str, data_dir: str):
  """The ``train/<synset>/*.JPEG`` and ``val/*/*.JPEG`` files of an image folder packed as the
  official ILSVRC2012 archives (``ILSVRC2012_img_train.tar`` of one tar per synset,
  ``ILSVRC2012_img_val.tar`` of ``ILSVRC2012_val_%08d.JPEG``, labelled by TFDS's own list), then
  prepared by TFDS's ``imagenet2012`` builder from that manual-download folder."""
  import tensorflow_datasets as tfds

  def read(path):
    with open(path, "rb") as f:
      return f.read()

  train = os.path.join(image_folder, "train")
  per_synset = {f"{synset}.tar": _tar({name: read(os.path.join(train, synset, name))
                                       for name in sorted(os.listdir(os.path.join(train, synset)))
                                       if name.endswith(".JPEG")})
                for synset in sorted(os.listdir(train))}
  val = sorted(os.path.join(root, name) for root, _, names in os.walk(
      os.path.join(image_folder, "val")) for name in names if name.endswith(".JPEG"))
  os.makedirs(manual_dir, exist_ok=True)
  with open(os.path.join(manual_dir, "ILSVRC2012_img_train.tar"), "wb") as f:
    f.write(_tar(per_synset))
  with open(os.path.join(manual_dir, "ILSVRC2012_img_val.tar"), "wb") as f:
    f.write(_tar({f"ILSVRC2012_val_{i:08d}.JPEG": read(path) for i, path in enumerate(val, 1)}))
  tfds.builder("imagenet2012", data_dir=data_dir).download_and_prepare(
      file_format="array_record",
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return data_dir
