"""The tensor-core batch kernel's index math (fxcompress/backends/tvm/kernels/mma_batch.py), checked on the CPU: a
numpy emulation that follows the kernel's loads, decode, fragment stores, per-row-tile cross-warp sums and epilogue
stores expression by expression, with mma.m16n8k16 modelled from the PTX ISA's fragment layouts (the model of
tests/test_backends_tvm_mma_emulation.py, written independently of the packing code), against a plain float
reference; its tile choice, config knobs and dispatch; and the CUDA build (nvcc) of the kernel."""
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from fxcompress.nn import QuantLinear
from fxcompress.quant import QuantSpec

from fxcompress.backends.tvm.config import TVMBuildConfig
from fxcompress.backends.tvm.kernels.epilogue import swiglu_row_order
from fxcompress.backends.tvm.kernels.mma_batch import (DEFAULT_BATCH_TILES, MAX_M, STAGE_PAD, batch_supports,
                                                       batch_tile, packed_mma_batch_primfunc, smem_bytes)
from fxcompress.backends.tvm.kernels.mma_gemv import mma_prefetch_groups
from fxcompress.backends.tvm.packing import mma_k_per_load, pack_mma_words
from test_backends_tvm_mma_emulation import LANES, _mma

_L = np.arange(LANES)


def _store(kind, acc, up=None, res=None):
    """The epilogue's stored value (kernels/epilogue.py ``Epilogue.store``) in numpy, with its rounding points."""
    f16, f32 = np.float16, np.float32
    if kind == "none":
        return f16(acc)
    if kind == "float32":
        return f32(f16(acc))
    if kind == "residual":
        return f16(f32(f16(acc)) + f32(res))
    g = f32(f16(acc))
    return f16(g * (f32(1) / (f32(1) + np.exp(-g)))) * f16(up)


