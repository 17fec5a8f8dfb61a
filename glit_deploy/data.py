"""Datasets: the built-in `digits`, a CIFAR-10 npz folder, and image-folder trees.

Every dataset yields (float image tensor CxHxW normalised, int label) and comes with its class
names and normalisation, which the run directory records for export and serving, and with its
identity (absolute spec, class counts, a fingerprint of its files' names, sizes and modification times,
and for datasets up to CONTENT_DIGEST_MAX_BYTES a digest of their bytes), which later stages compare so
that a dataset changed under the same path is reported instead of silently used, while a copy with the
same bytes (new modification times) is recognised as the same dataset.

Image folders: a class is a first-level folder of `train/` (and `val/`), holding images at any depth.
Our own reader (not timm's, which takes leaf folders as classes and a fixed list of extensions): every
format Pillow decodes, extensions in any case, one sorted scan, decoded by `glit_deploy.images` like
every other stage.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms import v2

from glit_deploy.errors import DataError, RunError
from glit_deploy.images import ImageRejected, Normaliser, load_rgb, open_image_file, preprocess

if TYPE_CHECKING:
    from glit_deploy.rundir import RunDir

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
VAL_FRACTION = 0.1
SPLIT_SEED = 0
NAMED_IN_ERRORS = 3  # how many offending files an error message names
SUMMARY_ROWS = 12  # classes listed in the loading summary before the rest are summed up
# Datasets up to this size also record a digest of their bytes: reading them costs about a second a GB here,
# and it tells a copy (new modification times, same bytes) from a change. Larger ones: names, sizes, mtimes.
CONTENT_DIGEST_MAX_BYTES = 2 * 2**30
# Formats Pillow recognises but cannot decode on its own (stub plugins, Ghostscript, no decoder): files with
# these extensions are not taken for images.
_UNDECODABLE_FORMATS = {"BUFR", "GRIB", "HDF5", "WMF", "EPS", "MPEG", "IPTC"}


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
    identity: dict[str, Any] = field(default_factory=dict)  # spec, path, counts, fingerprint (see describe)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def describe(self) -> dict[str, Any]:
        """What run.json records: enough to reload the dataset from any directory and notice a change."""
        return {"name": self.name, "num_classes": self.num_classes, "class_names": self.class_names,
                "mean": list(self.mean), "std": list(self.std), "image_size": self.image_size,
                "train_size": len(self.train), "val_size": len(self.val), **self.identity}


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


class EvalTransform:
    """A decoded RGB image -> the model input tensor: `glit_deploy.images.preprocess`, the one
    preprocessing that export parity, `glit predict` and `glit serve` use too."""

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.image_size = image_size
        self.normaliser = Normaliser(mean, std)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(preprocess(image, self.image_size, self.normaliser))


class ImageFileDataset(Dataset):
    """Image files decoded by `glit_deploy.images.load_rgb` (JPEG draft to the input size, EXIF
    orientation, one colour-mode rule), then `transform` (timm's augmentation, or EvalTransform)."""

    def __init__(self, paths: Sequence[Path], labels: Sequence[int], image_size: int, transform: Callable) -> None:
        self.paths = list(paths)
        self.labels = [int(label) for label in labels]
        self.image_size = image_size
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path = self.paths[index]
        try:
            image = load_rgb(open_image_file(path), self.image_size)
        except ImageRejected as exc:  # a file changed after the dataset was checked
            raise DataError(f"{path} no longer decodes: {exc}") from None
        return self.transform(image), self.labels[index]


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
    # The same arithmetic as glit_deploy.images.preprocess on an image already at the input size
    # (tests/test_preprocessing.py holds them equal).
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(ops)


def _array_bundle(name: str, images: np.ndarray, labels: np.ndarray, class_names: list[str],
                  mean: Sequence[float], std: Sequence[float], image_size: int, flip: bool, pad: int,
                  identity: dict[str, Any]) -> DataBundle:
    train_idx, val_idx = stratified_split(labels)
    train_tf = _array_transforms(image_size, mean, std, augment=True, pad=pad)
    if not flip:  # digits are not mirror-symmetric
        train_tf = v2.Compose([t for t in train_tf.transforms if not isinstance(t, v2.RandomHorizontalFlip)])
    eval_tf = _array_transforms(image_size, mean, std, augment=False, pad=pad)
    counts = np.bincount(labels, minlength=len(class_names))
    identity = {**identity, "counts": {"train": {c: int(n) for c, n in zip(class_names, counts, strict=True)}}}
    return DataBundle(
        name=name,
        train=ArrayDataset(images[train_idx], labels[train_idx], train_tf),
        val=ArrayDataset(images[val_idx], labels[val_idx], eval_tf),
        calib=ArrayDataset(images[train_idx], labels[train_idx], eval_tf),
        class_names=class_names, mean=tuple(mean), std=tuple(std), image_size=image_size, flip=flip, pad=pad,
        identity=identity,
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
                         (mean,) * 3, (std,) * 3, image_size, flip=False, pad=1,
                         identity={"spec": "digits", "kind": "digits", "split": "10 % of each class held out"})


def load_cifar10_bundle(root: Path, image_size: int = 32) -> DataBundle:
    """The npz layout of shared/data/cifar10: train_*.npz with images, labels, class_names."""
    if not root.is_dir():
        raise DataError(f"CIFAR-10 folder {root} does not exist")
    root = root.resolve()
    files = sorted(root.glob("train_*.npz"))
    if not files:
        raise DataError(f"CIFAR-10 folder {root} holds no train_*.npz files")
    images, labels, class_names = [], [], None
    content = hashlib.sha256()
    for f in files:
        try:
            raw = f.read_bytes()  # read once: hashed for the dataset's identity, then parsed
            _digest_file(content, f.name, raw)
            with np.load(io.BytesIO(raw), allow_pickle=False) as z:
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
    stats = [(f.name, f.stat()) for f in files]
    identity = {"spec": f"cifar10:{root}", "kind": "cifar10", "path": str(root),
                "split": "10 % of each class held out",
                "fingerprint": _fingerprint((name, st.st_size, st.st_mtime_ns) for name, st in stats),
                "content_sha256": content.hexdigest()}
    return _array_bundle("cifar10", x, y, names, CIFAR10_MEAN, CIFAR10_STD, image_size, flip=True, pad=4,
                         identity=identity)


# ------------------------------------------------------------------------------------------ image folders


def image_extensions() -> frozenset[str]:
    """Lower-case extensions (with the dot) of every format this Pillow decodes by itself."""
    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items()
                     if fmt in Image.OPEN and fmt not in _UNDECODABLE_FORMATS)


