"""Lowering of compressed graphs to deployable formats: :mod:`.onnx` (ONNX QDQ / MatMulNBits) and :mod:`.tvm`
(Apache TVM Relax).  Each is a package imported on first use (TVM and onnx are not loaded by ``import fxcompress``)."""
