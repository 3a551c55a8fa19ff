"""The tensor-core kernel's index math (fxcompress/backends/tvm/kernels/mma_gemv.py), checked on the CPU: a numpy
emulation that follows the kernel's loads, decode and fragment stores expression by expression, with mma.m16n8k16
modelled from the PTX ISA's fragment layouts (written here independently of the packing code), against a plain
float reference.  The CUDA build of the same kernel is checked for the mma instruction (nvcc) and, on a GPU, for
parity (gpu mark)."""
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from fxcompress.backends.tvm.kernels.mma_gemv import MAX_M, mma_prefetch_groups, mma_supports, mma_tile
from fxcompress.backends.tvm.packing import mma_k_per_load, pack_mma_words

LANES = 32
_L = np.arange(LANES)
_G, _T = _L // 4, _L % 4
# PTX ISA, "Matrix Fragments for mma.m16n8k16" (.f16): (row, col) of each element a lane holds
A_ROW = np.stack([_G, _G, _G + 8, _G + 8, _G, _G, _G + 8, _G + 8])  # a0..a7
A_COL = np.stack([2 * _T, 2 * _T + 1, 2 * _T, 2 * _T + 1, 2 * _T + 8, 2 * _T + 9, 2 * _T + 8, 2 * _T + 9])
B_ROW = np.stack([2 * _T, 2 * _T + 1, 2 * _T + 8, 2 * _T + 9])  # b0..b3: (k, n = g)
C_ROW = np.stack([_G, _G, _G + 8, _G + 8])  # c0..c3: (row, col = 2t + {0, 1})
C_COL = np.stack([2 * _T, 2 * _T + 1, 2 * _T, 2 * _T + 1])


def _mma(a, b, c):
    """a: (8, 32) fp16 per lane, b: (4, 32) fp16, c: (4, 32) fp32 -> D = A @ B + C in the same layout."""
    A = np.zeros((16, 16), np.float32)
    A[A_ROW, A_COL] = a
    B = np.zeros((16, 8), np.float32)
    B[B_ROW, np.broadcast_to(_G, (4, LANES))] = b
    return c + (A @ B)[C_ROW, C_COL]


