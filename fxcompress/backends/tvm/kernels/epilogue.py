"""Epilogues of the hand-written quantized-linear kernels: the elementwise ops that consume a linear's output,
computed in the kernel's final store instead of in kernels of their own.

An :class:`Epilogue` is a parameter of :func:`.mma_gemv.packed_mma_primfunc` and
:func:`.cuda_core_gemv.packed_gemv_primfunc`; it says which extra inputs the kernel takes, how many output features
it writes, and the TIR expression of each stored value (:meth:`Epilogue.store`).  Each expression repeats the
rounding points of the unfused ops it replaces (the Relax ops the importer emits for the PyTorch model), so the
fused kernel stores the same fp16 values:

* ``"none"``: ``fp16(acc (+ bias))``, the kernel as before.
* ``"residual"``: ``r + y`` with ``y = fp16(acc (+ bias))`` and ``r`` an fp16 tensor of the output's shape (a
  transformer's residual stream): the fp16 add, computed as ``fp16(float(y) + float(r))`` (the same value: fp32
  carries more than twice fp16's precision, so rounding twice equals rounding once).
* ``"float32"``: ``float(fp16(acc (+ bias)))`` stored as fp32 (a linear whose output is cast to fp32 at once,
  e.g. logits): the same values, written by the kernel instead of a cast kernel.
* ``"swiglu"``: ``fp16(float(g) * sigmoid(float(g))) * u`` with ``g`` / ``u`` the fp16 outputs of the two halves of
  a fused gate/up linear (``F.silu(gate(x)) * up(x)`` in fp16, which PyTorch's export computes in fp32 and
  rounds to fp16 before the product).  The kernel writes half the features.  The tensor-core kernel needs gate
  feature ``j`` and up feature ``j`` in one 16-row tile: the weight rows are interleaved by
  :func:`swiglu_row_order` (rows ``g`` and ``g + 8`` of an mma tile are held by the same lane).

:func:`primfunc_with_params` builds a kernel whose parameter list depends on which optional inputs it has.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EPILOGUES = ("none", "residual", "swiglu", "float32")

__all__ = ["EPILOGUES", "Epilogue", "primfunc_with_params", "swiglu_row_order", "unpack_mma_words"]


@dataclass(frozen=True)
class Epilogue:
    """Which elementwise ops follow the linear inside its kernel (one of :data:`EPILOGUES`)."""

    kind: str = "none"

    def __post_init__(self):
        if self.kind not in EPILOGUES:
            raise ValueError(f"Epilogue.kind must be one of {EPILOGUES}, got {self.kind!r}")

    @property
    def has_residual(self) -> bool:
        return self.kind == "residual"

    @property
    def name_suffix(self) -> str:
        """What a kernel's name gets for this epilogue ("", "_res", "_swiglu", "_f32")."""
        return {"none": "", "residual": "_res", "swiglu": "_swiglu", "float32": "_f32"}[self.kind]

    @property
    def out_dtype(self) -> str:
        return "float32" if self.kind == "float32" else "float16"

    def out_features(self, n: int) -> int:
        """Features the kernel writes for a linear of ``n`` output features."""
        if self.kind == "swiglu":
            if n % 2:
                raise ValueError(f"a swiglu epilogue needs an even number of features, got {n}")
            return n // 2
        return n

    def store(self, acc, residual=None):
        """The fp16 value stored: ``acc`` is the fp32 sum (bias included) of the output feature, or for
        ``"swiglu"`` the pair ``(gate, up)`` of fp32 sums; ``residual`` the fp16 residual element."""
        from tvm import tirx

        def f16(v):
            return tirx.Cast("float16", v)

        def f32(v):
            return tirx.Cast("float32", v)

        if self.kind == "none":
            return f16(acc)
        if self.kind == "float32":
            return f32(f16(acc))
        if self.kind == "residual":
            return f16(f32(f16(acc)) + f32(residual))
        gate, up = acc
        g = f32(f16(gate))
        return f16(g * tirx.sigmoid(g)) * f16(up)


def swiglu_row_order(n: int) -> np.ndarray:
    """Row order of a fused gate/up weight (``n`` rows: gate ``0 .. n/2``, up ``n/2 .. n``) for the tensor-core
    kernel's swiglu epilogue: tile ``t`` (rows ``16 t .. 16 t + 16``) holds gate features ``8 t .. 8 t + 8`` in its
    rows 0-7 and the matching up features in rows 8-15.  ``w[swiglu_row_order(n)]`` is the reordered weight."""
    if n % 16:
        raise ValueError(f"swiglu row order needs n % 16 == 0, got {n}")
    half = n // 2
    t = np.arange(n // 16)[:, None]
    r = np.arange(8)[None, :]
    return np.concatenate([8 * t + r, half + 8 * t + r], axis=1).reshape(-1)


def unpack_mma_words(words: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of :func:`..packing.pack_mma_words` with ``qmin = 0``: the offset codes ``u (N, K)`` of the
    fragment-ordered words ``(N/16, K/kpl, 32, 4)`` (to reorder a packed weight's rows)."""
    w = np.asarray(words, dtype=np.uint64)
    rb, kq, lanes, _ = w.shape
    kpl = 256 // bits
    k = kq * kpl
    r = 16 // bits
    wpt = 4 // r
    w = w.transpose(0, 1, 3, 2).reshape(rb, k // 16, wpt, lanes)  # (K16 slice, word of the slice, lane)
    lane = np.arange(lanes)
    g, t = lane // 4, lane % 4
    rows = np.array([g, g + 8, g, g + 8])
    cols = np.array([2 * t, 2 * t, 2 * t + 8, 2 * t + 8])
    mask = np.uint64((1 << bits) - 1)
    tiles = np.zeros((rb, k // 16, 16, 16), dtype=np.int64)
    for i in range(4):
        for h in range(2):
            tiles[:, :, rows[i], cols[i] + h] = (w[:, :, i // r] >> np.uint64(bits * (i % r) + 16 * h)) & mask
    return tiles.transpose(0, 2, 1, 3).reshape(rb * 16, k)


def primfunc_with_params(body, params, attrs: dict, name: str = "kernel"):
    """A TVMScript PrimFunc ``name(*present params)`` whose body is the macro call ``body(*all params)``.

    ``params``: ``(name, shape, dtype)`` per parameter in the macro's order, or ``(name, None, None)`` for an
    optional input the kernel does not take (the macro receives ``None`` for it and must not read it).  Built from
    source text because a TVMScript signature cannot be assembled any other way."""
    from tvm.script import from_source
    from tvm.script import tirx as T

    env = {"T": T, "body": body, "attrs": attrs}
    sig, call = [], []
    for pname, shape, dtype in params:
        if shape is None:
            call.append("None")
            continue
        env[f"{pname}_shape"] = tuple(int(d) for d in shape)
        sig.append(f"{pname}: T.Buffer({pname}_shape, {dtype!r})")
        call.append(pname)
    src = (f"@T.prim_func(private=True)\ndef {name}({', '.join(sig)}):\n    T.func_attr(attrs)\n"
           f"    body({', '.join(call)})\n")
    return from_source(src, extra_vars=env)
