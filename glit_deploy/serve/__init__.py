"""Predict and serve an exported model: everything it needs comes from the ONNX file's glit metadata.

- `images`: safe image decoding and the preprocessing that matches training (shared by both).
- `predictor`: one onnxruntime session plus its metadata; softmax and top-k.
- `batcher`, `app`, `server`: the HTTP server (dynamic micro-batching, FastAPI + uvicorn).
"""

from glit_deploy.serve.images import ImageRejected, decode_image, preprocess
from glit_deploy.serve.predictor import Predictor, resolve_model_path

__all__ = ["ImageRejected", "Predictor", "decode_image", "preprocess", "resolve_model_path"]
