"""ImageNet-style image folders and TFDS's imagenet2012 stream from disk through the same trainer
and evaluation."""

import glob
import json
import os

import numpy as np
import pytest

from blockdrop_jax import checkpoint, configs, data, trainer
from blockdrop_jax.errors import BlockDropError
from conftest import load_benchmark

CLASSES = ("n01440764", "n01443537", "n01484850")  # ImageNet's first three synsets


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
  """train/ and val/ with one subfolder per class of JPEGs of assorted sizes."""
  from PIL import Image
  root = tmp_path_factory.mktemp("imagenet")
  rng = np.random.default_rng(0)
  for split, per_class in (("train", 4), ("val", 2)):
    for label, name in enumerate(CLASSES):
      os.makedirs(root / split / name)
      for i in range(per_class):
        h, w = rng.integers(230, 330, 2)
        pixels = (rng.random((h, w, 3)) * 80 + 60 * label).astype(np.uint8)
        Image.fromarray(pixels).save(root / split / name / f"{name}_{i}.JPEG", quality=95)
  (root / "train" / CLASSES[0] / "notes.txt").write_text("not an image")
  return root


def test_image_folder_streams_lazily(image_folder):
  train = data.load_dataset(str(image_folder), "train")
  assert isinstance(train.images, data.LazyImages) and train.num_classes == 3
  assert train.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4  # sorted class folders
  assert train.images.shape == (12, 256, 256, 3)
  batch = train.images[np.array([0, 11])]
  assert batch.shape == (2, 256, 256, 3) and batch.dtype == np.uint8
  assert batch[1].mean() > batch[0].mean() + 60  # the class-2 image is the brighter one
  head = train.head(5)
  assert isinstance(head.images, data.LazyImages) and len(head) == 5
  np.testing.assert_array_equal(head.images[4], train.images[4])
  val = data.load_dataset(str(image_folder), "val")
  assert val.images.shape == (6, 224, 224, 3) and val.images[:].shape == (6, 224, 224, 3)


def test_empty_or_broken_folders_are_clear_errors(tmp_path, image_folder):
  with pytest.raises(BlockDropError, match="holds no images in class subfolders"):
    data.load_dataset(str(tmp_path), "train")
  broken = tmp_path / "broken" / "train" / "n01"
  os.makedirs(broken)
  (broken / "bad.JPEG").write_bytes(b"not a jpeg")
  with pytest.raises(BlockDropError, match="cannot decode image .*bad.JPEG"):
    data.load_dataset(str(tmp_path / "broken"), "train").images[:1]


@pytest.fixture(scope="module")
def imagenet_tfds(image_folder, tmp_path_factory):
  """The image folder's files as TFDS's imagenet2012, prepared offline by its own builder."""
  import tfds_offline
  folder = tmp_path_factory.mktemp("tfds")
  return tfds_offline.prepare_imagenet2012(str(image_folder), str(folder / "manual"),
                                           str(folder / "data"))


def test_tfds_imagenet2012_gives_the_image_folders_arrays(image_folder, imagenet_tfds):
  """The same JPEGs through TFDS and through the folder: the same preprocessed images, in the
  folder's order (TFDS's shuffle undone by file name); validation labels from TFDS's own list."""
  train = data.load_dataset("tfds:imagenet2012", "train", data_dir=imagenet_tfds)
  folder_train = data.load_dataset(str(image_folder), "train")
  assert isinstance(train.images, data.LazyImages) and train.num_classes == 1000
  np.testing.assert_array_equal(train.labels, folder_train.labels)  # synsets 0, 1, 2
  np.testing.assert_array_equal(train.images[:], folder_train.images[:])
  validation = data.load_dataset("tfds:imagenet2012", "validation", data_dir=imagenet_tfds)
  assert validation.labels.tolist() == [65, 970, 230, 809, 516, 57]  # ILSVRC2012_val_00000001..6
  np.testing.assert_array_equal(validation.images[:],
                                data.load_dataset(str(image_folder), "val").images[:])
  with pytest.raises(BlockDropError, match="has no split 'test'; it has train, validation"):
    data.load_dataset("tfds:imagenet2012", "test", data_dir=imagenet_tfds)


def test_tfds_imagenet2012_opens_from_its_cached_index(imagenet_tfds):
  """The first opening reads every record once and caches order and labels beside the dataset;
  later ones read that index only (here altered, to show that it is what they read)."""
  first = data.load_dataset("tfds:imagenet2012", "validation", data_dir=imagenet_tfds)
  [index] = glob.glob(os.path.join(imagenet_tfds, "imagenet2012", "*",
                                   "blockdrop_index_validation.npz"))
  cached = dict(np.load(index))
  np.testing.assert_array_equal(cached["labels"], first.labels)
  try:
    np.savez(index, order=cached["order"][::-1], labels=cached["labels"][::-1] + 1)
    again = data.load_dataset("tfds:imagenet2012", "validation", data_dir=imagenet_tfds)
    np.testing.assert_array_equal(again.labels, first.labels[::-1] + 1)
    np.testing.assert_array_equal(again.images[:1], first.images[-1:])
  finally:
    np.savez(index, **cached)


