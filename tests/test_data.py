from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from glit_deploy.data import check_same_dataset, load_data, stratified_split
from glit_deploy.errors import DataError

from .conftest import CIFAR_DIR


def test_digits_split_is_deterministic_and_stratified() -> None:
    a, b = load_data("digits", 8), load_data("digits", 8)
    assert len(a.train) + len(a.val) == 1797
    assert 170 <= len(a.val) <= 190
    assert a.class_names == [str(i) for i in range(10)]
    assert np.array_equal(a.val.labels.numpy(), b.val.labels.numpy())
    assert np.bincount(a.val.labels.numpy(), minlength=10).min() >= 17
    x, y = a.val[0]
    assert x.shape == (3, 8, 8) and x.dtype.is_floating_point and isinstance(y, int)


def test_stratified_split_keeps_train_and_val_apart() -> None:
    labels = np.repeat(np.arange(5), 40)
    train, val = stratified_split(labels)
    assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == 200
    assert np.all(np.bincount(labels[val]) == 4)


@pytest.mark.skipif(not CIFAR_DIR.exists(), reason="shared CIFAR-10 copy not present")
def test_cifar10_npz_folder() -> None:
    bundle = load_data(f"cifar10:{CIFAR_DIR}", 32)
    assert (len(bundle.train), len(bundle.val)) == (45_000, 5_000)
    assert np.all(np.bincount(bundle.val.labels.numpy()) == 500)
    assert bundle.class_names[0] == "airplane" and bundle.num_classes == 10
    assert bundle.train[0][0].shape == (3, 32, 32)
    recorded = bundle.describe()  # what run.json keeps: absolute, with counts and a fingerprint of the npz files
    assert recorded["spec"] == f"cifar10:{CIFAR_DIR.resolve()}" and recorded["counts"]["train"]["airplane"] == 5000
    assert len(recorded["fingerprint"]) == 32


def _write_cifar_npz(folder: Path, per_class: int = 20) -> None:
    """Two small files in the shared CIFAR-10 layout (train_N.npz: images, labels, class_names)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for n in (1, 2):
        labels = np.repeat(np.arange(10), per_class // 2)
        images = rng.integers(0, 256, (len(labels), 32, 32, 3), dtype=np.uint8)
        np.savez(folder / f"train_{n}.npz", images=images, labels=labels,
                 class_names=np.array([f"c{i}" for i in range(10)]))


def test_a_copied_cifar_folder_is_the_same_dataset_and_a_changed_one_is_not(tmp_path: Path) -> None:
    original = tmp_path / "original"
    _write_cifar_npz(original)
    recorded = load_data(f"cifar10:{original}", 32, report=False).describe()
    assert len(recorded["content_sha256"]) == 64
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in original.iterdir():
        copy.joinpath(f.name).write_bytes(f.read_bytes())  # new modification times, the same bytes
        os.utime(copy / f.name, ns=(1, 1))
    shutil.rmtree(original)
    copy.rename(original)
    current = load_data(f"cifar10:{original}", 32, report=False).describe()
    assert current["fingerprint"] != recorded["fingerprint"]
    check_same_dataset(recorded, current)  # no error: the bytes are the same

    with np.load(original / "train_2.npz") as z:
        arrays = dict(z)
    arrays["images"][0, 0, 0, 0] ^= 0xFF  # one pixel, the same counts
    np.savez(original / "train_2.npz", **arrays)
    changed = load_data(f"cifar10:{original}", 32, report=False).describe()
    with pytest.raises(DataError, match="same classes and counts, but the files' contents changed"):
        check_same_dataset(recorded, changed)
    check_same_dataset(recorded, changed, allow_change=True)  # allowed: a warning, no error


def _write_folder(root, classes=("cat", "dog"), per_class=10, size=12) -> None:
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


def test_image_folder_with_and_without_val(tmp_path) -> None:
    _write_folder(tmp_path / "a" / "train")
    bundle = load_data(str(tmp_path / "a"), 16)
    assert bundle.class_names == ["cat", "dog"]
    assert (len(bundle.train), len(bundle.val)) == (18, 2)
    assert bundle.train[0][0].shape == (3, 16, 16)
    _write_folder(tmp_path / "b" / "train")
    _write_folder(tmp_path / "b" / "val", per_class=3)
    bundle = load_data(str(tmp_path / "b"), 16)
    assert (len(bundle.train), len(bundle.val)) == (20, 6)


def test_dataset_errors(tmp_path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_data(str(tmp_path / "missing"), 32)
    with pytest.raises(DataError, match="does not exist"):
        load_data(f"cifar10:{tmp_path / 'missing'}", 32)
    with pytest.raises(DataError, match="no train_"):
        load_data(f"cifar10:{tmp_path}", 32)
    (tmp_path / "train_1.npz").write_bytes(b"not a zip file")
    with pytest.raises(DataError, match="not a valid CIFAR-10 npz"):
        load_data(f"cifar10:{tmp_path}", 32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no images|not an image-folder"):
        load_data(str(tmp_path / "empty"), 32)
    with pytest.raises(DataError, match="8x8"):
        load_data("digits", 32)
