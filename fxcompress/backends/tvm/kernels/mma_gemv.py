"""Hand-scheduled int4 / int8 tensor-core kernel (TVM TIR) for batch 1..32: mma.sync m16n8k16, the weights
decoded in registers from the fragment-ordered packing of :func:`..packing.pack_mma_words`.

Mapping: the weight is the A operand (16 output features x 16 K), the activations are the B operand (16 K x 8
activation rows), so activation rows map to mma's n: ``ceil(m / 8)`` n8 tiles (1..4) per decoded A fragment.  Each
block covers ALL ``m`` rows of its 16 output features, so each weight is read from memory and decoded once whatever
the batch; only the mma count grows (one per n8 tile)."""
from __future__ import annotations

import math

from ..packing import MMA_BITS, mma_k_per_load, pack_mma_words  # noqa: F401  (pack_mma_words: the layout it reads)
from .epilogue import Epilogue, primfunc_with_params
from .prologue import Prologue

LANES = 32  # threads per warp
MAX_M = 32  # activation rows the kernel takes: up to 4 n8 tiles of mma.m16n8k16
# (warps per block -- they split K and reduce through shared memory --, 16-byte weight loads a lane issues before
# decoding them) for batch <= 4 / > 4: the best overall in tools/results/fxc_tile_sweep.md (H100)
DEFAULT_MMA_TILES = {"small": (8, 8), "batch": (4, 8)}


