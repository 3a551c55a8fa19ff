"""Lowering of compressed graphs to deployable formats: ``onnx_qdq`` (ONNX with DequantizeLinear / MatMulNBits)."""
