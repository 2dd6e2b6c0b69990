"""CIFAR and ImageNet sources and augmentation.

Every source yields the same arrays: images uint8 (N, H, W, 3) in record order, labels int32 (N,).
Pixels stay uint8 until the model, which scales them to [0, 1] and normalises them with the
statistics stored beside its weights.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import os
import pickle
from typing import Callable, Iterable, Iterator, Optional, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from blockdrop_jax import registry
from blockdrop_jax.errors import BlockDropError

@dataclasses.dataclass(frozen=True)
class Dataset:
  images: np.ndarray  # uint8 (N, H, W, 3)
  labels: np.ndarray  # int32 (N,)
  num_classes: int
  source: str

  def __len__(self) -> int:
    return len(self.labels)

  def head(self, n: int) -> "Dataset":
    """The first ``n`` examples (without decoding anything for streamed images)."""
    return self.take(np.arange(min(n, len(self))))

  def take(self, indices) -> "Dataset":
    """The examples at ``indices``, in that order (nothing decoded for streamed images)."""
    indices = np.asarray(indices, np.int64)
    images = (self.images.take(indices) if isinstance(self.images, LazyImages)
              else self.images[indices])
    return dataclasses.replace(self, images=images, labels=self.labels[indices])


def split_validation(train: Dataset, size: int, seed: int) -> tuple[Dataset, Optional[Dataset]]:
  """(training, validation): ``size`` training examples drawn with ``seed`` are held out for
  choosing checkpoints, recipes and static references without the test set; the rest keep their
  order. ``size`` 0: no validation split (None)."""
  if not size:
    return train, None
  if not 0 < size < len(train):
    raise BlockDropError(f"config.data.validation = {size} must be between 0 and the {len(train)} "
                         "training images")
  held_out = np.random.default_rng([seed, 7]).permutation(len(train))[:size]
  kept = np.setdiff1d(np.arange(len(train)), held_out)
  return (dataclasses.replace(train.take(kept), source=f"{train.source} without validation"),
          dataclasses.replace(train.take(np.sort(held_out)), source=f"{train.source} validation"))


class LazyImages:
  """Images decoded on demand, behind the indexing of a uint8 (N, crop, crop, 3) array:
  ``images[indices]`` decodes just those (in threads), so ImageNet-sized data streams through
  the same trainer and evaluation code as in-memory CIFAR.

  ``keys`` are what ``read`` turns into RGB pixels (image files, or records of a TFDS dataset);
  each image: shorter side resized to ``resize``, then the centre ``crop`` x ``crop``."""

  dtype = np.dtype(np.uint8)
  ndim = 4

  def __init__(self, keys, read: Callable[[object], np.ndarray], resize: int, crop: int,
               threads: int = 8):
    self.keys, self.read = list(keys), read
    self.resize, self.crop, self.threads = resize, crop, threads

  @property
  def shape(self) -> tuple[int, int, int, int]:
    return (len(self.keys), self.crop, self.crop, 3)

  def __len__(self) -> int:
    return len(self.keys)

  def take(self, indices) -> "LazyImages":
    return LazyImages([self.keys[i] for i in indices], self.read, self.resize, self.crop,
                      self.threads)

  def _decode(self, key) -> np.ndarray:
    return preprocess_imagenet(self.read(key), self.resize, self.crop)

  def __getitem__(self, index) -> np.ndarray:
    if isinstance(index, (int, np.integer)):
      return self._decode(self.keys[index])
    indices = range(len(self))[index] if isinstance(index, slice) else np.asarray(index).reshape(-1)
    with concurrent.futures.ThreadPoolExecutor(self.threads) as pool:
      decoded = list(pool.map(self._decode, [self.keys[i] for i in indices]))
    return np.stack(decoded) if decoded else np.zeros((0, *self.shape[1:]), np.uint8)

  def __array__(self, dtype=None, copy=None):
    return self[:].astype(dtype or np.uint8)


def decode_image(encoded, name: str) -> np.ndarray:
  """RGB pixels of an image file or its bytes (JPEG, PNG)."""
  from PIL import Image
  try:
    with Image.open(io.BytesIO(encoded) if isinstance(encoded, bytes) else encoded) as image:
      return np.asarray(image.convert("RGB"))
  except OSError as e:
    raise BlockDropError(f"cannot decode image {name} ({e}); remove or replace the file") from e


def _read_image_file(path: str) -> np.ndarray:
  return decode_image(path, path)


IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
# ImageNet: training images are kept at 256 x 256 so the step can take random 224 crops; test
# images are the usual centre 224 crop of the image resized to 256.
IMAGENET_RESIZE, IMAGENET_CROP = 256, 224


def load_image_folder(root: str, split: str) -> Dataset:
  """An ImageNet-style folder: ``root/<split>/<class>/<image>`` (or ``root/<class>/<image>``),
  classes numbered in sorted folder order (torchvision's ImageFolder order, so torchvision
  weights' labels match). Images stream from disk (``LazyImages``)."""
  folder = os.path.join(root, split) if os.path.isdir(os.path.join(root, split)) else root
  classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
  paths, labels = [], []
  for label, name in enumerate(classes):
    files = sorted(f for f in os.listdir(os.path.join(folder, name))
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    paths += [os.path.join(folder, name, f) for f in files]
    labels += [label] * len(files)
  if not paths:
    raise BlockDropError(
        f"{folder} holds no images in class subfolders; an image folder is <split>/<class>/*.JPEG "
        "(e.g. ImageNet's train/n01440764/...)")
  return Dataset(LazyImages(paths, _read_image_file, IMAGENET_RESIZE, _imagenet_size(split)),
                 np.asarray(labels, np.int32), len(classes), folder)


def _imagenet_size(split: str) -> int:
  return IMAGENET_RESIZE if split == "train" else IMAGENET_CROP


# dataset -> (label bytes per record, index of the label used, classes)
_RECORDS = {"cifar10": (1, 0, 10), "cifar100": (2, 1, 100)}
_PIXELS = 32 * 32 * 3


def read_cifar_records(path: str, dataset: str = "cifar10") -> tuple[np.ndarray, np.ndarray]:
  """Images and labels of a CIFAR binary-record file (``cifar-10-batches-bin/*.bin``, CIFAR-100 ``*.bin``)."""
  label_bytes, label_index, _ = _RECORDS[dataset]
  record = label_bytes + _PIXELS
  if not os.path.isfile(path):
    raise BlockDropError(f"data file not found: {path}")
  size = os.path.getsize(path)
  if size == 0 or size % record:
    raise BlockDropError(
        f"{path} has {size} bytes, not a whole number of {record}-byte {dataset} records; "
        "the file is truncated or is not a CIFAR binary batch")
  raw = np.fromfile(path, dtype=np.uint8).reshape(-1, record)
  images = raw[:, label_bytes:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return np.ascontiguousarray(images), raw[:, label_index].astype(np.int32)


class _ArraysOnlyUnpickler(pickle.Unpickler):
  """The CIFAR python batches are pickles; allow only numpy arrays and builtins, never code."""

  _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
              ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
              ("numpy._core.multiarray", "scalar"), ("builtins", "list"), ("builtins", "dict")}

  def find_class(self, module, name):
    if (module, name) in self._ALLOWED:
      return super().find_class(module, name)
    raise BlockDropError(f"refusing to unpickle {module}.{name}: a CIFAR batch holds only arrays")


def read_cifar_python(path: str, dataset: str = "cifar10") -> tuple[np.ndarray, np.ndarray]:
  """Images and labels of a ``cifar-10-batches-py`` / ``cifar-100-python`` batch file."""
  with open(path, "rb") as f:
    try:
      batch = _ArraysOnlyUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
      raise BlockDropError(f"{path} is not a CIFAR python batch ({e})") from e
  batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
  labels = batch.get("labels", batch.get("fine_labels"))
  images = np.asarray(batch["data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return np.ascontiguousarray(images), np.asarray(labels, np.int32)


# Folder layouts of the official archives: folder marker -> (reader, dataset, files per split)
_FOLDERS = [
    ("data_batch_1.bin", read_cifar_records, "cifar10",
     {"train": [f"data_batch_{i}.bin" for i in range(1, 6)], "test": ["test_batch.bin"]}),
    ("data_batch_1", read_cifar_python, "cifar10",
     {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}),
    ("train.bin", read_cifar_records, "cifar100", {"train": ["train.bin"], "test": ["test.bin"]}),
    ("train", read_cifar_python, "cifar100", {"train": ["train"], "test": ["test"]}),
]


def load_dataset(source: str, split: str = "test", dataset: Optional[str] = None,
                 data_dir: Optional[str] = None, download: bool = False) -> Dataset:
  """CIFAR-10/100 from a record file, an official archive folder, by name, or through TFDS;
  ImageNet-style image folders (``load_image_folder``), streamed from disk.

  ``source`` is a path (a ``.bin`` record file, a ``cifar-10-batches-bin``/``-py`` or
  ``cifar-100-binary``/``-python`` folder, or an image folder), a name (``cifar10``,
  ``cifar100``: the official binary archive from the offline data folder, the cache, or
  downloaded; see ``registry``), or ``tfds:cifar10`` / ``tfds:cifar100`` / ``tfds:imagenet2012``
  (a prepared TFDS dataset in ``data_dir``, prepared there first with ``download``). All give
  uint8 NHWC images and int32 labels in the official order (TFDS's shuffled order is undone, see
  ``TFDS_DATASETS``). A single file is one split already, so ``split`` is ignored for it.
  """
  if os.path.isfile(source):
    dataset = dataset or "cifar10"
    reader = read_cifar_records if source.endswith(".bin") else read_cifar_python
    images, labels = reader(source, dataset)
    return Dataset(images, labels, _RECORDS[dataset][2], source)
  if os.path.isdir(source):
    for marker, reader, kind, files in _FOLDERS:
      if os.path.isfile(os.path.join(source, marker)):
        if split not in files:
          raise BlockDropError(f"unknown split {split!r} for {source}; use 'train' or 'test'")
        parts = [reader(os.path.join(source, name), kind) for name in files[split]]
        return Dataset(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                       _RECORDS[kind][2], source)
    return load_image_folder(source, split)
  if source in _RECORDS:
    return load_dataset(registry.resolve_dataset(source), split)
  if source.startswith("tfds:") and source.removeprefix("tfds:") in TFDS_DATASETS:
    return _load_tfds(source.removeprefix("tfds:"), split, data_dir, download)
  raise BlockDropError(
      f"data not found: {source!r} is neither a file, a folder (CIFAR or <split>/<class>/images), "
      "nor a dataset name (cifar10, cifar100, tfds:cifar10, tfds:cifar100, tfds:imagenet2012)")


# TFDS datasets -> (classes, the feature that orders the examples as the official files do).
# TFDS stores examples shuffled by a hash of their key; CIFAR's ``id`` ("train_00042": record 42
# of the official files) and ImageNet's ``file_name`` put them back in the order of the record
# files and of an image folder (classes, then files, sorted; the validation images numbered).
TFDS_DATASETS = {"cifar10": (10, "id"), "cifar100": (100, "id"), "imagenet2012": (1000, "file_name")}


def _load_tfds(name: str, split: str, data_dir: Optional[str], download: bool) -> Dataset:
  """A prepared TFDS dataset (ArrayRecord files, read with ``tfds.data_source``), in the order of
  the official files. CIFAR loads into memory; ImageNet streams (``LazyImages``) with the image
  folders' preprocessing."""
  import tensorflow_datasets as tfds
  if data_dir and not epath.Path(data_dir).is_dir():  # local, or a bucket (gs://...)
    raise BlockDropError(f"TFDS data_dir {data_dir} does not exist; create it (mkdir -p {data_dir}) "
                         f"and prepare {name} there, or pass the folder that holds {name}/")
  builder = tfds.builder(name, data_dir=data_dir or None)
  root = os.path.dirname(os.path.dirname(os.fspath(builder.data_dir)))
  if not builder.is_prepared():
    if not download:
      manual = " --manual_dir FOLDER_OF_ILSVRC2012_TARS" if name == "imagenet2012" else ""
      raise BlockDropError(
          f"tfds:{name} is not prepared in {root}; prepare it with `tfds build {name} --data_dir "
          f"{root} --file_format array_record{manual}` (pip install 'blockdrop-jax[tfds]'), or "
          "allow the download (evaluate.py --download, config.data.download=True)")
    builder.download_and_prepare(file_format="array_record")
  if split not in builder.info.splits:
    raise BlockDropError(f"tfds:{name} has no split {split!r}; it has "
                         f"{', '.join(sorted(builder.info.splits))}")
  num_classes, order_feature = TFDS_DATASETS[name]
  streamed = name == "imagenet2012"
  try:
    source = builder.as_data_source(
        split, decoders={"image": tfds.decode.SkipDecoding()} if streamed else None)
  except NotImplementedError as e:
    raise BlockDropError(
        f"tfds:{name} in {root} is prepared as {builder.info.file_format}, which TFDS cannot read "
        f"by index; prepare it again with `tfds build {name} --data_dir {root} --file_format "
        "array_record`") from e
  where = f"tfds:{name}/{split}"
  if streamed:
    order, labels = _streamed_index(source, order_feature, epath.Path(builder.data_dir), split)
    images = LazyImages(order.tolist(), lambda i: decode_image(source[i]["image"], f"{where}[{i}]"),
                        IMAGENET_RESIZE, _imagenet_size(split))
    return Dataset(images, labels, num_classes, where)
  fields = [(record[order_feature], record["label"], record["image"])
            for record in (source[i] for i in range(len(source)))]
  order = np.argsort([key for key, _, _ in fields], kind="stable")
  labels = np.asarray([fields[i][1] for i in order], np.int32)
  images = np.stack([np.asarray(fields[i][2], np.uint8) for i in order])
  return Dataset(images, labels, num_classes, where)


def _streamed_index(source, order_feature: str, folder: epath.Path,
                    split: str) -> tuple[np.ndarray, np.ndarray]:
  """(record indices in the official files' order, their labels) of a streamed TFDS split: from
  the small index cached beside the dataset (``blockdrop_index_<split>.npz``), else read from
  every record once (all of ImageNet's images pass by) and cached there for the next start."""
  index = folder / f"blockdrop_index_{split}.npz"
  if index.exists():
    with index.open("rb") as f:
      cached = np.load(f)
      if len(cached["order"]) == len(source):
        return cached["order"], cached["labels"]
  keys, labels = zip(*((record[order_feature], record["label"])
                       for record in (source[i] for i in range(len(source)))))
  order = np.argsort(keys, kind="stable")
  labels = np.asarray(labels, np.int32)[order]
  buffer = io.BytesIO()
  np.savez(buffer, order=order, labels=labels)
  partial = folder / f"{index.name}.tmp"
  try:
    partial.write_bytes(buffer.getvalue())
    partial.rename(index)  # atomic: a start that stops half-way leaves no index
  except OSError:  # a read-only dataset folder: read the records again next time
    pass
  return order, labels


def to_unit_float(images) -> jax.Array:
  """uint8 pixels -> float32 in [0, 1]."""
  return jnp.asarray(images, jnp.float32) / 255.0


def crop_flip_draws(key: jax.Array, n: int, max_offset: int = 8) -> tuple[jax.Array, jax.Array]:
  """The random part of a crop-and-flip augmentation: offsets in [0, max_offset] (n, 2), flips (n,)."""
  crop_key, flip_key = jax.random.split(key)
  return (jax.random.randint(crop_key, (n, 2), 0, max_offset + 1),
          jax.random.bernoulli(flip_key, 0.5, (n,)))


def apply_crop_flip(images: jax.Array, offsets: jax.Array, flips: jax.Array, pad: int = 4,
                    size: Optional[int] = None):
  """``size`` x ``size`` crops (default: the image size) at ``offsets`` of the zero-padded images,
  flipped where ``flips``: CIFAR pads 4 and crops 32, ImageNet crops 224 of 256 unpadded."""
  _, h, w, c = images.shape
  size = size or h
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  crops = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (size, size, c)))(
      padded, offsets)
  return jnp.where(flips[:, None, None, None], crops[:, :, ::-1, :], crops)


def center_crop(images: jax.Array, size: int) -> jax.Array:
  """The centre ``size`` x ``size`` of NHWC images (unchanged if they are that size)."""
  top, left = (images.shape[1] - size) // 2, (images.shape[2] - size) // 2
  return images[:, top:top + size, left:left + size]


def preprocess_imagenet(image: np.ndarray, resize: int = 256, crop: int = 224) -> np.ndarray:
  """How ImageNet images are stored for training and testing: shorter side to ``resize``, then
  the centre ``crop`` x ``crop`` (training steps crop and flip at random inside the step)."""
  from PIL import Image
  pil = Image.fromarray(np.asarray(image, np.uint8))
  scale = resize / min(pil.size)
  pil = pil.resize((max(crop, round(pil.size[0] * scale)), max(crop, round(pil.size[1] * scale))),
                   Image.BILINEAR)
  arr = np.asarray(pil)
  top, left = (arr.shape[0] - crop) // 2, (arr.shape[1] - crop) // 2
  return arr[top:top + crop, left:left + crop]


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
  """The shuffled example order of one epoch: a pure function of (seed, epoch), so runs resume."""
  return np.random.default_rng([seed, epoch]).permutation(n)


T = TypeVar("T")


def prefetched(load: Callable[[int], T], items: Iterable[int]) -> Iterator[T]:
  """``load(item)`` for each item in order, the next one loading in a background thread while
  the caller works on the current one: streamed images (``LazyImages``) decode while the device
  runs the step, instead of between steps. At most two loaded items exist at a time."""
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    pending = None
    for item in items:
      upcoming = pool.submit(load, item)
      if pending is not None:
        yield pending.result()
      pending = upcoming
    if pending is not None:
      yield pending.result()
