"""Integer-weight convolutions as TE PrimFuncs: the int8 codes stay an ``int8`` constant and the conv computes from them.

Two computes, both written as an implicit GEMM (for ``groups == 1``) so dlight's Matmul rule recognises them and
inlines the im2col gather and the weight decode into its shared-memory loads (:mod:`..rules.conv_gemm`):

* :func:`dequant_conv2d_te` (**weight-only int8**): float activations ``x (N, C, H, W)``; the weight is
  ``int8 (O, C*kh*kw)`` codes (offset so they fit int8) decoded in the kernel as ``(code - zp[o]) * scale[o]`` and
  multiplied in the activation dtype, accumulating in float32 -- HBM holds and the kernel reads int8 weights.
* :func:`int8_conv2d_te` (**int8 x int8**, summed in int32, or -- for CUDA tensor cores -- as exact fp16 products
  summed in float32): the activations arrive as int8 codes ``q8 = q - 128``
  of a uint8 per-tensor quantizer ``(scale_x, zp_x)``; padding is filled with ``zp8 = zp_x - 128`` (the code of 0.0),
  so ``sum_k (q8 - zp8) w8 = acc - zp8 * sum_k w8`` exactly, and the requantize epilogue is
  ``y = float32(acc - zp8 * rowsum[o]) * (scale_x * scale_w[o]) + bias[o]`` (cast to the activation dtype).

Each function is ONE PrimFunc: ``pad`` -> ``im2col`` -> (``dequantize``) -> ``conv_gemm`` (reduction over
``K = C*kh*kw`` in ``(c, r, s)`` order) -> ``epilogue``.  ``groups > 1`` (depthwise / grouped) is a direct
convolution (no GEMM form; scheduled by dlight's generic rules).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ConvGeometry", "dequant_conv2d_te", "int8_conv2d_te", "weight_codes_int8", "MMA_DTYPES"]

@dataclass(frozen=True)
class ConvGeometry:
    """Static shape of one conv: input ``(n, c, h, w)``, weight ``(o, c // groups, kh, kw)`` and its arguments."""

    n: int
    c: int
    h: int
    w: int
    o: int
    kh: int
    kw: int
    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int

    def __post_init__(self):
        for f in ("n", "c", "h", "w", "o", "kh", "kw", "groups"):
            v = getattr(self, f)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"ConvGeometry.{f} must be an int > 0, got {v!r}")
        if self.c % self.groups or self.o % self.groups:
            raise ValueError(f"ConvGeometry.groups={self.groups} must divide c={self.c} and o={self.o}")
        if self.oh <= 0 or self.ow <= 0:
            raise ValueError(f"ConvGeometry: empty output {self.oh}x{self.ow}")

    @property
    def oh(self) -> int:
        return (self.h + 2 * self.padding[0] - self.dilation[0] * (self.kh - 1) - 1) // self.stride[0] + 1

    @property
    def ow(self) -> int:
        return (self.w + 2 * self.padding[1] - self.dilation[1] * (self.kw - 1) - 1) // self.stride[1] + 1

    @property
    def k(self) -> int:
        """The GEMM reduction length ``(c / groups) * kh * kw``."""
        return self.c // self.groups * self.kh * self.kw

    @property
    def out_shape(self) -> tuple:
        return (self.n, self.o, self.oh, self.ow)


def weight_codes_int8(codes: np.ndarray, qmin: int, qmax: int) -> tuple[np.ndarray, int]:
    """Codes ``(O, Cg, kh, kw)`` -> ``(int8 (O, Cg*kh*kw), offset)`` with ``stored = code - offset``.

    Signed codes (symmetric, qmin >= -128) are stored as they are (offset 0); unsigned 8-bit codes (asymmetric,
    0..255) are shifted by 128, and the decode subtracts ``zp - offset`` instead of ``zp``."""
    off = 0 if (qmin >= -128 and qmax <= 127) else 128
    c = np.asarray(codes, dtype=np.int64) - off
    if c.size and (c.min() < -128 or c.max() > 127):
        raise ValueError(f"conv weight codes in [{qmin}, {qmax}] do not fit int8 (bits > 8?)")
    return c.reshape(c.shape[0], -1).astype(np.int8), off


def _im2col(te, tirx, x, g: ConvGeometry, pad_value):
    """``pad`` and ``im2col`` blocks (``groups == 1``): col[n, oh, ow, k] with k = (c, r, s)."""
    (sh, sw), (dh, dw) = g.stride, g.dilation
    xp = _padded(te, tirx, x, g, pad_value)
    khw = g.kh * g.kw

    def col_fn(n, i, j, k):
        c, r, s = k // khw, (k % khw) // g.kw, k % g.kw
        return xp[n, c, i * sh + r * dh, j * sw + s * dw]

    return te.compute((g.n, g.oh, g.ow, g.k), col_fn, name="im2col")