def emulate_batch(x, words, scale, zp, bias, res=None, *, m, k, n, bits, qmin, group_size, tiles=None,
                  epilogue="none"):
    """What ``packed_mma_batch_primfunc`` computes, following its index expressions (lanes as a numpy axis)."""
    rt, warps, prefetch, stage = batch_tile(m, k, n, bits, tiles)
    nt = -(-m // 8)
    na = nt * 8
    kpl = mma_k_per_load(bits)
    rpw, spl, cmask = 16 // bits, kpl // 16, (1 << bits) - 1
    kq_w = k // kpl // warps
    pf, tail = mma_prefetch_groups(kq_w, prefetch)
    groups = [(g * pf, pf) for g in range(kq_w // pf)] + ([(kq_w - tail, tail)] if tail else [])
    reuse_sz = (kq_w * kpl) % group_size == 0 and (pf * kpl) % group_size == 0
    threads = warps * LANES
    swiglu = epilogue == "swiglu"
    per_tile = 8 if swiglu else 16
    outs = per_tile * na
    cw = 16 * na
    ldw = (kpl + STAGE_PAD) // 2
    units, upr = m * kpl // 8, kpl // 8
    off = np.float16(1024 - qmin)
    x32 = np.ascontiguousarray(x.astype(np.float16)).view(np.uint32).reshape(m, k // 2)
    srows = scale.shape[0]
    n_out = n // 2 if swiglu else n
    y = np.zeros((m, n_out), np.float32 if epilogue == "float32" else np.float16)
    for bx in range(n // 16 // rt):
        cf = np.zeros((warps, rt * nt * 4, LANES), np.float32)
        for ty in range(warps):
            for q0, cnt in groups:
                wv = np.zeros((cnt * rt * 4, LANES), np.uint32)
                for p in range(cnt):
                    for r in range(rt):
                        wv[(p * rt + r) * 4:(p * rt + r) * 4 + 4] = words[bx * rt + r, ty * kq_w + q0 + p].T
                for p in range(cnt):
                    q = ty * kq_w + q0 + p
                    if not reuse_sz or p == 0 or p * kpl % group_size == 0:  # else: the previous load's scales
                        sz = np.zeros((rt * 4, LANES), np.float16)
                        for r in range(rt):
                            for h in range(2):
                                row = np.minimum((bx * rt + r) * 16 + _L // 4 + h * 8, srows - 1)
                                sz[r * 4 + h * 2] = scale[row, q * kpl // group_size]
                                sz[r * 4 + h * 2 + 1] = zp[row, q * kpl // group_size] if zp is not None else 0
                    if stage:  # the warp's rows of the shared buffer (its own region: ty * na rows on); the kernel
                        # loads K block q into registers while block q - 1 is computed, then stores them here
                        xs = np.full((warps * na * ldw,), 0xFFFFFFFF, np.uint32)  # garbage where not written
                        for u in range(-(-units // LANES)):
                            for lane in range(LANES):
                                if u * LANES + lane < units:
                                    for v in range(4):
                                        xs[(ty * na + (u * LANES + lane) // upr) * ldw + (u * LANES + lane) % upr * 4
                                           + v] = x32[(u * LANES + lane) // upr,
                                                      q * kpl // 2 + (u * LANES + lane) % upr * 4 + v]
                    for j in range(spl):
                        bu = np.zeros((nt * 2, LANES), np.uint32)
                        for t2 in range(nt):
                            for hb in range(2):
                                ok = t2 * 8 + _L // 4 < m
                                row = np.minimum(t2 * 8 + _L // 4, m - 1)
                                if stage:
                                    val = xs[(ty * na + row) * ldw + (j * 16 + (_L % 4) * 2 + hb * 8) // 2]
                                else:
                                    val = x32[row, (q * kpl + j * 16 + (_L % 4) * 2 + hb * 8) // 2]
                                bu[t2 * 2 + hb] = np.where(ok, val, 0)
                        for r in range(rt):
                            au = np.stack([((wv[(p * rt + r) * 4 + j * (4 // rpw) + i // rpw] >> np.uint32(bits * (i % rpw)))
                                            & np.uint32(cmask | (cmask << 16))) | np.uint32(0x64006400)
                                           for i in range(4)])
                            ah = au.T.copy().view(np.float16).T  # (8, lanes): a_e = half e % 2 of register e // 2
                            for e in range(8):
                                ah[e] = (ah[e] - off - sz[r * 4 + (e // 2) % 2 * 2 + 1]) * sz[r * 4 + (e // 2) % 2 * 2]
                            for t2 in range(nt):
                                b = bu[t2 * 2:t2 * 2 + 2].T.copy().view(np.float16).T  # (4, lanes)
                                c = (r * nt + t2) * 4
                                cf[ty, c:c + 4] = _mma(ah, b, cf[ty, c:c + 4])
        for r in range(rt):
            red = np.full(warps * cw, np.nan, np.float32)
            for ty in range(warps):
                for t2 in range(nt):
                    for c in range(4):
                        red[ty * cw + (_L // 4 + (c // 2) * 8) * na + t2 * 8 + (_L % 4) * 2 + c % 2] = \
                            cf[ty, (r * nt + t2) * 4 + c]
            for o in range(-(-outs // threads)):
                for tid in range(threads):
                    idx = o * threads + tid
                    if not (idx < outs and idx % na < m):
                        continue
                    acc = np.float32(sum(red[wi * cw + idx] for wi in range(warps)))
                    row = (bx * rt + r) * 16 + idx // na
                    if bias is not None:
                        acc = acc + np.float32(bias[row])
                    if swiglu:
                        up = np.float32(sum(red[wi * cw + 8 * na + idx] for wi in range(warps)))
                        if bias is not None:
                            up = up + np.float32(bias[row + 8])
                        y[idx % na, (bx * rt + r) * 8 + idx // na] = _store("swiglu", acc, up)
                    else:
                        y[idx % na, row] = _store(epilogue, acc, res=None if res is None else res[idx % na, row])
    return y


def _layer(rng, *, n, k, bits, group_size, zero_point, bias):
    qmin = -(1 << (bits - 1))
    codes = rng.integers(qmin, 1 << (bits - 1), size=(n, k))
    gs = group_size or k
    scale = rng.uniform(0.005, 0.02, size=(n, k // gs)).astype(np.float16)
    zp = rng.integers(-2, 3, size=(n, k // gs)).astype(np.float16) if zero_point else None
    b = rng.standard_normal(n).astype(np.float16) if bias else None
    w = (codes - (0 if zp is None else np.repeat(zp.astype(np.float32), gs, 1))) \
        * np.repeat(scale.astype(np.float32), gs, 1)
    return codes, qmin, gs, scale, zp, b, w


VARIANTS = [(4, 128, True), (4, None, False), (8, None, True), (8, 128, False)]  # bits, group size, zero point


@pytest.mark.parametrize("stage", [0, 1])
@pytest.mark.parametrize("m", [5, 8, 9, 16, 24, 32])
@pytest.mark.parametrize("bits,group_size,zero_point", VARIANTS)
def test_emulated_batch_kernel_matches_reference(m, bits, group_size, zero_point, stage):
    """2 row tiles a warp, 2 warps splitting K, 3 loads in flight (groups of 3 and a last 1 for int4); the
    activations staged in shared memory (stage 1) or read from global memory (stage 0)."""
    rng = np.random.default_rng(m * 10 + bits)
    k, n = 512, 64
    codes, qmin, gs, scale, zp, bias, w = _layer(rng, n=n, k=k, bits=bits, group_size=group_size,
                                                 zero_point=zero_point, bias=zero_point)
    x = rng.standard_normal((m, k)).astype(np.float16)
    ref = x.astype(np.float32) @ w.T + (0 if bias is None else bias.astype(np.float32))
    tiles = {"rows16": (2, 2, 3, stage), "rows32": (2, 2, 3, stage)}
    assert batch_tile(m, k, n, bits, tiles) == (2, 2, 3, stage)
    y = emulate_batch(x, pack_mma_words(codes, qmin, bits), scale, zp, bias, m=m, k=k, n=n, bits=bits, qmin=qmin,
                      group_size=gs, tiles=tiles)
    assert np.abs(y.astype(np.float32) - ref).max() <= 2e-3 * np.abs(ref).max() + 1e-3


@pytest.mark.parametrize("bits,group_size,pf", [(4, 128, 4), (8, 64, 4), (4, 128, 2)])
def test_emulated_scales_are_reused_within_a_scale_group(bits, group_size, pf):
    """Loads of a group that stay in one scale group reuse its scales (int4 g128, 4 loads: scales loaded at loads 0
    and 2; int8 g64: 2 loads a scale group): the emulation reloads exactly where the kernel does, so reusing
    across a group boundary would miss the reference."""
    rng = np.random.default_rng(bits * pf)
    k, n, m = 1024, 64, 16
    codes, qmin, gs, scale, zp, bias, w = _layer(rng, n=n, k=k, bits=bits, group_size=group_size, zero_point=True,
                                                 bias=False)
    x = rng.standard_normal((m, k)).astype(np.float16)
    ref = x.astype(np.float32) @ w.T
    tiles = {"rows16": (2, 2, pf, 1)}
    kq_w = k // mma_k_per_load(bits) // 2
    assert (kq_w * mma_k_per_load(bits)) % gs == 0 and (pf * mma_k_per_load(bits)) % gs == 0  # reuse is on
    y = emulate_batch(x, pack_mma_words(codes, qmin, bits), scale, zp, None, m=m, k=k, n=n, bits=bits, qmin=qmin,
                      group_size=gs, tiles=tiles)
    assert np.abs(y.astype(np.float32) - ref).max() <= 2e-3 * np.abs(ref).max() + 1e-3


@pytest.mark.parametrize("stage", [0, 1])
@pytest.mark.parametrize("m", [5, 16, 32])
@pytest.mark.parametrize("epilogue", ["residual", "float32", "swiglu"])
def test_emulated_batch_kernel_epilogues(m, epilogue, stage):
    """Each epilogue with 4 row tiles of 16 features a warp (2 blocks over n = 128) and 2 warps, int4 g64 with a
    zero point and a bias; swiglu on the gate/up weight reordered by swiglu_row_order."""
    rng = np.random.default_rng(m + len(epilogue))
    k, n, bits = 256, 128, 4
    codes, qmin, gs, scale, zp, bias, w = _layer(rng, n=n, k=k, bits=bits, group_size=64, zero_point=True,
                                                 bias=True)
    x = rng.standard_normal((m, k)).astype(np.float16)
    full = x.astype(np.float32) @ w.T + bias.astype(np.float32)
    res = rng.standard_normal((m, n)).astype(np.float16) if epilogue == "residual" else None
    if epilogue == "swiglu":
        o = swiglu_row_order(n)
        codes, scale, zp, bias = codes[o], scale[o], zp[o], bias[o]
        g, u = full[:, :n // 2], full[:, n // 2:]
        ref = g / (1 + np.exp(-g)) * u
    elif epilogue == "residual":
        ref = full + res.astype(np.float32)
    else:
        ref = full
    y = emulate_batch(x, pack_mma_words(codes, qmin, bits), scale, zp, bias, res, m=m, k=k, n=n, bits=bits,
                      qmin=qmin, group_size=gs, epilogue=epilogue,
                      tiles={"rows16": (4, 2, 2, stage), "rows32": (4, 2, 2, stage)})
    assert y.dtype == (np.float32 if epilogue == "float32" else np.float16)
    assert np.abs(y.astype(np.float32) - ref).max() <= 4e-3 * np.abs(ref).max() + 1e-3


def test_batch_tile_adapts_to_the_layer():
    assert batch_tile(16, 8192, 8192) == DEFAULT_BATCH_TILES["rows16"]  # 256 blocks of 2 row tiles
    assert batch_tile(32, 8192, 28672) == DEFAULT_BATCH_TILES["rows32"]
    r, w, p, s = DEFAULT_BATCH_TILES["rows16"]
    assert r == 2 and batch_tile(16, 4096, 4096) == (2, w, p, s)  # 128 blocks: kept
    assert batch_tile(16, 2048, 2048) == (1, w, 2 * p, s)  # default: >= 128 blocks, same loads in flight
    assert batch_tile(16, 8192, 8192, tiles={"rows16": (4, 8, 2, 1)}) == (4, 8, 2, 1)
    assert batch_tile(16, 4096, 4096, tiles={"rows16": (4, 8, 2, 1)}) == (4, 8, 2, 1)  # a configured tile: as given
    assert batch_tile(16, 4096, 16 * 6, tiles={"rows16": (4, 8, 2, 0)}) == (3, 8, 2, 0)  # 6 row tiles: 4 -> 3
    assert batch_tile(16, 4096, 32, tiles={"rows16": (4, 8, 2, 1)}) == (2, 8, 2, 1)  # only 2 row tiles
    assert batch_tile(9, 64 * 6, 64, tiles={"rows16": (2, 8, 2, 1)}) == (2, 2, 2, 1)  # 6 K loads: 8 -> 4 -> 2 warps
    assert batch_tile(17, 8192, 8192, tiles={"rows16": (1, 1, 1, 0)}) == DEFAULT_BATCH_TILES["rows32"]  # other case
    # staged at 32 rows: 16 warps x 32 rows x (64 + 8) fp16 = 72 KiB > 48 KiB -> 8 warps (36 KiB)
    assert smem_bytes(32, 4, 16, 1) > 48 * 1024 >= smem_bytes(32, 4, 8, 1)
    assert batch_tile(32, 8192, 8192, tiles={"rows32": (4, 16, 2, 1)}) == (4, 8, 2, 1)
    assert batch_tile(32, 8192, 8192, tiles={"rows32": (4, 16, 2, 0)}) == (4, 16, 2, 0)


def test_batch_supports_names_the_reason():
    ok = dict(m=16, k=4096, n=4096, bits=4, group_size=128, dtype="float16")
    assert MAX_M == 32
    assert all(batch_supports(**{**ok, "m": m}) is None for m in (1, 5, 16, 24, 32))
    assert "batch 33" in batch_supports(**{**ok, "m": 33})
    assert "float32" in batch_supports(**{**ok, "dtype": "float32"})
    assert "2-bit" in batch_supports(**{**ok, "bits": 2})
    assert "group size 32" in batch_supports(**{**ok, "group_size": 32})
    with pytest.raises(ValueError, match="batch 40"):
        packed_mma_batch_primfunc(m=40, k=4096, n=4096, qmin=-8, group_size=128, scale_rows=4096,
                                  has_zero_point=False, has_bias=False)


@pytest.mark.parametrize("bad", [dict(mma_batch_tiles={"rows8": (2, 4, 2, 1)}),
                                 dict(mma_batch_tiles={"rows16": (2, 4, 2)}),
                                 dict(mma_batch_tiles={"rows16": (9, 4, 2, 1)}),
                                 dict(mma_batch_tiles={"rows32": [2, 4, 2, 1]}),
                                 dict(mma_batch_tiles={"rows16": (2, 0, 2, 1)}),
                                 dict(mma_batch_tiles={"rows16": (2, 4, 2, 2)}), dict(mma_batch=1),
                                 dict(mma_batch_min_m=0), dict(mma_batch_min_m=33)])
def test_config_rejects_bad_batch_knobs(bad):
    (field,) = bad
    with pytest.raises(ValueError, match=f"TVMBuildConfig.{field}"):
        TVMBuildConfig(**bad)


def test_dispatch_picks_the_batch_kernel_from_5_rows():
    pytest.importorskip("tvm")
    from fxcompress.backends.tvm.emit import fxc_kind

    shape = dict(k=4096, n=4096, bits=4, gs=128, dtype="float16")
    assert [fxc_kind(m, **shape) for m in (1, 4, 5, 16, 32, 33)] == \
        ["fxc_mma"] * 2 + ["fxc_mma_batch"] * 3 + [None]
    assert fxc_kind(16, **shape, config=TVMBuildConfig(mma_batch=False)) == "fxc_mma"  # the fallback knob
    assert fxc_kind(8, **shape, config=TVMBuildConfig(mma_batch_min_m=9)) == "fxc_mma"
    assert fxc_kind(2, **shape, config=TVMBuildConfig(mma_batch_min_m=2)) == "fxc_mma_batch"
    assert fxc_kind(8, **{**shape, "bits": 2}) == "fxc_gemv"  # int2: CUDA cores
    assert fxc_kind(8, **shape, config=TVMBuildConfig(mma_min_m=99)) == "fxc_gemv"  # tensor cores off


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc to build CUDA code")
@pytest.mark.parametrize("m,bits", [(16, 4), (24, 8), (5, 4)])
def test_cuda_build_uses_the_batch_kernel(m, bits):
    """A fp16 int4 / int8 linear at 5..32 rows builds with the batch kernel (mma.sync, 16-byte weight loads); the
    kernel is named in the build's layer info; mma_batch=False builds the fxc_mma kernel instead."""
    pytest.importorskip("tvm")
    from fxcompress.backends.tvm import build_tvm

    torch.manual_seed(0)
    q = nn.Sequential(QuantLinear.from_linear(nn.Linear(512, 256), QuantSpec(bits, False, "per_group", 128)))
    x = torch.randn(1, m, 512)
    b = build_tvm(q, (x,), target="cuda", dtype=torch.float16)
    assert [layer["kernel"] for layer in b.info["layers"]] == ["fxc_mma_batch"]
    assert b.kernel_names() == ["fxc_packed_mma_batch_kernel"]
    src = b.device_source()
    assert "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in src and "uint4" in src
    old = build_tvm(q, (x,), target="cuda", dtype=torch.float16, config=TVMBuildConfig(mma_batch=False))
    assert [layer["kernel"] for layer in old.info["layers"]] == ["fxc_mma"]
    assert old.kernel_names() == ["fxc_packed_mma_kernel"]


class _Block(nn.Module):
    """x -> down(silu(gate(x)) * up(x)) + x with gate/up one fused int4 linear: the residual and swiglu epilogues."""

    def __init__(self, d=256, f=512):
        super().__init__()
        spec = QuantSpec(4, False, "per_group", 128)
        self.gu = QuantLinear.from_linear(nn.Linear(d, 2 * f, bias=False), spec)
        self.down = QuantLinear.from_linear(nn.Linear(f, d, bias=False), spec)
        self.f = f

    def forward(self, x):
        g, u = self.gu(x).split(self.f, dim=-1)
        return x + self.down(torch.nn.functional.silu(g) * u)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc to build CUDA code")
def test_cuda_build_fuses_epilogues_into_the_batch_kernel():
    """At 16 rows the epilogue passes (kernels/epilogue.py via transforms.gemv_epilogue_pass) rewrite the batch
    kernel as they do fxc_mma: a swiglu kernel for gate/up and a residual kernel for down, no split / add left."""
    pytest.importorskip("tvm")
    from fxcompress.backends.tvm import build_tvm

    torch.manual_seed(0)
    b = build_tvm(_Block().eval(), (torch.randn(1, 16, 256),), target="cuda", dtype=torch.float16)
    assert [layer["kernel"] for layer in b.info["layers"]] == ["fxc_mma_batch"] * 2
    names = b.kernel_names()
    assert any(k.startswith("fxc_packed_mma_batch") and "swiglu" in k for k in names), names
    assert any(k.startswith("fxc_packed_mma_batch") and "_res" in k for k in names), names
    assert not [k for k in names if k.startswith(("add", "split", "multiply", "sigmoid"))], names


def test_compete_times_the_batch_kernel_with_its_own_generator():
    """tune='meta_schedule' competes each hand kernel with a tuned te kernel: fxc_mma_batch layers are generated
    by the batch kernel's function (with the config's tiles), not fxc_mma's."""
    pytest.importorskip("tvm")
    from fxcompress.backends.tvm.compete import _hand_func

    cfg = TVMBuildConfig(mma_batch_tiles={"rows16": (2, 2, 2, 1)})
    f = _hand_func((16, 512, 256, 4, 128, False, 256), "fxc_mma_batch", -8, cfg)
    assert f.attrs["global_symbol"] == "main"
    assert 'T.thread_binding(8, thread="blockIdx.x")' in f.script()  # 256 / 16 / 2 row tiles = 8 blocks
