"""Relax emission of integer-weight convolutions and of per-tensor activation fake-quant (no dequantize at import).

* :func:`emit_act_quant`: ``fake_quantize_per_tensor_affine(x, s, zp, qmin, qmax)`` (what
  :func:`fxcompress.passes.activations.quantize_activations` inserts) as TWO elementwise PrimFuncs: ``act_quantize``
  (the int8 codes ``q - offset`` that integer convolutions read) and ``act_fake_quant`` (the float value torch
  computes, for every other user, e.g. a residual add).  Whichever has no user is removed by dead-code elimination;
  ``FuseOps`` fuses ``act_quantize`` into the producing conv's epilogue (a requantize: the conv kernel writes int8).
* :func:`emit_quant_conv`: a ``QuantConv2d`` as ONE PrimFunc (:mod:`.kernels.conv_int8`) reading an ``int8``
  constant weight ``(O, C/groups*kh*kw)``:

  - ``"int8xint8"`` when its input is such a quantized activation and the weight is symmetric (zero point 0) with
    codes in int8: int8 x int8 -> int32 implicit GEMM, requantize epilogue in float32;
  - ``"weight_only_int8"`` otherwise: the float activations times the weight decoded in the kernel
    (``(code - zp) * scale``, accumulating in float32).

* :func:`convert_float_convolution`: a float (not quantized) 2-D ``aten.convolution`` in the activation dtype.

Every figure matches the torch reference op for op: the activation codes are ``nearbyint(x * (1 / s)) + zp``
clamped (torch's rounding, half to even), the weight decode is ``(code - zp) * scale``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...nn import QuantConv2d
from .base import TVMBackendError, require_tvm
from .kernels.conv_int8 import ConvGeometry, dequant_conv2d_te, int8_conv2d_te, weight_codes_int8

__all__ = ["ActQuant", "ConvInfo", "emit_act_quant", "emit_quant_conv", "convert_float_convolution", "CONV_PATHS"]

CONV_PATHS = ("int8xint8", "weight_only_int8")


@dataclass(frozen=True)
class ActQuant:
    """A quantized activation as the convs see it: int8 codes ``q8 = q - offset`` of ``(q - zp) * scale``."""

    codes: object  # relax.Var, int8, same shape as the float tensor
    scale: float
    zero_point: int
    offset: int

    @property
    def zp8(self) -> int:
        return self.zero_point - self.offset


@dataclass
class ConvInfo:
    name: str
    path: str  # one of CONV_PATHS
    why: str  # why this path (e.g. why not int8xint8)
    bits: int
    shape: tuple  # weight (O, C/groups, kh, kw)
    groups: int
    weight_dtype: str  # dtype of the weight constant the kernel reads ("int8")
    weight_bytes: int
    input_shape: tuple
    primfunc: str = ""


def _static_shape(x, what: str) -> tuple:
    from tvm import tirx

    shape = [int(d) if isinstance(d, tirx.IntImm) else d for d in x.ty.shape]
    if not all(isinstance(d, int) for d in shape):
        raise TVMBackendError(f"{what}: the TVM integer conv needs a static input shape, got {shape}")
    return tuple(shape)


def emit_act_quant(bb, x, scale: float, zero_point: int, qmin: int, qmax: int, name: str = "act"):
    """Emit the fake-quant of ``x`` as (float result, :class:`ActQuant`)."""
    require_tvm()
    from tvm import te, tirx

    dtype = str(x.ty.dtype)
    if dtype not in ("float32", "float16"):
        raise TVMBackendError(f"{name}: fake-quant of a {dtype} tensor is not supported (float32 / float16)")
    if not (np.isfinite(scale) and scale > 0):
        raise TVMBackendError(f"{name}: fake-quant scale must be finite and > 0, got {scale}")
    if qmax - qmin > 255:
        raise TVMBackendError(f"{name}: fake-quant range [{qmin}, {qmax}] is wider than 8 bits")
    offset = 128 if qmax > 127 else 0
    inv = float(np.float32(1.0) / np.float32(scale))  # torch: inv_scale = 1.0f / scale

    def code(v):
        q = tirx.nearbyint(v.astype("float32") * tirx.const(inv, "float32")) + tirx.const(float(zero_point), "float32")
        return tirx.max(tirx.min(q, tirx.const(float(qmax), "float32")), tirx.const(float(qmin), "float32"))

    def quant(xt):
        return te.compute(xt.shape, lambda *i: (code(xt[i]) - tirx.const(float(offset), "float32")).astype("int8"),
                          name="act_quantize")

    def fake(xt):
        return te.compute(xt.shape, lambda *i: ((code(xt[i]) - tirx.const(float(zero_point), "float32"))
                                                * tirx.const(float(np.float32(scale)), "float32")).astype(dtype),
                          name="act_fake_quant")

    q8 = bb.emit_te(quant, x, primfunc_name_hint="act_quantize")
    xf = bb.emit_te(fake, x, primfunc_name_hint="act_fake_quant")
    return xf, ActQuant(q8, float(scale), int(zero_point), offset)


def _geometry(q: QuantConv2d, xshape: tuple, name: str) -> ConvGeometry:
    def pair(v):
        return tuple(v) if isinstance(v, (tuple, list)) else (v, v)

    if len(xshape) != 4:
        raise TVMBackendError(f"conv {name!r}: input must be 4-D (N, C, H, W), got {xshape}")
    o, cg, kh, kw = q.weight_shape
    if xshape[1] != cg * q.groups:
        raise TVMBackendError(f"conv {name!r}: input has {xshape[1]} channels, the weight expects {cg * q.groups}")
    return ConvGeometry(xshape[0], xshape[1], xshape[2], xshape[3], o, kh, kw, pair(q.stride), pair(q.padding),
                        pair(q.dilation), int(q.groups))


def _int8xint8_blocker(q: QuantConv2d, act: ActQuant | None) -> str | None:
    """None when the conv can run int8 x int8, else why not."""
    if act is None:
        return "input activation is not quantized"
    qw = q.quant_weight
    if bool(np.any(qw.zero_point.numpy() != 0)):
        return "weight has a zero point (asymmetric)"
    if qw.spec.qmin < -128 or qw.spec.qmax > 127:
        return f"weight codes [{qw.spec.qmin}, {qw.spec.qmax}] are not int8"
    if not -128 <= act.zp8 <= 127:
        return f"activation zero point {act.zero_point} does not fit int8 after offset {act.offset}"
    return None


def emit_quant_conv(bb, x, q: QuantConv2d, name: str, act: ActQuant | None = None, cuda: bool = False):
    """Emit ``q`` (a :class:`QuantConv2d`) reading its int8 codes: int8 x int8 when ``act`` (the quantized form of
    ``x``) is given and the weight allows it, else weight-only int8.  ``cuda``: the int8 x int8 products are summed
    as fp16 MMA operands in float32 (the tensor-core form, :func:`.kernels.conv_int8.int8_conv2d_te`), on llvm in
    int32.  Returns ``(y, ConvInfo)``."""
    require_tvm()
    from tvm import relax

    qw = q.quant_weight
    spec = qw.spec
    if spec.bits > 8:
        raise TVMBackendError(f"conv {name!r}: {spec.bits}-bit weights; the TVM integer conv takes up to 8 bits")
    if spec.granularity not in ("per_channel", "per_tensor"):
        raise TVMBackendError(f"conv {name!r}: {spec.granularity} weight scales are not supported by the TVM "
                              "integer conv (per_channel / per_tensor); requantize it per channel")
    dtype = str(x.ty.dtype)
    if dtype not in ("float32", "float16"):
        raise TVMBackendError(f"conv {name!r}: activations of dtype {dtype} are not supported (float32 / float16)")
    g = _geometry(q, _static_shape(x, f"conv {name!r}"), name)
    w8, off = weight_codes_int8(qw.codes().numpy(), spec.qmin, spec.qmax)
    scale = qw.scale.numpy().astype(np.float64).reshape(-1)
    zp = qw.zero_point.numpy().astype(np.float64).reshape(-1)
    per_channel = scale.size > 1
    bias = None if q.bias is None else q.bias.detach().double().numpy()
    blocker = _int8xint8_blocker(q, act)
    if blocker is None:
        mult = (act.scale * scale).astype(np.float32)
        corr = (act.zp8 * w8.astype(np.int64).sum(axis=1)).astype(np.int32)
        mma = "float16" if cuda and g.groups == 1 else "int32"
        f = int8_conv2d_te(g, dtype, zp8=act.zp8, per_channel=per_channel, has_bias=bias is not None, mma=mma)
        args = [act.codes, relax.const(w8), relax.const(mult), relax.const(corr)]
        if bias is not None:
            args.append(relax.const(bias.astype(np.float32)))
        path, why, hint = "int8xint8", f"input and weight quantized; products summed as {mma}", "fxc_conv2d_int8"
    else:
        np_dt = {"float32": np.float32, "float16": np.float16}[dtype]
        has_zp = bool(np.any(zp != 0)) or off != 0
        f = dequant_conv2d_te(g, dtype, has_zero_point=has_zp, per_channel=per_channel, has_bias=bias is not None)
        args = [x, relax.const(w8), relax.const(scale.astype(np_dt))]
        if has_zp:
            args.append(relax.const((zp - off).astype(np_dt)))  # stored codes are code - off
        if bias is not None:
            args.append(relax.const(bias.astype(np.float32)))
        path, why, hint = "weight_only_int8", blocker, "fxc_conv2d_dequant"
    y = bb.emit_te(f, *args, primfunc_name_hint=hint)
    info = ConvInfo(name, path, why, spec.bits, tuple(q.weight_shape), g.groups, "int8", int(w8.nbytes),
                    (g.n, g.c, g.h, g.w), hint)
    return y, info


def convert_float_convolution(node, importer):
    """``custom_convert_map`` entry for ``aten.convolution.default``: a float 2-D convolution whose result keeps the
    input's dtype, as torch's does.

    TVM 0.27's converter emits every conv2d with ``out_dtype="float32"`` and then adds the bias in the bias's own
    dtype, so in an fp16 CNN a float conv returned float32 (and one with a bias failed: "Binary operators must
    have the same datatype").  Here fp16 / bf16 products accumulate in float32, the bias is added in float32 and
    the sum is rounded once to the input dtype (FuseOps folds the casts into the conv's kernel).  float32 convs,
    1-D / 3-D and transposed convolutions go to TVM's own converter unchanged."""
    from tvm import relax

    args = importer.retrieve_args(node)
    x, weight = args[0], args[1]
    dtype = str(x.ty.dtype)
    transposed = args[6] if len(args) > 6 else False
    if dtype not in ("float16", "bfloat16") or transposed or len(x.ty.shape) != 4:
        return importer._convolution(node)  # noqa: SLF001 - TVM's converter for everything it handles right
    if str(weight.ty.dtype) != dtype:
        raise TVMBackendError(f"conv node {node.name!r}: {dtype} input with a {weight.ty.dtype} weight; cast the "
                              "model to one dtype")
    bias = args[2] if len(args) > 2 else None
    stride, padding, dilation = (args[i] if len(args) > i else d for i, d in ((3, 1), (4, 0), (5, 1)))
    groups = args[8] if len(args) > 8 else 1
    bb = importer.block_builder
    y = bb.emit(relax.op.nn.conv2d(x, weight, strides=stride, padding=padding, dilation=dilation, groups=groups,
                                   data_layout="NCHW", kernel_layout="OIHW", out_dtype="float32"))
    if bias is not None:
        b = bb.emit(relax.op.reshape(bb.emit(relax.op.astype(bias, "float32")), (1, -1, 1, 1)))
        y = bb.emit(relax.op.add(y, b))
    return bb.emit(relax.op.astype(y, dtype))