def natural_key(name: str) -> tuple[list[int | str], str]:
    """`class2` before `class10` (timm's order, which runs trained before our own reader used), then the
    name itself so that names differing only in case still sort deterministically."""
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", name.lower())], name


@dataclass(frozen=True)
class FoundFile:
    relative: str  # posix path relative to the dataset root, e.g. train/cat/batch1/0.jpg
    size: int
    mtime_ns: int


@dataclass
class SplitScan:
    """One of train/ or val/: image files per first-level class folder."""

    root: Path
    classes: dict[str, list[FoundFile]]
    loose_images: list[str]  # images directly in the split folder, outside any class folder
    other_files: int  # files that are not images by their extension


def _walk_images(folder: Path, dataset_root: Path, extensions: frozenset[str]) -> tuple[list[FoundFile], int]:
    """Every image at any depth below `folder`, sorted; hidden files and folders skipped; symlinked
    folders followed once."""
    found, others, seen = [], 0, set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink loop
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):  # .DS_Store, macOS ._resource forks
                continue
            path = Path(dirpath) / name
            if os.path.splitext(name)[1].lower() not in extensions:
                others += 1
                continue
            try:
                st = path.stat()
            except OSError:  # a dangling symlink: it does not decode either
                st = None
            found.append(FoundFile(path.relative_to(dataset_root).as_posix(), st.st_size if st else -1,
                                   st.st_mtime_ns if st else -1))
    return found, others


def _scan_split(split_root: Path, dataset_root: Path, extensions: frozenset[str]) -> SplitScan:
    classes: dict[str, list[FoundFile]] = {}
    loose, others = [], 0
    for entry in sorted(os.scandir(split_root), key=lambda e: natural_key(e.name)):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            files, other = _walk_images(Path(entry.path), dataset_root, extensions)
            classes[entry.name] = files
            others += other
        elif os.path.splitext(entry.name)[1].lower() in extensions:
            loose.append(entry.name)
        else:
            others += 1
    return SplitScan(split_root, classes, loose, others)


