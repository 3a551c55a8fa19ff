"""ONNX translations of the ``fxcompress::`` ops for ``torch.onnx.export(..., dynamo=True)``.

    torch.onnx.export(ep, dynamo=True, custom_translation_table=fxcompress.backends.onnx_custom_ops.translation_table())

Each op becomes standard ONNX (opset 18): the packed uint8 bit stream is unpacked with ``BitShift`` /
``BitwiseAnd`` into codes (any of 2/3/4/8 bits, the layout of :mod:`fxcompress.quant.packing`), dequantized as
``(codes - zero_point) * scale`` per group, and fed to ``MatMul`` (+ bias) or ``Conv``. The packed codes stay
initializers of the model; ORT folds the decode into a constant weight at session start.
"""
from __future__ import annotations

import numpy as np


def _decode(op, packed, scale, zero_point, bits: int, symmetric: bool, granularity: str, group_size: int,
            shape: list[int]):
    """ONNX ops computing the float weight of ``shape`` from the packed stream."""
    n = int(np.prod(shape))
    qmin = -(2 ** (bits - 1)) if symmetric else 0
    if bits == 8:
        codes = op.Cast(packed, to=1)
    else:
        shifts = op.Constant(value_ints=list(range(8)))
        b = op.Unsqueeze(packed, op.Constant(value_ints=[1]))
        stream = op.BitwiseAnd(op.BitShift(b, op.Cast(shifts, to=2), direction="RIGHT"),
                               op.Cast(op.Constant(value_ints=[1]), to=2))
        stream = op.Reshape(op.Cast(stream, to=1), op.Constant(value_ints=[-1]))
        stream = op.Slice(stream, op.Constant(value_ints=[0]), op.Constant(value_ints=[n * bits]))
        bitsv = op.Constant(value_floats=[float(2 ** k) for k in range(bits)])
        codes = op.ReduceSum(op.Mul(op.Reshape(stream, op.Constant(value_ints=[n, bits])), bitsv),
                             op.Constant(value_ints=[1]), keepdims=0)
    if qmin:
        codes = op.Add(codes, op.Constant(value_float=float(qmin)))
    rows = shape[0]
    if granularity == "per_tensor":
        gshape = [1, 1, n]
    elif granularity == "per_channel":
        gshape = [rows, 1, n // rows]
    else:
        gshape = [rows, shape[1] // group_size, group_size]
    g = op.Reshape(codes, op.Constant(value_ints=gshape))
    axis = op.Constant(value_ints=[2])
    w = op.Mul(op.Sub(g, op.Unsqueeze(zero_point, axis)), op.Unsqueeze(scale, axis))
    return op.Reshape(w, op.Constant(value_ints=list(shape)))


def quant_linear(x, packed, scale, zero_point, bias, bits: int, symmetric: bool, granularity: str,
                 group_size: int, out_features: int, in_features: int):
    from onnxscript import opset18 as op

    w = _decode(op, packed, scale, zero_point, bits, symmetric, granularity, group_size, [out_features, in_features])
    y = op.MatMul(x, op.Transpose(w, perm=[1, 0]))
    return y if bias is None else op.Add(y, bias)


def quant_conv2d(x, packed, scale, zero_point, bias, bits: int, symmetric: bool, granularity: str,
                 weight_shape: list[int], stride: list[int], padding: list[int], dilation: list[int], groups: int):
    from onnxscript import opset18 as op

    w = _decode(op, packed, scale, zero_point, bits, symmetric, granularity, 0, list(weight_shape))
    pads = [int(p) for p in padding] * 2
    if bias is None:
        return op.Conv(x, w, strides=list(stride), pads=pads, dilations=list(dilation), group=groups)
    return op.Conv(x, w, bias, strides=list(stride), pads=pads, dilations=list(dilation), group=groups)


def translation_table() -> dict:
    """``{torch op overload: onnxscript function}`` for ``torch.onnx.export(custom_translation_table=...)``."""
    import torch

    from ..nn import ops  # noqa: F401 - registers the ops

    return {torch.ops.fxcompress.quant_linear.default: quant_linear,
            torch.ops.fxcompress.quant_conv2d.default: quant_conv2d}
