"""Shared pieces of the ONNX backend: the error type, format constants and the record of one quantized layer."""
from __future__ import annotations

from dataclasses import dataclass

from ...quant import QuantWeight

WEIGHT_FORMATS = ("qdq", "matmulnbits")
MIN_OPSET = 13  # DequantizeLinear with axis
TORCH_MAX_OPSET = 20  # the TorchScript exporter's ceiling; the graph is relabelled up to `opset`
_PLACEHOLDER = "QuantWeightRef"
_PDOMAIN = "fxc"
_MS = "com.microsoft"


class ExportError(ValueError):
    """The model cannot be lowered to ONNX as asked; the message names the layer / node and why."""


@dataclass
class _Site:
    name: str
    kind: str  # "linear" | "conv"
    qw: QuantWeight
