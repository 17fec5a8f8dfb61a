"""The one decoding and preprocessing of images, used by every stage: training's image folders, evaluation,
the export parity check, `glit predict` and `glit serve`.

Decoding (`load_rgb`), the same everywhere:
1. JPEG `draft` to the model's input size: libjpeg decodes at 1/2, 1/4 or 1/8 scale when the result still
   covers `size` x `size` (much faster for photos far larger than the model's input). It only acts on
   JPEGs at least twice the input size in both sides, and it acts identically in every stage because
   every stage calls this function with the model's input size.
2. EXIF orientation is applied (phone photos store their rotation there; a model trained on upright
   images should see them upright, in training as in serving).
3. `to_rgb`: every colour mode becomes 8-bit RGB the same way (see its docstring).

Preprocessing (`preprocess`), the same as timm's eval transform with crop_pct=1.0, which image-folder
training validated with before: resize the shorter side to the model's image_size with bilinear
filtering (PIL's, which antialiases when shrinking), then centre-crop image_size x image_size. An image
already at image_size x image_size is used as is, exactly like the digits and CIFAR-10 validation images,
which are never resized. Then, like torchvision's ToTensor + Normalize: x / 255, (x - mean) / std.

`open_image` checks the pixel count from the header (before any pixel is decoded) against a limit, so a
decompression bomb is refused before it costs memory.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from glit_deploy.errors import GlitError

DEFAULT_MAX_PIXELS = 4096 * 4096  # the server's per-request limit
FILE_MAX_PIXELS = 20_000 * 20_000  # a dataset's own files: larger than any camera, still refuses bombs

# 16-bit and 32-bit integer greyscale: Pillow's convert("RGB") clips them at 255 (a 16-bit image turns
# white), so they are scaled to 8 bits here. Pillow opens 16-bit PNG/TIFF as I;16* or I.
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class ImageRejected(GlitError):
    """Bytes that are not a usable image; `status` is the HTTP status a server answers with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Parse the header only, refusing non-images and pixel counts over `max_pixels` before decoding."""
    if not data:
        raise ImageRejected("empty image", 400)
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageRejected("not an image in a format PIL can decode (PNG, JPEG, WebP, ...)", 415) from None
    except Image.DecompressionBombError as exc:
        raise ImageRejected(f"decompression bomb refused: {exc}", 413) from None
    except Exception as exc:  # PIL raises many kinds (SyntaxError, ValueError, struct.error) on corrupt headers
        raise ImageRejected(f"corrupt image header ({exc.__class__.__name__})", 400) from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageRejected(f"image has no pixels ({width}x{height})", 400)
    if width * height > max_pixels:
        raise ImageRejected(f"image is {width}x{height} = {width * height:,} pixels, over the limit of "
                            f"{max_pixels:,}", 413)
    return image


def open_image_file(path: Path, max_pixels: int = FILE_MAX_PIXELS) -> Image.Image:
    """A file of a dataset, opened like an upload (the bytes are read once; the file is closed)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ImageRejected(f"cannot read ({exc.strerror or exc})", 400) from None
    return open_image(data, max_pixels)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any colour mode -> 8-bit RGB, one rule for every stage.

    - RGB: as is. Greyscale (1, L) and CMYK, YCbCr, LAB, HSV: Pillow's conversion.
    - 16/32-bit integer greyscale (I;16*, I): scaled to 8 bits (value >> 8, clipped to 0..65535 first),
      not clipped at 255 as Pillow's own conversion does. Float (F): clipped to 0..255.
    - Alpha (RGBA, LA, PA, La, RGBa, and palette images with a transparent colour): composited on black,
      i.e. each channel times alpha / 255, rounded. Why not drop the alpha: the colour stored under a
      transparent pixel is invisible and arbitrary (black in one exporter, white or leftovers in another);
      compositing makes two images that look the same give the same input, and an opaque image is
      unchanged. Black rather than white: it is the premultiplied colour, what most exporters already store.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image.convert("I"), dtype=np.int64)
        gray = (np.clip(values, 0, 65535) >> 8).astype(np.uint8)
        return Image.fromarray(np.repeat(gray[..., None], 3, axis=-1))
    if mode == "F":
        gray = np.clip(np.asarray(image, dtype=np.float64), 0, 255).round().astype(np.uint8)
        return Image.fromarray(np.repeat(gray[..., None], 3, axis=-1))
    if (mode == "P" and "transparency" in image.info) or mode in ("PA", "LA", "La", "RGBa"):
        image = image.convert("RGBA")  # for a palette, Pillow applies the tRNS transparency here
    if image.mode == "RGBA":
        rgba = np.asarray(image, dtype=np.uint32)
        alpha = rgba[..., 3:4]
        rgb = (rgba[..., :3] * alpha + 127) // 255
        return Image.fromarray(rgb.astype(np.uint8))
    return image.convert("RGB")


def load_rgb(image: Image.Image, size: int | None) -> Image.Image:
    """Decode an opened image to 8-bit RGB: JPEG draft to `size`, EXIF orientation, `to_rgb`.

    Every stage that feeds a model passes the model's input size; None decodes at full resolution."""
    try:
        if size and image.format == "JPEG":
            image.draft("RGB", (size, size))
        image.load()
        image = ImageOps.exif_transpose(image)  # phone photos store their rotation in EXIF
        return to_rgb(image)
    except ImageRejected:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageRejected(f"decompression bomb refused: {exc}", 413) from None
    except Exception as exc:  # truncated data raises OSError, broken codecs various others
        raise ImageRejected(f"corrupt or truncated image ({exc})", 400) from None


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None
                 ) -> Image.Image:
    """Encoded bytes -> RGB PIL image, refusing non-images, corrupt files and huge pixel counts."""
    return load_rgb(open_image(data, max_pixels), draft_size)


def resize_and_crop(image: Image.Image, size: int) -> Image.Image:
    """Shorter side to `size` (bilinear), then the centre `size` x `size` crop."""
    width, height = image.size
    if (width, height) == (size, size):
        return image
    # the long side truncates, exactly like torchvision's Resize(int) that timm's eval transform uses
    if width <= height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_w, new_h = int(size * width / height), size
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    if (new_w, new_h) == (size, size):
        return image
    left, top = round((new_w - size) / 2), round((new_h - size) / 2)  # torchvision's CenterCrop offsets
    return image.crop((left, top, left + size, top + size))


class Normaliser:
    """uint8 HWC RGB -> float32 CHW, (x / 255 - mean) / std, with the constants folded once."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        std_arr = np.asarray(std, dtype=np.float32)
        self.scale = (1.0 / (255.0 * std_arr)).reshape(3, 1, 1)
        self.offset = (-np.asarray(mean, dtype=np.float32) / std_arr).reshape(3, 1, 1)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        chw = np.asarray(pixels, dtype=np.float32).transpose(2, 0, 1)
        return chw * self.scale + self.offset


def preprocess(image: Image.Image, size: int, normaliser: Normaliser) -> np.ndarray:
    """A decoded RGB image -> the model's float32 [3, size, size] input."""
    return normaliser(np.asarray(resize_and_crop(image, size)))


def model_input(image: Image.Image, size: int, normaliser: Normaliser) -> np.ndarray:
    """An opened image (header read, not decoded) -> the model's float32 [3, size, size] input: the one
    decoding + preprocessing of evaluation, parity, predict and serve (raises ImageRejected)."""
    return preprocess(load_rgb(image, size), size, normaliser)