def _named(items: Sequence[str], total: int | None = None) -> str:
    """'a, b, c and 4 more' for error messages."""
    total = len(items) if total is None else total
    shown = ", ".join(items[:NAMED_IN_ERRORS])
    return shown if total <= NAMED_IN_ERRORS else f"{shown} and {total - NAMED_IN_ERRORS} more"


def _check_split(scan: SplitScan, split: str) -> None:
    """The layout errors a user can make, each in one line."""
    where = scan.root
    total = sum(len(files) for files in scan.classes.values())
    if scan.loose_images and not scan.classes:
        raise DataError(f"{where} is a flat folder of {len(scan.loose_images)} images without class folders: put "
                        f"each class's images in {split}/<class>/ (a class is a first-level folder)")
    if scan.loose_images:
        raise DataError(f"{len(scan.loose_images)} images lie directly in {where}, outside any class folder "
                        f"({_named(scan.loose_images)}): move them into their class folder")
    if total == 0:
        raise DataError(f"{where} holds no images (a class is a first-level folder with images of a format "
                        "Pillow reads: jpg, png, webp, bmp, tif, gif, ...)")


def scan_image_folder(root: Path) -> tuple[SplitScan, SplitScan | None]:
    """`root/train/<class>/**` (and `root/val/<class>/**`), or `root/<class>/**` without train/."""
    if not root.is_dir():
        raise DataError(f"dataset folder {root} does not exist")
    extensions = image_extensions()
    has_train, has_val = (root / "train").is_dir(), (root / "val").is_dir()
    if has_val and not has_train:
        raise DataError(f"{root} has a val/ folder but no train/ folder: put the training classes in train/")
    train = _scan_split(root / "train" if has_train else root, root, extensions)
    _check_split(train, "train")
    empty = [name for name, files in train.classes.items() if not files]
    if empty:
        raise DataError(f"class folders without images in {train.root}: {_named(empty)}")
    if len(train.classes) == 1:
        raise DataError(f"{train.root} holds a single class folder ({next(iter(train.classes))}): a classifier "
                        "needs at least two classes")
    if not has_val:
        return train, None
    val = _scan_split(root / "val", root, extensions)
    _check_split(val, "val")
    unknown = [name for name in val.classes if name not in train.classes]
    if unknown:
        raise DataError(f"{val.root} has class folders that {train.root} lacks: {_named(unknown)}")
    return train, val


def _fingerprint(entries: Any) -> str:
    """A cheap identity of a dataset's files: names, sizes and modification times, hashed."""
    digest = hashlib.sha256()
    for name, size, mtime_ns in sorted(entries):
        digest.update(f"{name}\t{size}\t{mtime_ns}\n".encode())
    return digest.hexdigest()[:32]


def _digest_file(digest: Any, name: str, data: bytes) -> None:
    """One file into a content digest: its name and length first, so that moving bytes between files or
    renaming one changes the digest."""
    digest.update(f"{name}\t{len(data)}\n".encode())
    digest.update(data)


def content_digest(root: Path, files: Iterable[FoundFile]) -> str | None:
    """SHA-256 of the files' names and bytes (sorted by name), or None when they total more than
    CONTENT_DIGEST_MAX_BYTES or one cannot be read (the fingerprint alone then identifies them)."""
    files = sorted(files, key=lambda f: f.relative)
    if sum(max(f.size, 0) for f in files) > CONTENT_DIGEST_MAX_BYTES:
        return None
    digest = hashlib.sha256()
    for found in files:
        try:
            _digest_file(digest, found.relative, (root / found.relative).read_bytes())
        except OSError:
            return None
    return digest.hexdigest()


def undecodable_files(root: Path, files: Sequence[FoundFile], image_size: int) -> list[tuple[str, str]]:
    """(relative path, reason) of every file that does not decode the way training will decode it.

    A full decode (with the JPEG draft to the input size that training uses), not `Image.verify()`:
    verify does not decompress JPEG data, so a truncated JPEG passes it and fails mid-training
    (bench/image_verify.py measures both)."""
    bad = []
    for found in files:
        try:
            load_rgb(open_image_file(root / found.relative), image_size)
        except ImageRejected as exc:
            bad.append((found.relative, str(exc)))
    return bad


