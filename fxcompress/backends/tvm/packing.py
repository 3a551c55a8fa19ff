"""Packing of integer codes into the uint32 words the TVM kernels read.

``pack_words``: codes along K into words, ``32 // bits`` codes a word, low bits first (MLC-LLM's group-quantization
layout; the fused te kernel and the CUDA-core GEMV read it).  ``pack_mma_words``: int4 / int8 codes in the
fragment order of ``mma.m16n8k16`` (the tensor-core kernel reads it).
"""
from __future__ import annotations

import numpy as np

from .base import TVMBackendError

__all__ = ["pack_words", "unpack_words", "pack_mma_words", "mma_k_per_load", "MMA_BITS"]


def pack_words(codes: np.ndarray, bits: int, qmin: int) -> np.ndarray:
    """Pack integer codes ``(N, K)`` into ``uint32`` words ``(N, ceil(K / (32 // bits)))`` along K.

    Code ``k`` of a row sits in word ``k // P`` at bits ``[(k % P) * bits, (k % P + 1) * bits)`` with
    ``P = 32 // bits`` (10 for 3-bit: the top 2 bits of each word are unused).  Codes are stored
    offset-binary (``code - qmin``); padding codes are 0.
    """
    per = 32 // bits
    u = (np.asarray(codes, dtype=np.int64) - qmin)
    if u.size and (u.min() < 0 or u.max() >= 2**bits):
        raise TVMBackendError(f"codes out of range for {bits}-bit packing")
    n, k = u.shape
    kp = -(-k // per) * per
    if kp != k:
        u = np.concatenate([u, np.zeros((n, kp - k), np.int64)], axis=1)
    u = u.reshape(n, kp // per, per).astype(np.uint64)
    shifts = (np.arange(per, dtype=np.uint64) * np.uint64(bits))
    return (u << shifts).sum(axis=-1).astype(np.uint32)


def unpack_words(words: np.ndarray, bits: int, k: int, qmin: int) -> np.ndarray:
    """Inverse of :func:`pack_words` (for tests)."""
    per = 32 // bits
    w = np.asarray(words, dtype=np.uint64)
    shifts = (np.arange(per, dtype=np.uint64) * np.uint64(bits))
    u = (w[..., None] >> shifts) & np.uint64(2**bits - 1)
    return u.reshape(w.shape[0], -1)[:, :k].astype(np.int64) + qmin


MMA_BITS = (4, 8)


def mma_k_per_load(bits: int) -> int:
    """K covered by one 16-byte lane load: 4 K16 slices for int4 (one word each), 2 for int8 (two words each)."""
    return 256 // bits


def pack_mma_words(codes, qmin: int, bits: int = 4):
    """Repack int4 / int8 codes ``(N, K)`` into ``uint32 (N/16, K/kpl, 32, 4)`` (``kpl``: :func:`mma_k_per_load`):
    the 4 words lane ``l`` loads for a (row block, K block) hold that lane's mma.m16n8k16 A fragments for the
    block's 16-wide K slices -- A register ``a_i`` (rows ``l // 4`` / ``l // 4 + 8``, columns ``2 (l % 4) + {0, 1}``
    / ``+ 8``) sits in word ``i // r`` (``r = 16 // bits`` registers a word) at bits ``bits * (i % r)`` (low half)
    and ``16 + bits * (i % r)`` (high half), so ``(w >> shift) & mask | 0x64006400`` is that register as an fp16
    pair ``1024 + u``."""
    if bits not in MMA_BITS:
        raise ValueError(f"mma packing takes bits in {MMA_BITS}, got {bits}")
    u = np.asarray(codes, dtype=np.int64) - qmin
    n, k = u.shape
    kpl = mma_k_per_load(bits)
    if n % 16 or k % kpl:
        raise ValueError(f"mma packing needs N % 16 == 0 and K % {kpl} == 0, got {n}x{k}")
    lane = np.arange(32)
    g, t = lane // 4, lane % 4
    rows = np.array([g, g + 8, g, g + 8])  # a0..a3: (row offset, col offset) inside a 16x16 tile
    cols = np.array([2 * t, 2 * t, 2 * t + 8, 2 * t + 8])
    r = 16 // bits  # A registers per word
    wpt = 4 // r  # words per 16-wide K slice
    tiles = u.reshape(n // 16, 16, k // 16, 16).transpose(0, 2, 1, 3)  # (rb, kt, 16, 16)
    out = np.zeros((n // 16, k // 16, wpt, 32), dtype=np.uint64)
    for i in range(4):
        for h in range(2):
            vals = tiles[:, :, rows[i], cols[i] + h].astype(np.uint64)  # (rb, kt, 32)
            out[:, :, i // r] |= vals << np.uint64(bits * (i % r) + 16 * h)
    return out.reshape(n // 16, k // kpl, 4, 32).transpose(0, 1, 3, 2).astype(np.uint32).copy()
