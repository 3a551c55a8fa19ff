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


ACCURACY_LEVELS = (0, 1, 2, 3, 4)


def default_accuracy_level(container_bits: int) -> int:
    """The ``accuracy_level`` written on a ``MatMulNBits`` node of ``container_bits`` (4 or 8) when the caller
    gives none: 4 (int8 activations inside the kernel) for both.

    Measured on CPU (``tools/results/ort_cpu.md``, 2048-wide decoder block, 2 threads): 8-bit weights at
    level 0 (fp32 compute) fall back to dequantize-then-GEMM and run ~20x *slower* than the fp32 model; 4-bit
    weights at level 0 are faster than fp32 at one token but slower at 128 tokens.  Level 4 is faster than
    fp32 in every row, at ~1e-2 absolute error on a block output (the table gives the logit error and the
    greedy-token agreement).  The CUDA EP's MatMulNBits kernels ignore the level.  Pass
    ``accuracy_level=0`` to :func:`~fxcompress.backends.onnx.export_onnx` for fp32 compute (bit-level parity
    with torch, slower)."""
    if container_bits not in (4, 8):
        raise ValueError(f"container_bits must be 4 or 8, got {container_bits!r}")
    return 4


class ExportError(ValueError):
    """The model cannot be lowered to ONNX as asked; the message names the layer / node and why."""


@dataclass
class _Site:
    name: str
    kind: str  # "linear" | "conv"
    qw: QuantWeight