def load_image_folder_bundle(root: Path, image_size: int, skip_bad_images: bool = False,
                             known: dict[str, Any] | None = None) -> DataBundle:
    """An image-folder tree (see `scan_image_folder`); without val/, 10 % of each class is held out.

    `known` is what run.json recorded for this dataset: when the fingerprint is unchanged, its list of
    undecodable files is reused instead of decoding every file again, and its class order is kept."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform

    root = root.resolve()
    train_scan, val_scan = scan_image_folder(root)
    scans = [train_scan] + ([val_scan] if val_scan else [])
    all_files = [f for scan in scans for files in scan.classes.values() for f in files]
    fingerprint = _fingerprint((f.relative, f.size, f.mtime_ns) for f in all_files)
    unchanged = bool(known) and known.get("fingerprint") == fingerprint
    if unchanged and "skipped" in known:
        bad = {rel: "recorded as undecodable" for rel in known["skipped"]}
    else:
        bad = dict(undecodable_files(root, all_files, image_size))
    # unchanged files keep the recorded digest; otherwise read them again (once, as the decode check did)
    content = known.get("content_sha256") if unchanged else content_digest(root, all_files)
    if bad and not skip_bad_images:
        names = [f"{rel} ({reason})" for rel, reason in list(bad.items())[:NAMED_IN_ERRORS]]
        raise DataError(f"{len(bad)} of {len(all_files)} image files in {root} do not decode: "
                        f"{_named(names, len(bad))}; fix or remove them, or pass --skip-bad-images to leave them out")

    class_names = list(train_scan.classes)
    recorded = (known or {}).get("class_names")
    if recorded and sorted(recorded) == sorted(class_names):
        class_names = list(recorded)  # the order the run's model was trained with
    label_of = {name: i for i, name in enumerate(class_names)}

    def files_of(scan: SplitScan) -> tuple[list[Path], list[int], dict[str, int]]:
        paths, labels, counts = [], [], {}
        for name in class_names:
            kept = [f for f in scan.classes.get(name, []) if f.relative not in bad]
            if scan is train_scan and not kept:
                raise DataError(f"class {name} has no decodable images left in {scan.root} "
                                f"after leaving out {len(scan.classes[name])} undecodable files")
            paths += [root / f.relative for f in kept]
            labels += [label_of[name]] * len(kept)
            counts[name] = len(kept)
        return paths, labels, counts

    mean, std = tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)
    train_tf = create_transform(image_size, is_training=True, mean=mean, std=std)
    eval_tf = EvalTransform(image_size, mean, std)
    train_paths, train_labels, train_counts = files_of(train_scan)
    counts = {"train": train_counts}
    if val_scan is not None:
        val_paths, val_labels, counts["val"] = files_of(val_scan)
        if not val_paths:
            raise DataError(f"{val_scan.root} has no decodable images left after leaving out undecodable files")
        split = "train/ and val/ folders"
        fit_paths, fit_labels = train_paths, train_labels
    else:
        train_idx, val_idx = stratified_split(train_labels)
        val_paths, val_labels = [train_paths[i] for i in val_idx], [train_labels[i] for i in val_idx]
        fit_paths, fit_labels = [train_paths[i] for i in train_idx], [train_labels[i] for i in train_idx]
        split = "10 % of each class of train/ held out"
    identity = {"spec": str(root), "kind": "image-folder", "path": str(root), "split": split, "counts": counts,
                "fingerprint": fingerprint, "content_sha256": content, "skip_bad_images": skip_bad_images,
                "skipped": sorted(bad),
                "other_files": sum(scan.other_files for scan in scans)}
    return DataBundle(root.name, ImageFileDataset(fit_paths, fit_labels, image_size, train_tf),
                      ImageFileDataset(val_paths, val_labels, image_size, eval_tf),
                      ImageFileDataset(fit_paths, fit_labels, image_size, eval_tf),
                      class_names, mean, std, image_size, flip=True, pad=0, identity=identity)


# ------------------------------------------------------------------------------------------ augmentation


def deit_train_transform(bundle: DataBundle, auto_augment: str | None, re_prob: float) -> Any:
    """The DeiT training augmentation through timm: RandAugment and random erasing on top of the
    dataset's own crop/flip. In-memory arrays go through PIL for timm's RandAugment; image files reach
    it already decoded by glit_deploy.images (same EXIF and colour-mode handling as evaluation)."""
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


# ------------------------------------------------------------------------------------------ loading


def canonical_spec(spec: str) -> str:
    """`digits`, `cifar10:/ABS/DIR` or `/ABS/DIR`: the spec as run.json records it (relative paths are
    resolved against the current directory, so a later stage finds them from anywhere)."""
    if spec == "digits":
        return spec
    if spec.startswith("cifar10:"):
        return f"cifar10:{Path(spec.split(':', 1)[1]).expanduser().resolve()}"
    return str(Path(spec).expanduser().resolve())


def load_data(spec: str, image_size: int, skip_bad_images: bool = False, report: bool = True,
              known: dict[str, Any] | None = None) -> DataBundle:
    """`digits`, `cifar10:DIR` or an image-folder `DIR`; `report` prints what was found to stderr.

    `skip_bad_images` leaves undecodable image files out (and records them) instead of refusing the
    dataset; `known` is run.json's record of this dataset (see load_image_folder_bundle)."""
    if spec == "digits":
        bundle = load_digits_bundle(image_size)
    elif spec.startswith("cifar10:"):
        bundle = load_cifar10_bundle(Path(spec.split(":", 1)[1]).expanduser(), image_size)
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise DataError(f"dataset '{spec}' not found: use 'digits', 'cifar10:DIR' or an image-folder DIR")
        bundle = load_image_folder_bundle(path, image_size, skip_bad_images, known)
    if report:
        print_summary(bundle)
    return bundle


