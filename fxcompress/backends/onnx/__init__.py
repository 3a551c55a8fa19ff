"""ONNX backend: QuantLinear / QuantConv2d graphs to ONNX with DequantizeLinear (QDQ) or MatMulNBits weights.

:mod:`.export` -- ``export_onnx`` (float graph via torch's exporter, then the rewrite) and ``layer_formats``;
:mod:`.qdq` -- the placeholder -> MatMulNBits (the default) / QDQ rewrite; :mod:`.float16` -- ``to_float16``;
:mod:`.base` -- ``ExportError`` and format constants.
"""
from .base import MIN_OPSET, WEIGHT_FORMATS, ExportError, default_accuracy_level
from .export import export_onnx, layer_formats
from .float16 import to_float16

__all__ = ["export_onnx", "ExportError", "layer_formats", "to_float16", "WEIGHT_FORMATS", "MIN_OPSET",
           "default_accuracy_level"]