def mma_tile(m: int, k: int, bits: int = 4, tiles=None) -> tuple[int, int]:
    """(warps, prefetch) for ``m`` activation rows; fewer warps when the K loads do not split ``warps`` ways.
    ``tiles`` (``TVMBuildConfig.mma_tiles``) overrides :data:`DEFAULT_MMA_TILES` by case ("small", "batch")."""
    case = "small" if m <= 4 else "batch"
    warps, pf = (tiles or {}).get(case, DEFAULT_MMA_TILES[case])
    while warps > 1 and (k // mma_k_per_load(bits)) % warps:
        warps //= 2
    return warps, pf


def mma_prefetch_groups(loads: int, prefetch: int) -> tuple[int, int]:
    """``(pf, tail)``: a warp's ``loads`` 16-byte weight loads per lane are issued ``pf = min(prefetch, loads)`` at
    a time before any is used, then a last group of ``tail = loads % pf``.  (Before: the largest divisor of
    ``loads`` up to ``prefetch``, which is 1 for a prime count, e.g. 11 loads a warp for K = 5632 over 8 warps: one
    load in flight per lane, latency-bound.)"""
    pf = max(1, min(prefetch, loads))
    return pf, loads % pf


def mma_supports(*, m: int, k: int, n: int, bits: int, group_size: int, dtype: str) -> str | None:
    """None when the tensor-core kernel handles this layer, else the reason."""
    if dtype != "float16":
        return f"activations are {dtype} (the kernel takes float16)"
    if bits not in MMA_BITS:
        return f"{bits}-bit codes (the tensor-core kernel takes {MMA_BITS})"
    if not 1 <= m <= MAX_M:
        return f"batch {m} is outside 1..{MAX_M}"
    kpl = mma_k_per_load(bits)
    if n % 16 or k % kpl:
        return f"{n}x{k} is not a multiple of 16 x {kpl}"
    if group_size % kpl:
        return f"group size {group_size} is not a multiple of {kpl}"
    return None


def packed_mma_primfunc(*, m: int, k: int, n: int, qmin: int, group_size: int, scale_rows: int,
                        has_zero_point: bool, has_bias: bool, lead: tuple = (), name: str = "fxc_packed_mma",
                        bits: int = 4, tiles=None, epilogue: Epilogue = Epilogue(), prologue: Prologue = Prologue()):
    """The scheduled PrimFunc ``(x, words, scale[, zero_point][, bias][, residual][, norm_weight], y)`` of an int4 /
    int8 linear on tensor cores:
    ``words`` from :func:`pack_mma_words`; each warp owns 16 output rows and 1/warps of K (:func:`mma_tile`), decodes its A
    fragments in registers (two integer ops per pair of codes, then ``(h - (1024 - qmin) - zp) * scale`` in fp16),
    loads B fragments (the activations, fp16 pairs) from global memory / L1, and runs one ``mma.m16n8k16`` per
    16x16 weight tile and 8 activation rows (``ceil(m / 8)`` mmas reuse one decoded A fragment), accumulating in
    fp32.  Rows past ``m`` of the last 8-row tile are zeros: at batch 1 the tensor cores do 8x the needed math,
    which is free next to the weight reads.  The warps' partial tiles are summed through shared memory, and the
    sums go through ``epilogue`` (:class:`.epilogue.Epilogue`) on their way out: ``"residual"`` adds the fp16
    ``residual`` (shaped as ``y``); ``"swiglu"`` takes weights in :func:`.epilogue.swiglu_row_order` and writes
    ``n / 2`` features, ``silu(gate) * up`` of tile rows ``r`` and ``r + 8``; ``"float32"`` stores fp32.
    ``prologue`` (:class:`.prologue.Prologue`) ``"rms_norm"``: ``x`` is an RMSNorm's input and ``norm_weight`` its
    weight; the block issues its first group of weight loads, sums its rows' squares while they are in flight, and
    every B fragment element is normalized on its way to the mma."""
    if not isinstance(epilogue, Epilogue):
        raise ValueError(f"tensor-core kernel: epilogue must be an Epilogue, got {type(epilogue).__name__}")
    if not isinstance(prologue, Prologue):
        raise ValueError(f"tensor-core kernel: prologue must be a Prologue, got {type(prologue).__name__}")
    reason = mma_supports(m=m, k=k, n=n, bits=bits, group_size=group_size, dtype="float16") or prologue.check_rows(m)
    if reason is not None:
        raise ValueError(f"tensor-core kernel: {reason}")
    lead = tuple(lead) or (m,)
    if math.prod(lead) != m:
        raise ValueError(f"tensor-core kernel: leading dims {lead} do not hold {m} rows")
    from tvm.script import tirx as T

    warps, prefetch = mma_tile(m, k, bits, tiles)
    nt = -(-m // 8)  # n8 tiles of activation rows (1..4)
    na = nt * 8  # activation columns of the C tile
    kpl = mma_k_per_load(bits)  # K per 16-byte lane load
    rpw = 16 // bits  # A registers per word
    spl = kpl // 16  # 16-wide K slices per load
    cmask = (1 << bits) - 1
    kq = k // kpl  # 16-byte lane loads per row block
    kq_w = kq // warps  # per warp
    pf, tail = mma_prefetch_groups(kq_w, prefetch)  # weight loads in flight per lane; a last group of ``tail``
    threads = warps * LANES
    n_out = epilogue.out_features(n)
    rows_out = 8 if epilogue.kind == "swiglu" else 16  # output features per block
    red_iters = -(-(rows_out * na) // threads)
    zshape = (scale_rows, k // group_size)
    xshape, yshape = (*lead, k), (*lead, n_out)
    off = float(1024 - qmin)  # fp16 1024 + u  ->  u + qmin (exact: u < 256)
    norm = prologue.kind == "rms_norm"
    x8 = k // 8  # 16-byte loads of one activation row (the prologue's sum of squares)

    def srow(row):
        return T.min(row, scale_rows - 1)

    def acc_plus_bias(b, v, row):
        return v + T.Cast("float32", b[row]) if has_bias else v

    @T.macro
    def kload(q0, cnt, w, wv, bx, ty, tx):
        for p in T.unroll(cnt):  # issue a warp's loads q0 .. q0 + cnt (of its K range) before using any
            for v in T.vectorized(4):
                wv[p * 4 + v] = w[bx, ty * kq_w + q0 + p, tx, v]

    @T.macro
    def kscale(q, s, z, sz, o, bx, tx):
        for h in T.unroll(2):  # scale / zero point of rows g and g + 8 for K block q, into sz[o .. o + 4]
            sz[o + h * 2] = s[srow(bx * 16 + tx // 4 + h * 8), q * kpl // group_size]
            if has_zero_point:
                sz[o + h * 2 + 1] = z[srow(bx * 16 + tx // 4 + h * 8), q * kpl // group_size]
            else:
                sz[o + h * 2 + 1] = T.float16(0)

    @T.macro
    def kuse(q0, cnt, s, z, g32, x32, wv, sz, au, ah, bu, bh, gu, gh, rs, cf, bx, ty, tx, szs):
        # decode + mma each of the loads kload issued (``szs``: their scales, loaded before, or None)
        for p in T.unroll(cnt):
            if szs is None:
                kscale(ty * kq_w + q0 + p, s, z, sz, 0, bx, tx)
            else:
                for c in T.unroll(4):
                    sz[c] = szs[p * 4 + c]
            for j in T.unroll(spl):  # 16-wide K slice
                for i in T.unroll(4):
                    au[i] = ((wv[p * 4 + j * (4 // rpw) + i // rpw] >> T.Cast("uint32", bits * (i % rpw)))
                             & T.uint32(cmask | (cmask << 16))) | T.uint32(0x64006400)
                for e in T.unroll(8):  # a_i halves: rows g (i even) / g + 8 (i odd)
                    ah[e] = (ah[e] - T.float16(off) - sz[(e // 2) % 2 * 2 + 1]) * sz[(e // 2) % 2 * 2]
                if norm:  # the norm weight of this lane's B elements: K (tx % 4) * 2 + {0, 1} and + 8
                    for hb in T.unroll(2):
                        gu[hb] = g32[((ty * kq_w + q0 + p) * kpl + j * 16 + (tx % 4) * 2 + hb * 8) // 2]
                for t2 in T.unroll(nt):
                    for hb in T.unroll(2):
                        bu[t2 * 2 + hb] = T.if_then_else(
                            t2 * 8 + tx // 4 < m,
                            x32[T.min(t2 * 8 + tx // 4, m - 1),
                                ((ty * kq_w + q0 + p) * kpl + j * 16 + (tx % 4) * 2 + hb * 8) // 2],
                            T.uint32(0))
                    if norm:
                        for e in T.unroll(4):
                            bh[t2 * 4 + e] = prologue.normalize(bh[t2 * 4 + e], rs[0], gh[e])
                    T.evaluate(T.ptx_legacy.mma("m16n8k16", "row", "col", "fp16", "fp16", "fp32",
                                                au.data, 0, bu.data, t2 * 2, cf.data, t2 * 4, False,
                                                dtype="float32"))

    @T.macro
    def kgroup(q0, cnt, w, s, z, g32, x32, wv, sz, au, ah, bu, bh, gu, gh, rs, cf, bx, ty, tx):
        kload(q0, cnt, w, wv, bx, ty, tx)
        kuse(q0, cnt, s, z, g32, x32, wv, sz, au, ah, bu, bh, gu, gh, rs, cf, bx, ty, tx, None)

    @T.macro
    def rms_rstd(x32, part, ss, xu, xh, rs, ty, tx):
        # the prologue's 1 / rms of the lane's activation row (tx // 4; m <= 4 rows, one n8 tile): each thread sums
        # the squares of 8 consecutive elements per 16-byte load, a warp by an xor butterfly, the block in shared
        for i in T.unroll(m):
            ss[i] = T.float32(0)
            for jx in T.serial(-(-x8 // threads)):
                if jx * threads + ty * LANES + tx < x8:
                    for v in T.vectorized(4):
                        xu[v] = x32[i, (jx * threads + ty * LANES + tx) * 4 + v]
                    for e in T.unroll(8):
                        ss[i] = ss[i] + T.Cast("float32", xh[e]) * T.Cast("float32", xh[e])
            for sh in T.unroll(5):
                ss[i] = ss[i] + T.tvm_warp_shuffle_xor(T.tvm_warp_activemask(), ss[i],
                                                       T.shift_right(16, sh), LANES, LANES)
            if tx == 0:
                part[i * warps + ty] = ss[i]
        T.tvm_storage_sync("shared")
        ss[0] = T.float32(0)
        for wi in T.unroll(warps):
            ss[0] = ss[0] + part[T.min(tx // 4, m - 1) * warps + wi]
        rs[0] = prologue.rstd(ss[0], k)

    @T.macro
    def body(xin, w, s, z, b, rin, gin, yout):
        x32 = T.decl_buffer((m, k // 2), "uint32", data=xin.data)
        y = T.decl_buffer((m, n_out), epilogue.out_dtype, data=yout.data)
        if epilogue.has_residual:
            res = T.decl_buffer((m, n_out), "float16", data=rin.data)
        if norm:
            g32 = T.decl_buffer((k // 2,), "uint32", data=gin.data)
        else:
            g32 = T.meta_var(gin)
        for bx in T.thread_binding(n // 16, thread="blockIdx.x"):
            for ty in T.thread_binding(warps, thread="threadIdx.y"):
                for tx in T.thread_binding(LANES, thread="threadIdx.x"):
                    red = T.alloc_buffer((warps * 16 * na,), "float32", scope="shared")
                    cf = T.alloc_buffer((nt * 4,), "float32", scope="local")
                    wv = T.alloc_buffer((pf * 4,), "uint32", scope="local")
                    au = T.alloc_buffer((4,), "uint32", scope="local")
                    ah = T.decl_buffer((8,), "float16", data=au.data)
                    bu = T.alloc_buffer((nt * 2,), "uint32", scope="local")
                    sz = T.alloc_buffer((4,), "float16", scope="local")
                    if norm:  # the prologue's registers and shared sums
                        bh = T.decl_buffer((nt * 4,), "float16", data=bu.data)
                        gu = T.alloc_buffer((2,), "uint32", scope="local")
                        gh = T.decl_buffer((4,), "float16", data=gu.data)
                        rs = T.alloc_buffer((1,), "float32", scope="local")
                        ss = T.alloc_buffer((m,), "float32", scope="local")
                        xu = T.alloc_buffer((4,), "uint32", scope="local")
                        xh = T.decl_buffer((8,), "float16", data=xu.data)
                        part = T.alloc_buffer((m * warps,), "float32", scope="shared")
                        szs = T.alloc_buffer((pf * 4,), "float16", scope="local")
                    else:
                        bh, gu, gh, rs = T.meta_var((None, None, None, None))
                    for c in T.unroll(nt * 4):
                        cf[c] = T.float32(0)
                    if norm:  # the first loads (weights, scales) in flight while the block sums its rows' squares
                        kload(0, pf, w, wv, bx, ty, tx)
                        for p in T.unroll(pf):
                            kscale(ty * kq_w + p, s, z, szs, p * 4, bx, tx)
                        rms_rstd(x32, part, ss, xu, xh, rs, ty, tx)
                        kuse(0, pf, s, z, g32, x32, wv, sz, au, ah, bu, bh, gu, gh, rs, cf, bx, ty, tx, szs)
                        for qo in T.serial(1, kq_w // pf):
                            kgroup(qo * pf, pf, w, s, z, g32, x32, wv, sz, au, ah, bu, bh, gu, gh, rs, cf, bx, ty, tx)
                    else:
                        for qo in T.serial(kq_w // pf):
                            kgroup(qo * pf, pf, w, s, z, g32, x32, wv, sz, au, ah, bu, bh, gu, gh, rs, cf, bx, ty, tx)
                    if tail > 0:
                        kgroup(kq_w - tail, tail, w, s, z, g32, x32, wv, sz, au, ah, bu, bh, gu, gh, rs, cf, bx, ty,
                               tx)
                    # C fragment -> shared: red[warp][row][act] (c0, c1: row tx // 4, acts 2 (tx % 4) + {0, 1};
                    # c2, c3: row + 8); then one thread per (row, act) sums the warps
                    for t2 in T.unroll(nt):
                        for c in T.unroll(4):
                            red[ty * (16 * na) + (tx // 4 + (c // 2) * 8) * na + t2 * 8 + (tx % 4) * 2 + c % 2] = \
                                cf[t2 * 4 + c]
                    T.tvm_storage_sync("shared")
                    for o in T.serial(red_iters):  # output (row, act) = divmod(idx, na)
                        if o * threads + ty * LANES + tx < rows_out * na \
                                and (o * threads + ty * LANES + tx) % na < m:
                            cf[0] = T.float32(0)
                            for wi in T.unroll(warps):
                                cf[0] = cf[0] + red[wi * (16 * na) + o * threads + ty * LANES + tx]
                            if epilogue.kind == "swiglu":  # up feature: tile row + 8
                                cf[1] = T.float32(0)
                                for wi in T.unroll(warps):
                                    cf[1] = cf[1] + red[wi * (16 * na) + 8 * na + o * threads + ty * LANES + tx]
                                y[(o * threads + ty * LANES + tx) % na, bx * 8 + (o * threads + ty * LANES + tx) // na] = \
                                    epilogue.store((
                                        acc_plus_bias(b, cf[0], bx * 16 + (o * threads + ty * LANES + tx) // na),
                                        acc_plus_bias(b, cf[1], bx * 16 + 8 + (o * threads + ty * LANES + tx) // na)))
                            elif epilogue.has_residual:
                                y[(o * threads + ty * LANES + tx) % na, bx * 16 + (o * threads + ty * LANES + tx) // na] = \
                                    epilogue.store(
                                        acc_plus_bias(b, cf[0], bx * 16 + (o * threads + ty * LANES + tx) // na),
                                        res[(o * threads + ty * LANES + tx) % na,
                                            bx * 16 + (o * threads + ty * LANES + tx) // na])
                            else:
                                y[(o * threads + ty * LANES + tx) % na, bx * 16 + (o * threads + ty * LANES + tx) // na] = \
                                    epilogue.store(
                                        acc_plus_bias(b, cf[0], bx * 16 + (o * threads + ty * LANES + tx) // na))

    wshape = (n // 16, kq, LANES, 4)
    attrs = {"tir.is_scheduled": True, "tirx.is_scheduled": True, "tir.noalias": True, "op_pattern": 8}
    params = [("x", xshape, "float16"), ("w", wshape, "uint32"), ("s", zshape, "float16"),
              ("z", zshape if has_zero_point else None, "float16"), ("b", (n,) if has_bias else None, "float16"),
              ("r", yshape if epilogue.has_residual else None, "float16"),
              ("g", (k,) if prologue.has_weight else None, "float16"), ("y", yshape, epilogue.out_dtype)]
    return primfunc_with_params(body, params, attrs).with_attr("global_symbol", name)
