"""ONNX export of any GLiT module (a whole model, or one block for latency profiling)."""

from __future__ import annotations

import io
import warnings

import torch
from torch import Tensor, nn

OPSET = 17  # LayerNormalization is a single op from opset 17


def onnx_bytes(module: nn.Module, example: Tensor, dynamic_batch: bool = False, opset: int = OPSET) -> bytes:
    """Export `module` (in eval mode) to an in-memory ONNX model with input `input`, output `output`.

    The TorchScript-based exporter (dynamo=False) is used: for these graphs it gives the same
    operators as the dynamo exporter and exports about ten times faster, which matters when a
    latency table exports every block configuration of a space.
    """
    buffer = io.BytesIO()
    axes = {"input": {0: "batch"}, "output": {0: "batch"}} if dynamic_batch else None
    module = module.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notices
        torch.onnx.export(module, (example,), buffer, dynamo=False, opset_version=opset,
                          input_names=["input"], output_names=["output"], dynamic_axes=axes,
                          do_constant_folding=True)
    return buffer.getvalue()
