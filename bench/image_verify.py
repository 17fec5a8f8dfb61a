"""How much does checking that every file of an image folder decodes cost? (issue 11, item 1)

Writes N small images (jpg, png, webp; 24..64 px) to a temporary folder and times three checks over
all of them: the header only (Image.open), Image.open + verify(), and the full decode that training
uses (glit_deploy.images.load_rgb with the JPEG draft to the input size). Also says which check notices
a truncated JPEG and a truncated PNG. Then times loading the same files as an image-folder dataset
(4 class folders): the first load (scan, fingerprint, full decode of every file) and a reload from the
run's record with the fingerprint unchanged (scan and fingerprint only: the recorded check is reused).

    python bench/image_verify.py --files 2000 --size 32
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from timm.data import create_transform  # noqa: F401  (imported here so that no timing counts the import)

from glit_deploy.data import load_data, load_recorded_data
from glit_deploy.images import ImageRejected, load_rgb, open_image_file


def write_images(folder: Path, count: int, classes: int = 1) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        side_w, side_h = rng.integers(24, 65, size=2)
        # smooth content (like photos) rather than noise: realistic compressed sizes
        base = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        image = Image.fromarray(base).resize((int(side_w), int(side_h)), Image.Resampling.BILINEAR)
        fmt = ("jpg", "png", "webp")[i % 3]
        path = folder / f"class{i % classes}" / f"{i:05d}.{fmt}" if classes > 1 else folder / f"{i:05d}.{fmt}"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        paths.append(path)
    return paths


def header_only(path: Path) -> None:
    with Image.open(path):
        pass


def open_verify(path: Path) -> None:
    with Image.open(path) as image:
        image.verify()


def full_decode(path: Path, size: int) -> None:
    load_rgb(open_image_file(path), size)


def catches(check, data: bytes, suffix: str, folder: Path) -> bool:
    path = folder / f"truncated{suffix}"
    path.write_bytes(data)
    try:
        check(path)
    except (ImageRejected, OSError, SyntaxError, ValueError):
        return True
    return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--size", type=int, default=32, help="model input size (the JPEG draft target)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths = write_images(folder, args.files)
        checks = {"header only (Image.open)": header_only, "Image.open + verify()": open_verify,
                  f"full decode (load_rgb, draft {args.size})": lambda p: full_decode(p, args.size)}
        big = Image.fromarray(np.random.default_rng(1).integers(0, 256, (256, 256, 3), dtype=np.uint8))
        jpeg, png = io.BytesIO(), io.BytesIO()
        big.save(jpeg, format="JPEG")
        big.save(png, format="PNG")
        print(f"{args.files} files, median of {args.repeats} passes (files in the page cache)")
        print(f"{'check':<34} {'total s':>8} {'us/file':>8}  truncated jpg / png caught")
        for name, check in checks.items():
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                for path in paths:
                    check(path)
                times.append(time.perf_counter() - start)
            median = sorted(times)[len(times) // 2]
            caught = (catches(check, jpeg.getvalue()[: len(jpeg.getvalue()) // 2], ".jpg", folder),
                      catches(check, png.getvalue()[: len(png.getvalue()) // 2], ".png", folder))
            print(f"{name:<34} {median:8.3f} {1e6 * median / len(paths):8.1f}  {caught[0]!s:>5} / {caught[1]!s:<5}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "ds"
        write_images(root / "train", args.files, classes=4)
        start = time.perf_counter()
        bundle = load_data(str(root), args.size, report=False)
        first = time.perf_counter() - start
        start = time.perf_counter()
        load_recorded_data(bundle.describe(), args.size)
        again = time.perf_counter() - start
        print(f"\nimage-folder dataset of {args.files} files: first load {first:.3f} s, "
              f"reload from the run's record {again:.3f} s")


if __name__ == "__main__":
    main()