def load_recorded_data(record: dict[str, Any], image_size: int, allow_change: bool = False,
                       report: bool = False) -> DataBundle:
    """The dataset a run recorded in run.json (its `data` entry), refusing one that changed since.

    Records written before datasets were recorded absolutely hold a relative `spec` only: they load
    relative to the current directory, as they always did, and are compared on what they recorded."""
    spec = record.get("spec")
    if not spec:
        raise DataError("the run records no dataset")
    bundle = load_data(spec, image_size, skip_bad_images=bool(record.get("skip_bad_images")), report=report,
                       known=record)
    check_same_dataset(record, bundle.describe(), allow_change)
    return bundle


def load_run_data(run: RunDir, image_size: int, allow_change: bool = False, report: bool = False,
                  update_record: bool = True) -> DataBundle:
    """The dataset of a run (its run.json record), refusing one that changed since unless `allow_change`.

    Every stage that reads a run's data comes here. A dataset accepted with new metadata (a copy with the
    same bytes, or a change the user allowed) is recorded as it is now (`update_record`: false on all but
    the main process), so that the next stage compares with what was accepted instead of refusing again."""
    record = run.load_meta().get("data") if run.exists() else None
    if not record or not record.get("spec"):
        raise RunError(f"{run.meta_path} records no dataset")
    bundle = load_recorded_data(record, image_size, allow_change, report)
    current = {**bundle.describe(), "given": record.get("given", record["spec"])}
    if update_record and current != record:
        try:
            run.update_meta(data=current)
        except OSError:  # a read-only run: the next stage compares with the old record again, as it did before
            pass
    return bundle


