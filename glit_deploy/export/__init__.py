"""Export of GLiT models (ONNX now; TensorRT and Triton build on it)."""