def emulate(x, words, scale, zp, bias, *, m, k, n, bits, qmin, group_size, tiles=None, b_transform=None):
    """What ``packed_mma_primfunc`` computes, following its index expressions (lanes as a numpy axis).
    ``b_transform(b, q=, j=, t2=)``: what a prologue does to the B fragment ``b`` ((4, lanes) fp16) of load ``q``, K
    slice ``j``, n8 tile ``t2`` before the mma (tests/test_tvm_decode_prologue.py)."""
    warps, prefetch = mma_tile(m, k, bits, tiles)
    nt = -(-m // 8)
    na = nt * 8
    kpl = mma_k_per_load(bits)
    rpw, spl, cmask = 16 // bits, kpl // 16, (1 << bits) - 1
    kq_w = k // kpl // warps
    pf, tail = mma_prefetch_groups(kq_w, prefetch)
    groups = [(g * pf, pf) for g in range(kq_w // pf)] + ([(kq_w - tail, tail)] if tail else [])
    assert sum(c for _, c in groups) == kq_w  # every load of the warp's K range, in order
    threads = warps * LANES
    off = np.float16(1024 - qmin)
    x16 = np.ascontiguousarray(x.astype(np.float16))
    x32 = x16.view(np.uint32).reshape(m, k // 2)
    srows = scale.shape[0]
    y = np.zeros((m, n), np.float16)
    for bx in range(n // 16):
        red = np.zeros(warps * 16 * na, np.float32)
        for ty in range(warps):
            cf = np.zeros((nt * 4, LANES), np.float32)
            for q0, cnt in groups:
                for p in range(cnt):
                    q = ty * kq_w + q0 + p
                    wv = words[bx, q, :, :].T.astype(np.uint32)  # (4, lanes)
                    sz = np.zeros((4, LANES), np.float16)
                    for h in range(2):
                        r = np.minimum(bx * 16 + _L // 4 + h * 8, srows - 1)
                        sz[h * 2] = scale[r, q * kpl // group_size]
                        sz[h * 2 + 1] = zp[r, q * kpl // group_size] if zp is not None else 0
                    for j in range(spl):
                        au = np.stack([((wv[j * (4 // rpw) + i // rpw] >> np.uint32(bits * (i % rpw)))
                                        & np.uint32(cmask | (cmask << 16))) | np.uint32(0x64006400) for i in range(4)])
                        ah = au.T.copy().view(np.float16).T  # (8, lanes): a_e = half e % 2 of register e // 2
                        for e in range(8):
                            ah[e] = (ah[e] - off - sz[(e // 2) % 2 * 2 + 1]) * sz[(e // 2) % 2 * 2]
                        for t2 in range(nt):
                            bu = np.zeros((2, LANES), np.uint32)
                            for hb in range(2):
                                ok = t2 * 8 + _L // 4 < m
                                bu[hb] = np.where(ok, x32[np.minimum(t2 * 8 + _L // 4, m - 1),
                                                          (q * kpl + j * 16 + (_L % 4) * 2 + hb * 8) // 2], 0)
                            b = bu.T.copy().view(np.float16).T  # (4, lanes)
                            if b_transform is not None:
                                b = b_transform(b, q=q, j=j, t2=t2)
                            cf[t2 * 4:t2 * 4 + 4] = _mma(ah, b, cf[t2 * 4:t2 * 4 + 4])
            for t2 in range(nt):
                for c in range(4):
                    red[ty * (16 * na) + (_L // 4 + (c // 2) * 8) * na + t2 * 8 + (_L % 4) * 2 + c % 2] = cf[t2 * 4 + c]
        for o in range(-(-(16 * na) // threads)):
            for tid in range(threads):
                idx = o * threads + tid
                if idx < 16 * na and idx % na < m:
                    acc = np.float32(sum(red[wi * (16 * na) + idx] for wi in range(warps)))
                    if bias is not None:
                        acc = acc + np.float32(bias[bx * 16 + idx // na])
                    y[idx % na, bx * 16 + idx // na] = np.float16(acc)
    return y


@pytest.mark.parametrize("m", [1, 2, 8, 9, 24, 32])
@pytest.mark.parametrize("bits,group_size,zero_point", [(4, 64, True), (8, None, False), (4, None, False),
                                                         (8, 128, True)])
def test_emulated_kernel_matches_reference(m, bits, group_size, zero_point):
    rng = np.random.default_rng(m * 10 + bits)
    k, n = 256, 32
    qmin = -(1 << (bits - 1))
    codes = rng.integers(qmin, 1 << (bits - 1), size=(n, k))
    gs = group_size or k
    scale = rng.uniform(0.005, 0.02, size=(n, k // gs)).astype(np.float16)
    zp = rng.integers(-2, 3, size=(n, k // gs)).astype(np.float16) if zero_point else None
    bias = rng.standard_normal(n).astype(np.float16) if zero_point else None
    x = rng.standard_normal((m, k)).astype(np.float16)
    w = (codes - (0 if zp is None else np.repeat(zp.astype(np.float32), gs, 1))) * np.repeat(scale.astype(np.float32), gs, 1)
    ref = x.astype(np.float32) @ w.T + (0 if bias is None else bias.astype(np.float32))
    words = pack_mma_words(codes, qmin, bits)
    # 2 warps split K (k / kpl loads over warps), so the cross-warp reduction is exercised too
    y = emulate(x, words, scale, zp, bias, m=m, k=k, n=n, bits=bits, qmin=qmin, group_size=gs,
                tiles={"small": (2, 2), "batch": (2, 2)})
    assert np.abs(y.astype(np.float32) - ref).max() <= 2e-3 * np.abs(ref).max() + 1e-3


def test_prefetch_groups_keep_loads_in_flight_for_prime_counts():
    """11 loads a warp (K = 5632 over 8 warps): 8 in flight, then 3; not 1 at a time."""
    assert mma_prefetch_groups(11, 8) == (8, 3)
    assert mma_prefetch_groups(4, 8) == (4, 0)
    assert mma_prefetch_groups(16, 8) == (8, 0)


@pytest.mark.parametrize("m", [1, 9])
def test_emulated_kernel_with_a_last_partial_load_group(m):
    """K = 704 over 1 warp = 11 loads, prefetch 4: groups of 4, 4 and 3."""
    rng = np.random.default_rng(m)
    k, n, bits, gs = 704, 32, 4, 64
    codes = rng.integers(-8, 8, size=(n, k))
    scale = rng.uniform(0.005, 0.02, size=(n, k // gs)).astype(np.float16)
    x = rng.standard_normal((m, k)).astype(np.float16)
    ref = x.astype(np.float32) @ (codes * np.repeat(scale.astype(np.float32), gs, 1)).T
    y = emulate(x, pack_mma_words(codes, -8, bits), scale, None, None, m=m, k=k, n=n, bits=bits, qmin=-8,
                group_size=gs, tiles={"small": (1, 4), "batch": (1, 4)})
    assert np.abs(y.astype(np.float32) - ref).max() <= 2e-3 * np.abs(ref).max() + 1e-3


def test_mma_supports_1_to_32_rows():
    ok = dict(k=4096, n=4096, bits=4, group_size=128, dtype="float16")
    assert MAX_M == 32
    assert all(mma_supports(m=m, **ok) is None for m in (1, 2, 16, 24, 32))
    assert "batch 33" in mma_supports(m=33, **ok)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc to build CUDA code")
@pytest.mark.parametrize("m,bits", [(24, 4), (32, 8)])
def test_cuda_build_17_to_32_rows_uses_tensor_cores(m, bits):
    """17..32 rows: the tensor-core kernel with 3-4 n8 tiles (one mma per tile per decoded weight fragment); built
    with ``mma_batch=False`` (by default these rows get kernels/mma_batch.py)."""
    pytest.importorskip("tvm")
    from fxcompress.backends.tvm import TVMBuildConfig, build_tvm
    from fxcompress.nn import QuantLinear
    from fxcompress.quant import QuantSpec

    torch.manual_seed(0)
    q = nn.Sequential(QuantLinear.from_linear(nn.Linear(512, 256), QuantSpec(bits, False, "per_group", 128)))
    b = build_tvm(q, (torch.randn(1, m, 512),), target="cuda", dtype=torch.float16,
                  config=TVMBuildConfig(mma_batch=False))
    assert [layer["kernel"] for layer in b.info["layers"]] == ["fxc_mma"]
    assert b.kernel_names() == ["fxc_packed_mma_kernel"]
    src = b.device_source()
    assert "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in src
