"""Datasets: the built-in `digits`, a CIFAR-10 npz folder, and image-folder trees.

Every dataset yields (float image tensor CxHxW normalised, int label) and comes with its class
names and normalisation, which the run directory records for export and serving.
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms import v2

from glit_deploy.errors import DataError

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
VAL_FRACTION = 0.1
SPLIT_SEED = 0


@dataclass
class DataBundle:
    """A dataset ready for training: train and validation splits plus what export needs."""

    name: str
    train: Dataset
    val: Dataset
    calib: Dataset  # training images without augmentation, for BatchNorm recalibration
    class_names: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: int
    flip: bool = True  # horizontal flips are label-preserving (not for digits)
    pad: int = 4  # random-crop padding of in-memory arrays

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "num_classes": self.num_classes, "class_names": self.class_names,
                "mean": list(self.mean), "std": list(self.std), "image_size": self.image_size,
                "train_size": len(self.train), "val_size": len(self.val)}


class ArrayDataset(Dataset):
    """uint8 NHWC images in memory, transformed on access."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: v2.Transform) -> None:
        self.images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)  # N,C,H,W uint8
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[index]), int(self.labels[index])


def stratified_split(labels: Sequence[int], val_fraction: float = VAL_FRACTION, seed: int = SPLIT_SEED
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic per-class split: the same indices on every machine for the same labels."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train_idx, val_idx = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_val = max(1, round(len(idx) * val_fraction)) if len(idx) > 1 else 0
        val_idx.append(idx[:n_val])
        train_idx.append(idx[n_val:])
    return np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(val_idx))


def _array_transforms(image_size: int, mean: Sequence[float], std: Sequence[float], augment: bool,
                      pad: int) -> v2.Transform:
    ops: list[v2.Transform] = []
    if augment:
        ops += [v2.RandomCrop(image_size, padding=pad, padding_mode="reflect"), v2.RandomHorizontalFlip()]
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(ops)


def _array_bundle(name: str, images: np.ndarray, labels: np.ndarray, class_names: list[str],
                  mean: Sequence[float], std: Sequence[float], image_size: int, flip: bool, pad: int) -> DataBundle:
    train_idx, val_idx = stratified_split(labels)
    train_tf = _array_transforms(image_size, mean, std, augment=True, pad=pad)
    if not flip:  # digits are not mirror-symmetric
        train_tf = v2.Compose([t for t in train_tf.transforms if not isinstance(t, v2.RandomHorizontalFlip)])
    eval_tf = _array_transforms(image_size, mean, std, augment=False, pad=pad)
    return DataBundle(
        name=name,
        train=ArrayDataset(images[train_idx], labels[train_idx], train_tf),
        val=ArrayDataset(images[val_idx], labels[val_idx], eval_tf),
        calib=ArrayDataset(images[train_idx], labels[train_idx], eval_tf),
        class_names=class_names, mean=tuple(mean), std=tuple(std), image_size=image_size, flip=flip, pad=pad,
    )


