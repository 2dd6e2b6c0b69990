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
    n = min(n, len(self))
    images = self.images.take(range(n)) if isinstance(self.images, LazyImages) else self.images[:n]
    return dataclasses.replace(self, images=images, labels=self.labels[:n])


class LazyImages:
  """Image files decoded on demand, behind the indexing of a uint8 (N, crop, crop, 3) array:
  ``images[indices]`` decodes just those files (in threads), so ImageNet-sized data streams
  through the same trainer and evaluation code as in-memory CIFAR.

  Each image: shorter side resized to ``resize``, then the centre ``crop`` x ``crop``."""

  dtype = np.dtype(np.uint8)
  ndim = 4

  def __init__(self, paths, resize: int, crop: int, threads: int = 8):
    self.paths, self.resize, self.crop, self.threads = list(paths), resize, crop, threads

  @property
  def shape(self) -> tuple[int, int, int, int]:
    return (len(self.paths), self.crop, self.crop, 3)

  def __len__(self) -> int:
    return len(self.paths)

  def take(self, indices) -> "LazyImages":
    return LazyImages([self.paths[i] for i in indices], self.resize, self.crop, self.threads)

  def _decode(self, path: str) -> np.ndarray:
    from PIL import Image
    try:
      with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))
    except OSError as e:
      raise BlockDropError(f"cannot decode image {path} ({e}); remove or replace the file") from e
    return preprocess_imagenet(pixels, None, self.resize, self.crop)

  def __getitem__(self, index) -> np.ndarray:
    if isinstance(index, (int, np.integer)):
      return self._decode(self.paths[index])
    indices = range(len(self))[index] if isinstance(index, slice) else np.asarray(index).reshape(-1)
    with concurrent.futures.ThreadPoolExecutor(self.threads) as pool:
      decoded = list(pool.map(self._decode, [self.paths[i] for i in indices]))
    return np.stack(decoded) if decoded else np.zeros((0, *self.shape[1:]), np.uint8)

  def __array__(self, dtype=None, copy=None):
    return self[:].astype(dtype or np.uint8)


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
  crop = IMAGENET_RESIZE if split == "train" else IMAGENET_CROP
  return Dataset(LazyImages(paths, IMAGENET_RESIZE, crop), np.asarray(labels, np.int32),
                 len(classes), folder)


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
  ``cifar-100-binary``/``-python`` folder, or an image folder), a name (``cifar10``, ``cifar100``: the official binary
  archive from the offline data folder, the cache, or downloaded; see ``registry``), or
  ``tfds:cifar10`` / ``tfds:cifar100`` (TFDS, with ``data_dir`` and ``download``). All give uint8
  NHWC images and int32 labels; files, folders and names keep the official record order, TFDS
  keeps the order of its prepared dataset (the same images, shuffled by TFDS). A single file is
  one split already, so ``split`` is ignored for it.
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
  if source.removeprefix("tfds:") in _RECORDS and source.startswith("tfds:"):
    return _load_tfds(source.removeprefix("tfds:"), split, data_dir, download)
  raise BlockDropError(
      f"data not found: {source!r} is neither a file, a folder (CIFAR or <split>/<class>/images), "
      "nor a dataset name (cifar10, cifar100, tfds:cifar10, tfds:cifar100)")


def _load_tfds(name: str, split: str, data_dir: Optional[str], download: bool) -> Dataset:
  try:
    import tensorflow_datasets as tfds
    source = tfds.data_source(name, split=split, data_dir=data_dir, download=download)
    examples = [source[i] for i in range(len(source))]
  except Exception as e:  # TFDS raises many types for a missing or unprepared dataset
    raise BlockDropError(
        f"TFDS could not provide {name}/{split} ({type(e).__name__}: {str(e)[:200]}); "
        "pass a prepared data_dir, allow download, or give a local CIFAR file or folder") from e
  images = np.stack([np.asarray(ex["image"], np.uint8) for ex in examples])
  labels = np.asarray([ex["label"] for ex in examples], np.int32)
  return Dataset(images, labels, _RECORDS[name][2], f"tfds:{name}/{split}")


def to_unit_float(images) -> jax.Array:
  """uint8 pixels -> float32 in [0, 1]."""
  return jnp.asarray(images, jnp.float32) / 255.0


def augment_cifar(key: jax.Array, images: jax.Array, pad: int = 4) -> jax.Array:
  """Random crop with ``pad`` zero pixels on each side, then random horizontal flip (per image)."""
  return apply_crop_flip(images, *crop_flip_draws(key, images.shape[0], 2 * pad), pad=pad)


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


def preprocess_imagenet(image: np.ndarray, rng: Optional[np.random.Generator] = None,
                        resize: int = 256, crop: int = 224) -> np.ndarray:
  """ImageNet transform: shorter side to ``resize``; random crop + flip with ``rng``, else center."""
  from PIL import Image
  pil = Image.fromarray(np.asarray(image, np.uint8))
  scale = resize / min(pil.size)
  pil = pil.resize((max(crop, round(pil.size[0] * scale)), max(crop, round(pil.size[1] * scale))),
                   Image.BILINEAR)
  arr = np.asarray(pil)
  h, w = arr.shape[:2]
  if rng is None:
    top, left = (h - crop) // 2, (w - crop) // 2
  else:
    top, left = rng.integers(0, h - crop + 1), rng.integers(0, w - crop + 1)
  arr = arr[top:top + crop, left:left + crop]
  return arr[:, ::-1] if rng is not None and rng.random() < 0.5 else arr


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
