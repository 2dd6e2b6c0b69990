import os
import pickle
import threading

import jax
import numpy as np
import pytest

from blockdrop_jax import BlockDropError, data


def test_subset_records_decode_as_documented(test_records, train_records):
  images, labels = data.read_cifar_records(test_records)
  assert images.shape == (1000, 32, 32, 3) and images.dtype == np.uint8
  assert labels[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
  assert images[0, 0, 0].tolist() == [158, 112, 49]
  assert np.bincount(labels).tolist() == [103, 89, 100, 103, 90, 86, 112, 102, 106, 109]
  images, labels = data.read_cifar_records(train_records)
  assert labels[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
  assert images[0, 0, 0].tolist() == [59, 62, 63]


def test_truncated_file_is_refused(tmp_path, test_records):
  bad = tmp_path / "bad.bin"
  bad.write_bytes(open(test_records, "rb").read()[:3073 * 2 + 5])
  with pytest.raises(BlockDropError, match="not a whole number of 3073-byte cifar10 records"):
    data.load_dataset(str(bad))


def test_missing_source_is_refused():
  with pytest.raises(BlockDropError, match="data not found"):
    data.load_dataset("/nonexistent/test_batch.bin")


def test_official_folder_layouts_give_the_same_arrays(tmp_path, test_records):
  images, labels = data.read_cifar_records(test_records)
  raw = open(test_records, "rb").read()
  binary = tmp_path / "cifar-10-batches-bin"
  python = tmp_path / "cifar-10-batches-py"
  binary.mkdir(), python.mkdir()
  for i in range(1, 6):  # five training batches of 100 records each
    (binary / f"data_batch_{i}.bin").write_bytes(raw[(i - 1) * 100 * 3073: i * 100 * 3073])
    chunk = slice((i - 1) * 100, i * 100)
    batch = {b"data": images[chunk].transpose(0, 3, 1, 2).reshape(100, -1), b"labels": labels[chunk].tolist()}
    (python / f"data_batch_{i}").write_bytes(pickle.dumps(batch))
  (binary / "test_batch.bin").write_bytes(raw)
  (python / "test_batch").write_bytes(pickle.dumps({b"data": images.transpose(0, 3, 1, 2).reshape(1000, -1),
                                                    b"labels": labels.tolist()}))
  for folder in (binary, python):
    train = data.load_dataset(str(folder), "train")
    np.testing.assert_array_equal(train.images, images[:500])
    np.testing.assert_array_equal(train.labels, labels[:500])
    test = data.load_dataset(str(folder), "test")
    np.testing.assert_array_equal(test.images, images)
    assert test.labels.dtype == np.int32 and test.num_classes == 10


def test_python_batches_with_code_are_refused(tmp_path):
  (tmp_path / "evil").write_bytes(pickle.dumps({b"data": os.system}))
  with pytest.raises(BlockDropError, match="refusing to unpickle"):
    data.load_dataset(str(tmp_path / "evil"))


def test_cifar100_records_use_the_fine_label(tmp_path):
  record = np.zeros((2, 3074), np.uint8)
  record[:, 0], record[:, 1], record[1, 2] = [3, 4], [57, 99], 200
  path = tmp_path / "train.bin"
  record.tofile(path)
  ds = data.load_dataset(str(path), dataset="cifar100")
  assert ds.labels.tolist() == [57, 99] and ds.num_classes == 100 and ds.images[1, 0, 0, 0] == 200


def test_augmentation_is_deterministic_and_a_padded_crop_or_flip():
  images = jax.random.uniform(jax.random.key(0), (16, 32, 32, 3))
  def augment(key):  # as the training steps do (steps.training_inputs)
    return data.apply_crop_flip(images, *data.crop_flip_draws(key, 16, 8), pad=4)

  a = augment(jax.random.key(1))
  np.testing.assert_array_equal(a, augment(jax.random.key(1)))
  assert not np.array_equal(a, augment(jax.random.key(2)))
  padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
  for img, src in zip(np.asarray(a), padded):
    windows = [src[i:i + 32, j:j + 32] for i in range(9) for j in range(9)]
    assert any(np.array_equal(img, w) or np.array_equal(img, w[:, ::-1]) for w in windows)


def test_imagenet_transform_sizes():
  image = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
  resized = data.preprocess_imagenet(image)
  assert resized.shape == (224, 224, 3)
  # The shorter side went to 256 (300 x 400 -> 256 x 341), then its centre 224 x 224.
  from PIL import Image
  full = np.asarray(Image.fromarray(image).resize((341, 256), Image.BILINEAR))
  np.testing.assert_array_equal(resized, full[16:240, 58:282])


def test_epoch_order_is_a_function_of_seed_and_epoch():
  np.testing.assert_array_equal(data.epoch_order(0, 3, 100), data.epoch_order(0, 3, 100))
  assert sorted(data.epoch_order(0, 3, 100)) == list(range(100))
  assert not np.array_equal(data.epoch_order(0, 3, 100), data.epoch_order(0, 4, 100))


def test_prefetched_loads_the_next_item_while_the_current_one_is_used():
  next_started = threading.Event()

  def load(i):
    if i == 1:
      next_started.set()
    if i == 3:
      raise BlockDropError("cannot decode item 3")
    return i * 10

  items = data.prefetched(load, range(5))
  assert next(items) == 0
  assert next_started.wait(10), "item 1 should load while the caller holds item 0"
  assert next(items) == 10
  assert next(items) == 20
  with pytest.raises(BlockDropError, match="item 3"):
    next(items)
  assert list(data.prefetched(load, [])) == []