def load_digits_bundle(image_size: int = 8) -> DataBundle:
    """scikit-learn's 1,797 8x8 handwritten digits (shipped in its wheel), as RGB uint8."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    gray = np.clip(digits.images * 16, 0, 255).astype(np.uint8)  # 0..16 -> 0..255
    images = np.repeat(gray[..., None], 3, axis=-1)
    if image_size != 8:
        raise DataError(f"digits images are 8x8; the search space asks for {image_size} px")
    mean = float(images.mean() / 255)
    std = float(images.std() / 255)
    return _array_bundle("digits", images, digits.target, [str(i) for i in range(10)],
                         (mean,) * 3, (std,) * 3, image_size, flip=False, pad=1)


def load_cifar10_bundle(root: Path, image_size: int = 32) -> DataBundle:
    """The npz layout of shared/data/cifar10: train_*.npz with images, labels, class_names."""
    if not root.is_dir():
        raise DataError(f"CIFAR-10 folder {root} does not exist")
    files = sorted(root.glob("train_*.npz"))
    if not files:
        raise DataError(f"CIFAR-10 folder {root} holds no train_*.npz files")
    images, labels, class_names = [], [], None
    for f in files:
        try:
            with np.load(f, allow_pickle=False) as z:
                images.append(z["images"])
                labels.append(z["labels"])
                class_names = [str(c) for c in z["class_names"]] if "class_names" in z else class_names
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
            raise DataError(f"{f} is not a valid CIFAR-10 npz file ({exc})") from None
    x, y = np.concatenate(images), np.concatenate(labels)
    if x.ndim != 4 or x.shape[1:] != (32, 32, 3) or x.dtype != np.uint8 or len(x) != len(y):
        raise DataError(f"{root}: expected uint8 images of shape (N, 32, 32, 3), got {x.dtype} {x.shape}")
    if image_size != 32:
        raise DataError(f"CIFAR-10 images are 32x32; the search space asks for {image_size} px")
    names = class_names or [str(i) for i in range(int(y.max()) + 1)]
    return _array_bundle("cifar10", x, y, names, CIFAR10_MEAN, CIFAR10_STD, image_size, flip=True, pad=4)


def load_image_folder_bundle(root: Path, image_size: int) -> DataBundle:
    """`root/train/<class>/*.jpg` and optionally `root/val/<class>/*`; else a val split of train."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_dataset, create_transform

    if not root.is_dir():
        raise DataError(f"dataset folder {root} does not exist")
    train_root = root / "train" if (root / "train").is_dir() else root
    val_root = root / "val" if (root / "val").is_dir() else None
    mean, std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    train_tf = create_transform(image_size, is_training=True, mean=mean, std=std)
    eval_tf = create_transform(image_size, is_training=False, mean=mean, std=std, crop_pct=1.0)
    try:
        train_ds = create_dataset("", root=str(train_root), split="train", is_training=True, transform=train_tf)
    except Exception as exc:  # timm raises several kinds for an unreadable tree
        raise DataError(f"{train_root} is not an image-folder tree (class folders of images): {exc}") from None
    class_names = _folder_class_names(train_ds)
    if len(train_ds) == 0 or not class_names:
        raise DataError(f"{train_root} holds no images in class folders")
    if val_root is not None:
        val_ds = create_dataset("", root=str(val_root), split="validation", transform=eval_tf)
        if _folder_class_names(val_ds) != class_names:
            raise DataError(f"{val_root} has other class folders than {train_root}")
        calib = create_dataset("", root=str(train_root), split="train", transform=eval_tf)
        return DataBundle(root.name, train_ds, val_ds, calib, class_names, tuple(mean), tuple(std), image_size,
                          flip=True, pad=0)
    targets = [t for _, t in train_ds.reader.samples]
    train_idx, val_idx = stratified_split(targets)
    plain = create_dataset("", root=str(train_root), split="train", transform=eval_tf)
    return DataBundle(root.name, Subset(train_ds, train_idx.tolist()), Subset(plain, val_idx.tolist()),
                      Subset(plain, train_idx.tolist()), class_names, tuple(mean), tuple(std), image_size,
                      flip=True, pad=0)


def _folder_class_names(ds: Any) -> list[str]:
    class_to_idx = getattr(ds.reader, "class_to_idx", {})
    return [name for name, _ in sorted(class_to_idx.items(), key=lambda kv: kv[1])]


def deit_train_transform(bundle: DataBundle, auto_augment: str | None, re_prob: float) -> Any:
    """The DeiT training augmentation through timm: RandAugment and random erasing on top of the
    dataset's own crop/flip. In-memory arrays go through PIL for timm's RandAugment."""
    from timm.data import create_transform
    from timm.data.auto_augment import rand_augment_transform
    from timm.data.random_erasing import RandomErasing

    if not isinstance(_base_dataset(bundle.train), ArrayDataset):
        return create_transform(bundle.image_size, is_training=True, auto_augment=auto_augment, re_prob=re_prob,
                                mean=bundle.mean, std=bundle.std, hflip=0.5 if bundle.flip else 0.0)
    ops: list[Any] = [v2.RandomCrop(bundle.image_size, padding=bundle.pad, padding_mode="reflect")]
    if bundle.flip:
        ops.append(v2.RandomHorizontalFlip())
    if auto_augment:
        # magnitude_max just under 10: at 10, timm's increasing posterize keeps 0 bits, which Pillow rejects
        hparams = {"translate_const": int(bundle.image_size * 0.45), "magnitude_max": 9.9,
                   "img_mean": tuple(round(255 * m) for m in bundle.mean)}
        ops += [v2.ToPILImage(), rand_augment_transform(auto_augment, hparams), v2.PILToTensor()]
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(bundle.mean), list(bundle.std))]
    if re_prob > 0:
        ops.append(RandomErasing(re_prob, mode="pixel", device="cpu"))
    return v2.Compose(ops)


def set_train_transform(bundle: DataBundle, transform: Any) -> None:
    _base_dataset(bundle.train).transform = transform


def _base_dataset(dataset: Dataset) -> Dataset:
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset


def load_data(spec: str, image_size: int) -> DataBundle:
    """`digits`, `cifar10:DIR` or an image-folder `DIR`."""
    if spec == "digits":
        return load_digits_bundle(image_size)
    if spec.startswith("cifar10:"):
        return load_cifar10_bundle(Path(spec.split(":", 1)[1]).expanduser(), image_size)
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(f"dataset '{spec}' not found: use 'digits', 'cifar10:DIR' or an image-folder DIR")
    return load_image_folder_bundle(path, image_size)


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int = 0, workers: int = 0,
                drop_last: bool = False, rank: int = 0, world_size: int = 1) -> DataLoader:
    """A loader whose order depends only on (seed, epoch via set_epoch) and the rank."""
    sampler = None
    if world_size > 1:
        sampler = torch.utils.data.distributed.DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        shuffle = False
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler, num_workers=workers,
                      drop_last=drop_last, generator=generator, persistent_workers=False)
