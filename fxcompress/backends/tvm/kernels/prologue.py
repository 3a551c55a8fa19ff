"""Prologues of the tensor-core quantized-linear kernel: the op that produces a linear's input, computed inside
the kernel on the activations it loads instead of in a kernel of its own.

A :class:`Prologue` is a parameter of :func:`.mma_gemv.packed_mma_primfunc`.  One kind besides ``"none"``:

* ``"rms_norm"``: the kernel reads the RMSNorm's *input* ``x`` (fp16) and its weight ``g`` (fp16, shape ``(K,)``)
  and multiplies by the normalized activations.  The chain PyTorch's export makes of the LLaMA / Hugging Face
  RMSNorm in fp16 (``x.float(); x * rsqrt(x.pow(2).mean(-1, keepdim=True) + eps); weight * x.to(fp16)``), as the
  importer emits it in Relax: ``xf = astype(x, fp32); sq = xf * xf; s = mean(sq, -1) = sum(sq) / K;
  r = rsqrt(s + eps); h = astype(xf * r, fp16); y = g * h`` (fp16 product).  Every block computes the fp32 sums of
  squares of its rows itself (:meth:`Prologue.rstd`: each thread sums 8 consecutive elements per 16-byte load, a
  warp's lanes are summed by an xor butterfly of shuffles, the warps' sums through shared memory), then each B
  fragment element is :meth:`Prologue.normalize` of the loaded ``x``: the same rounding points as the unfused ops
  (fp32 square and sum, ``/ K``, ``+ eps``, ``rsqrt``, fp32 product, one rounding to fp16, the fp16 product with
  the weight, computed as ``fp16(float(g) * float(h))``: the product of two fp16 values is exact in fp32, so this
  is the correctly rounded fp16 product).  Only the order of the fp32 sum differs from TVM's reduction kernel, so
  the result can differ from the unfused graph's in the last bit of ``r`` (and then rarely by one fp16 ulp in an
  element).

The prologue is for decode: at most :data:`MAX_PROLOGUE_M` rows.  Each of the kernel's ``N / 16`` blocks re-reads
its rows of ``x`` (L2-resident: a few KB) to sum the squares, so that work grows with the rows while the launch it
saves does not; from 5 rows on the batch kernels take the layer and the norm stays a kernel of its own.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

PROLOGUES = ("none", "rms_norm")
MAX_PROLOGUE_M = 4  # activation rows the rms_norm prologue takes (decode; the tensor-core kernel's "small" case)

__all__ = ["PROLOGUES", "MAX_PROLOGUE_M", "Prologue"]


@dataclass(frozen=True)
class Prologue:
    """What the kernel computes from its input before the matmul (one of :data:`PROLOGUES`); ``eps``: the RMSNorm's
    epsilon (rounded to fp32, as the exported graph's constant is)."""

    kind: str = "none"
    eps: float = 0.0

    def __post_init__(self):
        if self.kind not in PROLOGUES:
            raise ValueError(f"Prologue.kind must be one of {PROLOGUES}, got {self.kind!r}")
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not math.isfinite(self.eps) \
                or self.eps < 0:
            raise ValueError(f"Prologue.eps must be a finite float >= 0, got {self.eps!r}")
        if self.kind == "none" and self.eps != 0:
            raise ValueError(f"Prologue.eps is for the rms_norm prologue; kind 'none' takes eps=0, got {self.eps!r}")
        object.__setattr__(self, "eps", float(self.eps))

    @property
    def has_weight(self) -> bool:
        """The kernel takes the norm's weight ``g`` (``(K,)`` fp16) as an extra input."""
        return self.kind == "rms_norm"

    def check_rows(self, m: int) -> str | None:
        """None when the prologue takes ``m`` activation rows, else the reason."""
        if self.kind != "none" and m > MAX_PROLOGUE_M:
            return f"the {self.kind} prologue takes at most {MAX_PROLOGUE_M} rows, got {m}"
        return None

    def to_json(self) -> dict:
        return {"kind": self.kind, "eps": self.eps}

    def rstd(self, sum_sq, k: int):
        """``rsqrt(sum_sq / K + eps)`` in fp32: the mean as TVM legalizes ``mean`` (sum, then divide by the count)."""
        from tvm import tirx

        return tirx.rsqrt(sum_sq / tirx.const(float(k), "float32") + tirx.const(self.eps, "float32"))

    def normalize(self, x, rstd, g):
        """The fp16 value the linear sees for the fp16 input element ``x`` of a row with ``rstd`` and weight
        element ``g``: ``g * fp16(float(x) * rstd)`` in fp16."""
        from tvm import tirx

        h = tirx.Cast("float16", tirx.Cast("float32", x) * rstd)
        return tirx.Cast("float16", tirx.Cast("float32", g) * tirx.Cast("float32", h))
