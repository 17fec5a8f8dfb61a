"""ONNX export of any GLiT module (a whole model, or one block for latency profiling)."""

from __future__ import annotations

import io
import warnings

import torch
from torch import Tensor, nn

from glit_deploy.errors import GlitError

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


EXPORTERS = ("torchscript", "dynamo")
# Measured on GLiT-Tiny (bench/export_speed.py): the TorchScript exporter's graph runs as fast or
# faster on onnxruntime CPU (it keeps GELU in the pattern onnxruntime fuses) and exports ~3x faster.
DEFAULT_EXPORTER = "torchscript"


def export_onnx(module: nn.Module, example: Tensor, exporter: str = DEFAULT_EXPORTER, opset: int = OPSET) -> bytes:
    """Export `module` with a dynamic batch axis, by the named exporter (set explicitly, never torch's default)."""
    if exporter == "torchscript":
        return onnx_bytes(module, example, dynamic_batch=True, opset=opset)
    if exporter != "dynamo":
        raise GlitError(f"unknown exporter '{exporter}' (exporters: {', '.join(EXPORTERS)})")
    # torch.export specialises a dimension whose example size is 1: trace with a batch of 2.
    example = example[:1].expand(2, *example.shape[1:]).contiguous()
    module = module.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, (example,), dynamo=True, opset_version=opset, input_names=["input"],
                                    output_names=["output"], dynamic_shapes=({0: torch.export.Dim("batch")},),
                                    optimize=True, verbose=False)
    return program.model_proto.SerializeToString()


def deployable_onnx(model: nn.Module, example: Tensor, exporter: str = DEFAULT_EXPORTER, opset: int = OPSET) -> bytes:
    """The graph that is deployed, without its metadata: the one definition that `glit export` writes
    and every latency target times (a table entry, a search winner), so the two cannot disagree.

    BatchNorm folded and the depthwise conv as a (1, k) Conv2d (`prepare_for_export`, on a copy),
    exported with a dynamic batch axis by the named exporter at `opset`.
    """
    from glit_deploy.export.rewrite import prepare_for_export

    deploy, _ = prepare_for_export(model.cpu().eval())
    return export_onnx(deploy, example.cpu(), exporter, opset)


def check_onnx(model: bytes) -> None:
    """onnx's full check (structure, operator schemas and shape inference); a failure is a GlitError."""
    import onnx

    try:
        onnx.checker.check_model(onnx.load_from_string(model), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise GlitError(f"the exported ONNX model fails onnx.checker: {str(exc).splitlines()[0]}") from None