def _direct(te, tirx, xp_fn, wk, g: ConvGeometry, acc: str, name: str):
    """A direct (grouped) convolution reduction reading ``xp_fn(n, c, i, j)`` and ``wk(o, k)``."""
    (sh, sw), (dh, dw) = g.stride, g.dilation
    cg, og, khw = g.c // g.groups, g.o // g.groups, g.kh * g.kw
    rc = te.reduce_axis((0, cg), name="rc")
    rr = te.reduce_axis((0, g.kh), name="rr")
    rs = te.reduce_axis((0, g.kw), name="rs")

    def fn(n, o, i, j):
        c = (o // og) * cg + rc
        a = xp_fn(n, c, i * sh + rr * dh, j * sw + rs * dw).astype(acc)
        return te.sum(a * wk(o, rc * khw + rr * g.kw + rs).astype(acc), axis=[rc, rr, rs])

    return te.compute(g.out_shape, fn, name=name)


def _padded(te, tirx, x, g: ConvGeometry, pad_value):
    (ph, pw) = g.padding
    if not (ph or pw):
        return x
    return te.compute((g.n, g.c, g.h + 2 * ph, g.w + 2 * pw),
                      lambda n, c, i, j: tirx.if_then_else(tirx.all(i >= ph, i < g.h + ph, j >= pw, j < g.w + pw),
                                                           x[n, c, i - ph, j - pw], pad_value), name="pad")


def dequant_conv2d_te(g: ConvGeometry, dtype: str, *, has_zero_point: bool, per_channel: bool, has_bias: bool):
    """The TE function ``f(x, w_int8, scale[, zp][, bias]) -> y`` of the weight-only int8 conv (float activations).

    ``scale`` / ``zp`` / ``bias`` are ``(O,)`` (``(1,)`` when per tensor) in ``dtype``; the decoded weight is
    ``(w_int8 - zp) * scale`` in ``dtype`` (``zp`` already holds the storage offset of :func:`weight_codes_int8`); products accumulate in float32."""
    from tvm import te, tirx

    acc = "float32"

    def f(x, w, scale, *rest):
        rest = list(rest)
        zp = rest.pop(0) if has_zero_point else None
        bias = rest.pop(0) if has_bias else None

        def deq(o, k):
            r = o if per_channel else 0
            u = w[o, k].astype(dtype)
            if zp is not None:
                u = u - zp[r]
            return u * scale[r]

        d = te.compute((g.o, g.k), deq, name="dequantize")
        zero = tirx.const(0, dtype)
        if g.groups == 1:
            col = _im2col(te, tirx, x, g, zero)
            rk = te.reduce_axis((0, g.k), name="k")
            y = te.compute(g.out_shape, lambda n, o, i, j: te.sum(col[n, i, j, rk].astype(acc) * d[o, rk].astype(acc),
                                                                   axis=rk), name="conv_gemm")
        else:
            xp = _padded(te, tirx, x, g, zero)
            y = _direct(te, tirx, lambda *i: xp[i], lambda o, k: d[o, k], g, acc, "conv_direct")

        def epi(n, o, i, j):
            v = y[n, o, i, j]
            if bias is not None:
                v = v + bias[o].astype(acc)
            return v.astype(dtype) if dtype != acc else v

        return te.compute(g.out_shape, epi, name="epilogue")

    return f


MMA_DTYPES = ("int32", "float16")


def int8_conv2d_te(g: ConvGeometry, dtype: str, *, zp8: int, per_channel: bool, has_bias: bool,
                   mma: str = "int32"):
    """The TE function ``f(x_int8, w_int8, mult, corr[, bias]) -> y`` of the int8 x int8 conv.

    ``x_int8``: activation codes ``q - 128``; padding is ``zp8`` (the code of 0.0).  ``corr`` is
    ``int32 (O,) = zp8 * sum_k w8[o, k]``; ``mult`` = ``scale_x * scale_w[o]`` (float32, ``(O,)`` or ``(1,)``);
    ``bias`` float32 ``(O,)``.  ``y = float32(acc - corr[o]) * mult[o] + bias[o]``, cast to ``dtype``.

    ``mma``: how the products are summed.  "int32": int8 x int8 -> int32 (exact).  "float16": the int8 codes are
    converted to fp16 on their way into the GEMM (``act_f16`` / ``w_f16`` blocks, inlined into the loads, so
    memory still holds and the kernel still reads int8) and summed in float32: the form dlight's fp16 tensor-core
    rule takes (TVM 0.27's int8 wmma path does not build).  Every int8 value and every product (|p| <= 2**14) is
    exact in fp16 / fp32; the float32 sum is exact while partial sums stay below 2**24 and otherwise rounds at
    float32 precision, as the float torch reference does."""
    from tvm import te, tirx

    if not -128 <= zp8 <= 127:
        raise ValueError(f"zp8 must be an int8 value, got {zp8}")
    if mma not in MMA_DTYPES:
        raise ValueError(f"mma must be one of {MMA_DTYPES}, got {mma!r}")
    acc = "int32" if mma == "int32" else "float32"

    def f(x, w, mult, corr, *rest):
        bias = rest[0] if has_bias else None
        pad = tirx.const(zp8, "int8")
        if g.groups == 1:
            col = _im2col(te, tirx, x, g, pad)
            wk = w
            if mma == "float16":
                col = te.compute(col.shape, lambda *i: col[i].astype("float16"), name="act_f16")
                wk = te.compute(w.shape, lambda *i: w[i].astype("float16"), name="w_f16")
            rk = te.reduce_axis((0, g.k), name="k")
            y = te.compute(g.out_shape, lambda n, o, i, j: te.sum(
                col[n, i, j, rk].astype(acc) * wk[o, rk].astype(acc), axis=rk), name="conv_gemm")
        else:
            xp = _padded(te, tirx, x, g, pad)
            y = _direct(te, tirx, lambda *i: xp[i], lambda o, k: w[o, k], g, acc, "conv_direct")

        def epi(n, o, i, j):
            m = mult[o] if per_channel else mult[0]
            v = (y[n, o, i, j] - corr[o].astype(acc)).astype("float32") * m
            if bias is not None:
                v = v + bias[o]
            return v.astype(dtype) if dtype != "float32" else v

        return te.compute(g.out_shape, epi, name="epilogue")

    return f