def test_r101_config_trains_and_evaluates_on_tfds_imagenet2012(imagenet_tfds, tmp_path, capsys):
  """The R101_ImgNet config's pipeline (random 224 crops of 256 images, policy at 112 px) on
  ``tfds:imagenet2012``, with a random ResNet-10 base so it runs in seconds: joint finetuning (the
  curriculum's step at 224 px is tests/test_step_parity.py's), and evaluate.py on the run."""
  import jax
  from blockdrop_jax import safetensors_file
  from blockdrop_jax.models import resnet
  from test_evaluate_cli import evaluate_in_process
  spec = resnet.make_spec("imagenet_resnet10", num_classes=1000)
  base = str(tmp_path / "resnet10.safetensors")
  safetensors_file.save_safetensors(base, resnet.init(spec, jax.random.key(0)), spec, layout="torchvision")
  config = configs.load("r101_imgnet" + ":smoke", [
      "--config.data.train=tfds:imagenet2012", "--config.data.test=tfds:imagenet2012",
      "--config.data.test_split=validation", f"--config.data.data_dir={imagenet_tfds}",
      f"--config.base.checkpoint={base}", "--config.base.arch=", "--config.base.num_classes=1000",
      "--config.policy_init=",  # test_imagenet_policy_starts_from_resnet18_layers has that
      "--config.stages=finetune", "--config.finetune.batch_size=8",
      "--config.data.test_limit=0"])
  run = str(tmp_path / "run")
  metrics = trainer.train(config, run, progress=False)
  assert metrics["stage"] == "finetune" and 0.0 <= metrics["test_accuracy"] <= 1.0
  assert 0 <= metrics["test_blocks_mean"] <= 4  # ResNet-10: K = 4
  nets = checkpoint.load_run(run)[0]
  assert nets.resnet.image_size == 224 and nets.policy.input_pool == 2
  out = tmp_path / "evaluated.json"
  assert evaluate_in_process("--checkpoint", run, "--data", "tfds:imagenet2012", "--split",
                             "validation", "--data_dir", imagenet_tfds, "--json", str(out)) == 0
  evaluated = json.loads(out.read_text())
  assert len(evaluated["predictions"]) == 6
  assert evaluated["accuracy"] == pytest.approx(metrics["test_accuracy"])
  # The speed benchmark times CIFAR runs on 32 px images: a 224 px run is one clear error.
  with pytest.raises(SystemExit) as exit_info:
    load_benchmark("speed").main(["--checkpoint", run])
  assert exit_info.value.code == 2
  assert "is a run on 224 px images" in capsys.readouterr().err


def test_imagenet_policy_starts_from_resnet18_layers(tmp_path):
  """As the original's Policy224: the stem and the first block of each stage (downsample
  included) from an ImageNet ResNet-18 file; the classifier stays its own."""
  import jax
  from blockdrop_jax import convert, safetensors_file
  from blockdrop_jax.models import resnet
  donor_spec = resnet.make_spec("imagenet_resnet18")
  donor = resnet.init(donor_spec, jax.random.key(1))
  path = str(tmp_path / "resnet18.safetensors")
  safetensors_file.save_safetensors(path, donor, donor_spec, layout="torchvision")
  policy_spec = resnet.policy_spec(resnet.make_spec("imagenet_resnet101"))
  fresh = resnet.init(policy_spec, jax.random.key(2))
  started = convert.policy_from_resnet(policy_spec, fresh, path)
  for collection in ("params", "batch_stats"):
    for ours, theirs in (("stem_conv", "stem_conv"), ("stem_bn", "stem_bn"), ("block0", "block0"),
                         ("block1", "block2"), ("block2", "block4"), ("block3", "block6")):
      if ours in started[collection]:
        jax.tree.map(np.testing.assert_array_equal, started[collection][ours],
                     donor[collection][theirs])
  assert "shortcut_conv" in started["params"]["block1"]  # the downsample of stage 2
  np.testing.assert_array_equal(started["params"]["fc"]["kernel"], fresh["params"]["fc"]["kernel"])
  with pytest.raises(BlockDropError, match="cannot start the imagenet_resnet10 policy network"):
    cifar = resnet.make_spec("cifar_resnet20")
    cifar_path = str(tmp_path / "cifar.safetensors")
    safetensors_file.save_safetensors(cifar_path, resnet.init(cifar, jax.random.key(0)), cifar)
    convert.policy_from_resnet(policy_spec, fresh, cifar_path)