def dataset_changes(recorded: dict[str, Any], current: dict[str, Any]) -> tuple[list[str], bool]:
    """What differs between a recorded dataset and the current one, and whether the classes differ
    (a model's outputs are tied to its classes: that change can never be allowed)."""
    changes: list[str] = []
    old_names, new_names = recorded.get("class_names"), current.get("class_names")
    if old_names is not None and old_names != new_names:
        added = [c for c in new_names if c not in old_names]
        removed = [c for c in old_names if c not in new_names]
        parts = ([f"classes added: {_named(added)}"] if added else []) + (
            [f"classes removed: {_named(removed)}"] if removed else [])
        return parts or [f"class order changed ({_named(old_names)} -> {_named(new_names)})"], True
    old_counts, new_counts = recorded.get("counts"), current.get("counts")
    if old_counts is not None:
        for split in sorted(set(old_counts) | set(new_counts or {})):
            before, after = old_counts.get(split, {}), (new_counts or {}).get(split, {})
            moved = [f"{c} {before.get(c, 0)} -> {after.get(c, 0)}" for c in sorted(set(before) | set(after))
                     if before.get(c, 0) != after.get(c, 0)]
            if moved:
                changes.append(f"{split} images per class changed: {_named(moved)}")
    else:  # an old record: only the split sizes
        for key in ("train_size", "val_size"):
            if key in recorded and recorded[key] != current.get(key):
                changes.append(f"{key} {recorded[key]} -> {current.get(key)}")
    if not changes and recorded.get("fingerprint") and recorded["fingerprint"] != current.get("fingerprint"):
        old_bytes, new_bytes = recorded.get("content_sha256"), current.get("content_sha256")
        if old_bytes and new_bytes:
            if old_bytes != new_bytes:  # equal: the same bytes under new modification times (a copy)
                changes.append("the same classes and counts, but the files' contents changed")
        else:
            limit_gb = CONTENT_DIGEST_MAX_BYTES // 2**30
            why = ("this run recorded no digest of their contents" if new_bytes else
                   f"the files total more than {limit_gb} GB, too many to compare byte by byte")
            changes.append("the same classes and counts, but files were replaced or modified (sizes or modification "
                           f"times differ; {why}, so a copy cannot be told from a change)")
    return changes, False


def check_same_dataset(recorded: dict[str, Any], current: dict[str, Any], allow_change: bool = False) -> None:
    """Raise a DataError naming what changed, unless `allow_change` (never for changed classes)."""
    changes, classes_changed = dataset_changes(recorded, current)
    if not changes:
        return
    where = current.get("path") or current.get("spec") or recorded.get("spec")
    message = f"the dataset {where} changed since this run recorded it: {'; '.join(changes)}"
    if classes_changed:
        raise DataError(f"{message}; the run's models predict the recorded classes: use another --run")
    if not allow_change:
        raise DataError(f"{message}; restore it, or pass --allow-data-change to use it as it is now")
    from rich.console import Console
    from rich.text import Text

    # Text, not markup: class names and paths are printed literally
    Console(stderr=True).print(Text.assemble(("warning: ", "yellow"), f"{message} (allowed by --allow-data-change)"),
                               soft_wrap=True)


def _label_counts(dataset: Dataset, classes: int) -> list[int]:
    dataset = _base_dataset(dataset)
    labels = getattr(dataset, "labels", None)
    if labels is None:
        return [0] * classes
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=classes).tolist()


def print_summary(bundle: DataBundle) -> None:
    """One short table on stderr: classes, train/val images per class, the split, what was left out."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    identity = bundle.identity
    train_counts = _label_counts(bundle.train, bundle.num_classes)
    val_counts = _label_counts(bundle.val, bundle.num_classes)
    title = (f"dataset {identity.get('spec', bundle.name)}: {bundle.num_classes} classes, {len(bundle.train)} "
             f"training and {len(bundle.val)} validation images ({identity.get('split', '')})")
    table = Table()
    table.add_column("class")
    table.add_column("train", justify="right")
    table.add_column("val", justify="right")
    shown = bundle.num_classes if bundle.num_classes <= SUMMARY_ROWS else SUMMARY_ROWS - 1
    for i in range(shown):
        table.add_row(Text(bundle.class_names[i]), str(train_counts[i]), str(val_counts[i]))
    if shown < bundle.num_classes:
        rest = bundle.num_classes - shown
        table.add_row(Text(f"... {rest} more classes"), str(sum(train_counts[shown:])), str(sum(val_counts[shown:])))
    notes = []
    skipped = identity.get("skipped") or []
    if skipped:
        notes.append(f"left out {len(skipped)} undecodable files ({_named(skipped)})")
    if identity.get("other_files"):
        notes.append(f"ignored {identity['other_files']} files that are not images by their extension")
    console = Console(stderr=True)
    console.print(Text(title), soft_wrap=True)
    console.print(table)
    for note in notes:
        console.print(Text(note), soft_wrap=True)


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
