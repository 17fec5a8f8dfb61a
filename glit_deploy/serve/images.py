"""Image decoding that is safe on untrusted bytes, and the preprocessing the model was trained with.

Resize policy (the same as timm's eval transform with crop_pct=1.0, which image-folder training
validates with): resize the shorter side to the model's image_size with bilinear filtering (PIL's,
which antialiases when shrinking), then centre-crop image_size x image_size. An image already at
image_size x image_size is used as is, exactly like the digits and CIFAR-10 validation images,
which are never resized. Then, like torchvision's ToTensor + Normalize: x / 255, (x - mean) / std.

Decoding checks the pixel count from the header (after Image.open, before load()) against our own
limit, so a decompression bomb is refused before any pixel is decoded.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from glit_deploy.errors import GlitError

DEFAULT_MAX_PIXELS = 4096 * 4096


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


def load_rgb(image: Image.Image, draft_size: int | None = None) -> Image.Image:
    """Decode an opened image to RGB. `draft_size` lets JPEG decode at 1/2, 1/4 or 1/8 scale when that
    still covers the size needed (much faster for photos far larger than the model's input)."""
    try:
        if draft_size and image.format == "JPEG":
            image.draft("RGB", (draft_size, draft_size))
        image.load()
        image = ImageOps.exif_transpose(image)  # phone photos store their rotation in EXIF
        return image.convert("RGB") if image.mode != "RGB" else image
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
