"""Hand-scheduled CUDA kernels for packed integer weights (TVM TIR), used by the TVM backend at batch 1..16.

Two kernels: :func:`packed_mma_primfunc` (int4 / int8 on tensor cores, ``mma.m16n8k16`` with the weights
decoded in registers from a fragment-ordered packing; the default wherever it applies, batch 1 included) and
:func:`packed_gemv_primfunc` (CUDA cores, bits 2 / 4 / 8; int2 layers and the int4 / int8 layers the
tensor-core kernel does not take).  The CUDA-core kernel:

Why not dlight's GEMV rule alone: its fused decode kernel loads one 4-byte word per thread per step and spends
about seven ALU operations per weight (shift, mask, magic-number subtract, scale multiply, two fp16->fp32
converts, FFMA), which caps a 8192x8192 int4 GEMV at ~46% of H100 HBM bandwidth, and at batch 16 it re-decodes
every weight per row.  This kernel:

* has each warp own ``rows`` output rows; each lane loads ``words`` uint32 words (16 bytes for 4) of every
  row per K step, so a warp has ``rows * words * 128`` bytes of weights in flight;
* stages the activations per K chunk in shared memory as fp32, in lane order with a pitch of 33 floats (no
  bank conflicts on the writes or the reads), plus the sums of x over each lane's segment (``xsum``);
* decodes each code ONCE per thread (for all ``m`` activation rows) with two integer ops into the fp32
  ``1 + u / 2**bits`` (the code placed in the top mantissa bits under a 1.0 exponent:
  ``(u << (23 - bits)) | 0x3F800000``) and accumulates ``D = sum (1 + u/2**b) x`` with one FFMA per
  activation row; a segment's exact contribution is then ``scale * (2**b * D + (qmin - zp - 2**b) * xsum)``:
  no per-weight subtract, scale multiply or convert, and each activation read from shared memory serves
  ``rows`` weights;
* reduces the 32 lanes' partial sums with warp shuffles.

Numerics: ``1 + u/2**b`` is exact in fp32 and ``sum u x = 2**b (D - xsum)``; cancellation costs about
``2**-24 * 2**b * sum|x|`` absolute error per segment, far below the fp16 output's resolution.

Supported: fp16 activations with a static number of rows ``m`` (1..16), bits 2 / 4 / 8 (codes fill whole
words), K a multiple of a lane segment (``words * 32 // bits``), group size a multiple of it (or per-channel),
scale rows 1 or N, optional zero point and bias.  :func:`supports` says whether a layer qualifies (the backend
falls back to dlight otherwise); :func:`tile_for` picks the tile.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

SHARED_BYTES = 48 * 1024
MAX_M = 16
LANES = 32
PITCH = LANES + 1


@dataclass(frozen=True)
class Tile:
    warps: int = 4  # warps per thread block (threadIdx.y)
    rows: int = 2  # output rows per warp
    words: int = 4  # uint32 words per lane per row and K step (4 = one 16-byte load)
    unroll: int = 0  # unroll the K-step loop of a chunk when it has at most this many steps (0: never)


# tile overrides by case ("batch1", "batch1_large_k", "batch4", "batch"), e.g. {"batch": Tile(8, 4, 1)}
TILES: dict = {}


def tile_for(m: int, k: int, n: int) -> Tile:
    """The default tile of the CUDA-core kernel (the fastest in tile sweeps run on an H100 while developing it; that
    sweep is not in tools/results -- tools/sweep_fxc_tiles.py covers the tensor-core tiles): batch 1 -- 16-byte
    loads, 8 rows per block at K <= 4096 (more blocks), 32 at larger K (the activation staging is amortized over
    more rows), K steps unrolled; batch 2-4 -- 32 rows per block; batch > 4 -- 8-byte loads and 4 rows per warp
    (each activation read from shared memory serves 4 decoded rows)."""
    if m > 4:
        t = TILES.get("batch", Tile(warps=4, rows=4, words=2))
    elif m > 1:
        t = TILES.get("batch4", Tile(warps=8, rows=4, words=4))
    elif k > 4096:
        t = TILES.get("batch1_large_k", Tile(warps=8, rows=4, words=4, unroll=8))
    else:
        t = TILES.get("batch1", Tile(warps=4, rows=2, words=4, unroll=8))
    while n % (t.warps * t.rows) and t.rows > 1:
        t = Tile(t.warps, t.rows // 2, t.words, t.unroll)
    while n % (t.warps * t.rows) and t.warps > 1:
        t = Tile(t.warps // 2, t.rows, t.words, t.unroll)
    return t


def _chunk_steps(m: int, steps: int, seg: int) -> int:
    """K steps staged at once: as many as fit in shared memory (fp32 x with pitch 33, plus xsum)."""
    per_step = m * (seg * PITCH + LANES) * 4
    return min(steps, SHARED_BYTES // per_step)


def supports(*, m: int, k: int, n: int, bits: int, group_size: int, dtype: str, tile: Tile | None = None) -> str | None:
    """None when the kernel handles this layer, else the reason it does not."""
    if dtype != "float16":
        return f"activations are {dtype} (the kernel takes float16)"
    if bits not in (2, 4, 8):
        return f"{bits}-bit codes do not fill 32-bit words"
    if not 1 <= m <= MAX_M:
        return f"batch {m} is outside 1..{MAX_M}"
    t = tile or tile_for(m, k, n)
    seg = t.words * (32 // bits)
    if k % seg:
        return f"K={k} is not a multiple of {seg}"
    if group_size % seg:
        return f"group size {group_size} is not a multiple of {seg}"
    if _chunk_steps(m, 1, seg) < 1:
        return f"{m} rows of one K step exceed {SHARED_BYTES} bytes of shared memory"
    if n % (t.warps * t.rows):
        return f"N={n} is not a multiple of {t.warps * t.rows}"
    return None


def packed_gemv_primfunc(*, m: int, k: int, n: int, bits: int, qmin: int, group_size: int, scale_rows: int,
                         has_zero_point: bool, has_bias: bool, lead: tuple = (), name: str = "fxc_packed_gemv",
                         tile: Tile | None = None):
    """The scheduled PrimFunc ``(x, words, scale[, zero_point][, bias], y)`` computing
    ``y[m, n] = sum_k x[m, k] * ((u[n, k] + qmin - zp[r, g]) * scale[r, g]) (+ bias[n])`` in fp32, stored fp16.

    ``x``: ``(*lead, k)`` fp16 with ``prod(lead) == m`` (default ``(m, k)``), ``y`` likewise;
    ``words``: ``(n, k * bits / 32)`` uint32 (:func:`tvm.pack_words` layout);
    ``scale`` / ``zero_point``: ``(scale_rows, k / group_size)`` fp16; ``bias``: ``(n,)`` fp16.
    """
    t = tile or tile_for(m, k, n)
    reason = supports(m=m, k=k, n=n, bits=bits, group_size=group_size, dtype="float16", tile=t)
    if reason is not None:
        raise ValueError(f"packed GEMV kernel: {reason}")
    lead = tuple(lead) or (m,)
    if math.prod(lead) != m:
        raise ValueError(f"packed GEMV kernel: leading dims {lead} do not hold {m} rows")
    from tvm import tirx
    from tvm.script import tirx as T

    warps, rows, words = t.warps, t.rows, t.words
    per = 32 // bits
    kw = k // per  # words per weight row
    seg = words * per  # codes per lane per step
    step_words, step_codes = LANES * words, LANES * seg
    steps = -(-kw // step_words)
    cs = _chunk_steps(m, steps, seg)  # steps per staged chunk
    chunks = -(-steps // cs)
    step_slots = seg * PITCH  # shared floats per step and activation row
    xs_len = cs * step_slots
    threads = warps * LANES
    rpb = warps * rows  # output rows per block
    n_blocks = n // rpb
    mask = (1 << bits) - 1
    two_b = float(1 << bits)
    stage_iters = -(-(m * cs * step_codes) // threads)
    sum_iters = -(-(m * cs * LANES) // threads)
    loads = max(words // 4, 1)  # 16-byte loads per row and step
    vec = min(words, 4)
    step_loop = T.unroll if (t.unroll and cs <= t.unroll) else T.serial
    zshape = (scale_rows, k // group_size)
    xshape, yshape = (*lead, k), (*lead, n)

    def code_f32(word, j):
        """fp32 ``1 + u / 2**bits`` of code ``j`` of ``word`` (two integer ops)."""
        u = (word >> (j * bits).astype("uint32")) & tirx.const(mask, "uint32")
        return tirx.reinterpret("float32", (u << tirx.const(23 - bits, "uint32")) | tirx.const(0x3F800000, "uint32"))

    def slot(kk):
        """Shared slot of chunk-local K index ``kk``: ordered (step, code-in-lane, lane) with a pitch of 33 per
        code: the 32 lanes read 32 consecutive floats, and 32 consecutive ``kk`` land in 32 different banks."""
        word, j = kk // per, kk % per
        st, tx, v = word // step_words, (word % step_words) // words, word % words
        return st * step_slots + (v * per + j) * PITCH + tx

    def srow(row):
        return T.min(row, scale_rows - 1)

    @T.macro
    def body(xin, w, s, z, b, yout):
        x = T.decl_buffer((m, k), "float16", data=xin.data)
        y = T.decl_buffer((m, n), "float16", data=yout.data)
        for bx in T.thread_binding(n_blocks, thread="blockIdx.x"):
            for ty in T.thread_binding(warps, thread="threadIdx.y"):
                for tx in T.thread_binding(LANES, thread="threadIdx.x"):
                    xs = T.alloc_buffer((m * xs_len,), "float32", scope="shared")
                    xsum = T.alloc_buffer((m * cs * LANES,), "float32", scope="shared")
                    acc = T.alloc_buffer((rows * m,), "float32", scope="local")
                    part = T.alloc_buffer((rows,), "float32", scope="local")
                    wv = T.alloc_buffer((rows * words,), "uint32", scope="local")
                    wf = T.alloc_buffer((rows * seg,), "float32", scope="local")
                    sc = T.alloc_buffer((rows * 2,), "float32", scope="local")
                    xv = T.alloc_buffer((1,), "float32", scope="local")
                    for a in T.unroll(rows * m):
                        acc[a] = T.float32(0)
                    for ch in T.serial(chunks):
                        T.tvm_storage_sync("shared")
                        # stage x[:, chunk] as fp32 in lane order (coalesced global reads; zero past K)
                        for i in T.serial(stage_iters):
                            if i * threads + ty * LANES + tx < m * cs * step_codes:
                                xs[((i * threads + ty * LANES + tx) // (cs * step_codes)) * xs_len
                                   + slot((i * threads + ty * LANES + tx) % (cs * step_codes))] = T.if_then_else(
                                    ch * (cs * step_codes) + (i * threads + ty * LANES + tx) % (cs * step_codes) < k,
                                    T.Cast("float32", x[(i * threads + ty * LANES + tx) // (cs * step_codes),
                                                        T.min(ch * (cs * step_codes)
                                                              + (i * threads + ty * LANES + tx) % (cs * step_codes),
                                                              k - 1)]),
                                    T.float32(0))
                        T.tvm_storage_sync("shared")
                        for i in T.serial(sum_iters):  # sum of x over each (step, lane) segment
                            if i * threads + ty * LANES + tx < m * cs * LANES:
                                xv[0] = T.float32(0)
                                for c in T.unroll(seg):
                                    xv[0] = xv[0] + xs[((i * threads + ty * LANES + tx) // (cs * LANES)) * xs_len
                                                       + ((i * threads + ty * LANES + tx) % (cs * LANES) // LANES)
                                                       * step_slots + c * PITCH + (i * threads + ty * LANES + tx) % LANES]
                                xsum[i * threads + ty * LANES + tx] = xv[0]
                        T.tvm_storage_sync("shared")
                        for sl in step_loop(cs):
                            if (ch * cs + sl) * step_words + tx * words < kw:
                                for r in T.unroll(rows):
                                    for ld in T.unroll(loads):
                                        for v in T.vectorized(vec):
                                            wv[r * words + ld * vec + v] = w[
                                                bx * rpb + ty * rows + r,
                                                (ch * cs + sl) * step_words + tx * words + ld * vec + v]
                                for r in T.unroll(rows):  # scale and (qmin - zp - 2**b) of this lane's group
                                    sc[r * 2] = T.Cast("float32", s[srow(bx * rpb + ty * rows + r),
                                                                    ((ch * cs + sl) * step_words + tx * words) * per
                                                                    // group_size])
                                    if has_zero_point:
                                        sc[r * 2 + 1] = T.float32(qmin - two_b) - T.Cast("float32", z[
                                            srow(bx * rpb + ty * rows + r),
                                            ((ch * cs + sl) * step_words + tx * words) * per // group_size])
                                    else:
                                        sc[r * 2 + 1] = T.float32(qmin - two_b)
                                for r in T.unroll(rows):  # decode once for all m activation rows
                                    for c in T.unroll(seg):
                                        wf[r * seg + c] = code_f32(wv[r * words + c // per], c % per)
                                for mi in T.unroll(m):
                                    for r in T.unroll(rows):
                                        part[r] = T.float32(0)
                                    for c in T.unroll(seg):
                                        xv[0] = xs[mi * xs_len + sl * step_slots + c * PITCH + tx]
                                        for r in T.unroll(rows):
                                            part[r] = part[r] + wf[r * seg + c] * xv[0]
                                    for r in T.unroll(rows):
                                        acc[r * m + mi] = acc[r * m + mi] + sc[r * 2] * (
                                            T.float32(two_b) * part[r]
                                            + sc[r * 2 + 1] * xsum[(mi * cs + sl) * LANES + tx])
                    # lane 0 of each warp ends with the row sums
                    for a in T.unroll(rows * m):
                        for o in T.unroll(5):
                            acc[a] = acc[a] + T.tvm_warp_shuffle_down(
                                T.uint32(0xFFFFFFFF), acc[a], T.shift_right(16, o), 32, 32)
                    if tx == 0:
                        for r in T.unroll(rows):
                            for mi in T.unroll(m):
                                if has_bias:
                                    y[mi, bx * rpb + ty * rows + r] = T.Cast(
                                        "float16", acc[r * m + mi] + T.Cast("float32", b[bx * rpb + ty * rows + r]))
                                else:
                                    y[mi, bx * rpb + ty * rows + r] = T.Cast("float16", acc[r * m + mi])

    attrs = {"tir.is_scheduled": True, "tir.noalias": True, "op_pattern": 8}
    if has_zero_point and has_bias:
        @T.prim_func(private=True)
        def kernel(x: T.Buffer(xshape, "float16"), w: T.Buffer((n, kw), "uint32"), s: T.Buffer(zshape, "float16"),
                   z: T.Buffer(zshape, "float16"), b: T.Buffer((n,), "float16"), y: T.Buffer(yshape, "float16")):
            T.func_attr(attrs)
            body(x, w, s, z, b, y)
    elif has_zero_point:
        @T.prim_func(private=True)
        def kernel(x: T.Buffer(xshape, "float16"), w: T.Buffer((n, kw), "uint32"), s: T.Buffer(zshape, "float16"),
                   z: T.Buffer(zshape, "float16"), y: T.Buffer(yshape, "float16")):
            T.func_attr(attrs)
            body(x, w, s, z, None, y)
    elif has_bias:
        @T.prim_func(private=True)
        def kernel(x: T.Buffer(xshape, "float16"), w: T.Buffer((n, kw), "uint32"), s: T.Buffer(zshape, "float16"),
                   b: T.Buffer((n,), "float16"), y: T.Buffer(yshape, "float16")):
            T.func_attr(attrs)
            body(x, w, s, None, b, y)
    else:
        @T.prim_func(private=True)
        def kernel(x: T.Buffer(xshape, "float16"), w: T.Buffer((n, kw), "uint32"), s: T.Buffer(zshape, "float16"),
                   y: T.Buffer(yshape, "float16")):
            T.func_attr(attrs)
            body(x, w, s, None, None, y)
    return kernel.with_attr("global_symbol", name)


# ----------------------------------------------------------------------------------------------------------
# int4 / int8 tensor-core kernel (batch 1..16): mma.sync m16n8k16, weights decoded in registers


MMA_MIN_M = 1  # batch sizes from here up use the tensor-core kernel (int4 / int8 layers it supports)
# (warps per block -- they split K and reduce through shared memory --, 16-byte weight loads a lane issues before
# decoding them) for batch <= 4 / > 4: the best overall in tools/results/fxc_tile_sweep.md (H100)
MMA_TILES = {"small": (8, 8), "batch": (4, 8)}


def mma_tile(m: int, k: int, bits: int = 4) -> tuple[int, int]:
    """(warps, prefetch) for ``m`` activation rows; fewer warps when the K loads do not split ``warps`` ways."""
    warps, pf = MMA_TILES["small" if m <= 4 else "batch"]
    while warps > 1 and (k // mma_k_per_load(bits)) % warps:
        warps //= 2
    return warps, pf


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
    import numpy as np

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


def mma_supports(*, m: int, k: int, n: int, bits: int, group_size: int, dtype: str) -> str | None:
    """None when the tensor-core kernel handles this layer, else the reason."""
    if dtype != "float16":
        return f"activations are {dtype} (the kernel takes float16)"
    if bits not in MMA_BITS:
        return f"{bits}-bit codes (the tensor-core kernel takes {MMA_BITS})"
    if not 1 <= m <= 16:
        return f"batch {m} is outside 1..16"
    kpl = mma_k_per_load(bits)
    if n % 16 or k % kpl:
        return f"{n}x{k} is not a multiple of 16 x {kpl}"
    if group_size % kpl:
        return f"group size {group_size} is not a multiple of {kpl}"
    return None


def packed_mma_primfunc(*, m: int, k: int, n: int, qmin: int, group_size: int, scale_rows: int,
                        has_zero_point: bool, has_bias: bool, lead: tuple = (), name: str = "fxc_packed_mma",
                        bits: int = 4):
    """The scheduled PrimFunc ``(x, words, scale[, zero_point][, bias], y)`` of an int4 / int8 linear on tensor cores:
    ``words`` from :func:`pack_mma_words`; each warp owns 16 output rows and 1/warps of K (:func:`mma_tile`), decodes its A
    fragments in registers (two integer ops per pair of codes, then ``(h - (1024 - qmin) - zp) * scale`` in fp16),
    loads B fragments (the activations, fp16 pairs) from global memory / L1, and runs one ``mma.m16n8k16`` per
    16x16 weight tile and 8 activation rows, accumulating in fp32.  Rows past ``m`` of the 8-row tile are zeros:
    at batch 1 the tensor cores do 8x the needed math, which is free next to the weight reads."""
    reason = mma_supports(m=m, k=k, n=n, bits=bits, group_size=group_size, dtype="float16")
    if reason is not None:
        raise ValueError(f"tensor-core kernel: {reason}")
    lead = tuple(lead) or (m,)
    if math.prod(lead) != m:
        raise ValueError(f"tensor-core kernel: leading dims {lead} do not hold {m} rows")
    from tvm.script import tirx as T

    warps, prefetch = mma_tile(m, k, bits)
    nt = 1 if m <= 8 else 2  # n8 tiles of activation rows
    kpl = mma_k_per_load(bits)  # K per 16-byte lane load
    rpw = 16 // bits  # A registers per word
    spl = kpl // 16  # 16-wide K slices per load
    cmask = (1 << bits) - 1
    kq = k // kpl  # 16-byte lane loads per row block
    kq_w = kq // warps  # per warp
    pf = max(d for d in range(1, prefetch + 1) if kq_w % d == 0)  # weight loads in flight per lane
    red_iters = -(-256 // (warps * LANES))
    zshape = (scale_rows, k // group_size)
    xshape, yshape = (*lead, k), (*lead, n)
    off = float(1024 - qmin)  # fp16 1024 + u  ->  u + qmin (exact: u < 256)

    def srow(row):
        return T.min(row, scale_rows - 1)

    @T.macro
    def body(xin, w, s, z, b, yout):
        x32 = T.decl_buffer((m, k // 2), "uint32", data=xin.data)
        y = T.decl_buffer((m, n), "float16", data=yout.data)
        for bx in T.thread_binding(n // 16, thread="blockIdx.x"):
            for ty in T.thread_binding(warps, thread="threadIdx.y"):
                for tx in T.thread_binding(LANES, thread="threadIdx.x"):
                    red = T.alloc_buffer((warps * 16 * 16,), "float32", scope="shared")
                    cf = T.alloc_buffer((nt * 4,), "float32", scope="local")
                    wv = T.alloc_buffer((pf * 4,), "uint32", scope="local")
                    au = T.alloc_buffer((4,), "uint32", scope="local")
                    ah = T.decl_buffer((8,), "float16", data=au.data)
                    bu = T.alloc_buffer((nt * 2,), "uint32", scope="local")
                    sz = T.alloc_buffer((4,), "float16", scope="local")
                    for c in T.unroll(nt * 4):
                        cf[c] = T.float32(0)
                    for qo in T.serial(kq_w // pf):
                        for p in T.unroll(pf):  # issue pf 16-byte weight loads before using any
                            for v in T.vectorized(4):
                                wv[p * 4 + v] = w[bx, ty * kq_w + qo * pf + p, tx, v]
                        for p in T.unroll(pf):
                            for h in T.unroll(2):  # scale / zero point of rows g and g + 8 for this K block
                                sz[h * 2] = s[srow(bx * 16 + tx // 4 + h * 8),
                                              (ty * kq_w + qo * pf + p) * kpl // group_size]
                                if has_zero_point:
                                    sz[h * 2 + 1] = z[srow(bx * 16 + tx // 4 + h * 8),
                                                      (ty * kq_w + qo * pf + p) * kpl // group_size]
                                else:
                                    sz[h * 2 + 1] = T.float16(0)
                            for j in T.unroll(spl):  # 16-wide K slice
                                for i in T.unroll(4):
                                    au[i] = ((wv[p * 4 + j * (4 // rpw) + i // rpw] >> T.Cast("uint32", bits * (i % rpw)))
                                             & T.uint32(cmask | (cmask << 16))) | T.uint32(0x64006400)
                                for e in T.unroll(8):  # a_i halves: rows g (i even) / g + 8 (i odd)
                                    ah[e] = (ah[e] - T.float16(off) - sz[(e // 2) % 2 * 2 + 1]) * sz[(e // 2) % 2 * 2]
                                for t2 in T.unroll(nt):
                                    for hb in T.unroll(2):
                                        bu[t2 * 2 + hb] = T.if_then_else(
                                            t2 * 8 + tx // 4 < m,
                                            x32[T.min(t2 * 8 + tx // 4, m - 1),
                                                ((ty * kq_w + qo * pf + p) * kpl + j * 16 + (tx % 4) * 2 + hb * 8) // 2],
                                            T.uint32(0))
                                    T.evaluate(T.ptx_legacy.mma("m16n8k16", "row", "col", "fp16", "fp16", "fp32",
                                                                au.data, 0, bu.data, t2 * 2, cf.data, t2 * 4, False,
                                                                dtype="float32"))
                    # C fragment -> shared: red[warp][row][act]; then one thread per (row, act) sums the warps
                    for t2 in T.unroll(nt):
                        for c in T.unroll(4):
                            red[ty * 256 + (tx // 4 + (c // 2) * 8) * 16 + t2 * 8 + (tx % 4) * 2 + c % 2] = cf[t2 * 4 + c]
                    T.tvm_storage_sync("shared")
                    for o in T.serial(red_iters):  # output (row, act) = divmod(idx, 16)
                        if o * (warps * LANES) + ty * LANES + tx < 256 and (ty * LANES + tx) % 16 < m:
                            cf[0] = T.float32(0)
                            for wi in T.unroll(warps):
                                cf[0] = cf[0] + red[wi * 256 + o * (warps * LANES) + ty * LANES + tx]
                            if has_bias:
                                y[(ty * LANES + tx) % 16, bx * 16 + (o * (warps * LANES) + ty * LANES + tx) // 16] = \
                                    T.Cast("float16", cf[0] + T.Cast(
                                        "float32", b[bx * 16 + (o * (warps * LANES) + ty * LANES + tx) // 16]))
                            else:
                                y[(ty * LANES + tx) % 16, bx * 16 + (o * (warps * LANES) + ty * LANES + tx) // 16] = \
                                    T.Cast("float16", cf[0])

    wshape = (n // 16, kq, LANES, 4)
    attrs = {"tir.is_scheduled": True, "tir.noalias": True, "op_pattern": 8}
    if has_zero_point and has_bias:
        @T.prim_func(private=True)
        def kernel(x: T.Buffer(xshape, "float16"), w: T.Buffer(wshape, "uint32"), s: T.Buffer(zshape, "float16"),
                   z: T.Buffer(zshape, "float16"), b: T.Buffer((n,), "float16"), y: T.Buffer(yshape, "float16")):
            T.func_attr(attrs)
            body(x, w, s, z, b, y)
    elif has_zero_point:
        @T.prim_func(private=True)
        def kernel(x: T.Buffer(xshape, "float16"), w: T.Buffer(wshape, "uint32"), s: T.Buffer(zshape, "float16"),
                   z: T.Buffer(zshape, "float16"), y: T.Buffer(yshape, "float16")):
            T.func_attr(attrs)
            body(x, w, s, z, None, y)
    elif has_bias:
        @T.prim_func(private=True)
        def kernel(x: T.Buffer(xshape, "float16"), w: T.Buffer(wshape, "uint32"), s: T.Buffer(zshape, "float16"),
                   b: T.Buffer((n,), "float16"), y: T.Buffer(yshape, "float16")):
            T.func_attr(attrs)
            body(x, w, s, None, b, y)
    else:
        @T.prim_func(private=True)
        def kernel(x: T.Buffer(xshape, "float16"), w: T.Buffer(wshape, "uint32"), s: T.Buffer(zshape, "float16"),
                   y: T.Buffer(yshape, "float16")):
            T.func_attr(attrs)
            body(x, w, s, None, None, y)
    return kernel.with_attr("global_symbol", name)
