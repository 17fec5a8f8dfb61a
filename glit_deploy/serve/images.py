"""The server's view of image decoding: the one definition lives in `glit_deploy.images`, shared by
training, evaluation, export parity, `glit predict` and `glit serve`; this module re-exports it."""

from __future__ import annotations

from glit_deploy.images import (
    DEFAULT_MAX_PIXELS,
    ImageRejected,
    Normaliser,
    decode_image,
    load_rgb,
    model_input,
    open_image,
    preprocess,
    resize_and_crop,
    to_rgb,
)

__all__ = ["DEFAULT_MAX_PIXELS", "ImageRejected", "Normaliser", "decode_image", "load_rgb", "model_input",
           "open_image", "preprocess", "resize_and_crop", "to_rgb"]
