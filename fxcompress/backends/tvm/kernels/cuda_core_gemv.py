"""Hand-scheduled CUDA-core GEMV for packed integer weights (TVM TIR), used by the TVM backend at batch 1..16.

The backend has two kernels: :func:`.mma_gemv.packed_mma_primfunc` (int4 / int8 on tensor cores, ``mma.m16n8k16`` with the weights
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

from .epilogue import Epilogue, primfunc_with_params

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


def tile_for(m: int, k: int, n: int, tiles=None) -> Tile:
    """The default tile of the CUDA-core kernel (the fastest in tile sweeps run on an H100 while developing it; that
    sweep is not in tools/results -- tools/sweep_fxc_tiles.py covers the tensor-core tiles): batch 1 -- 16-byte
    loads, 8 rows per block at K <= 4096 (more blocks), 32 at larger K (the activation staging is amortized over
    more rows), K steps unrolled; batch 2-4 -- 32 rows per block; batch > 4 -- 8-byte loads and 4 rows per warp
    (each activation read from shared memory serves 4 decoded rows).  ``tiles`` (``TVMBuildConfig.tiles``)
    overrides the tile by case ("batch1", "batch1_large_k", "batch4", "batch")."""
    tiles = tiles or {}
    if m > 4:
        t = tiles.get("batch", Tile(warps=4, rows=4, words=2))
    elif m > 1:
        t = tiles.get("batch4", Tile(warps=8, rows=4, words=4))
    elif k > 4096:
        t = tiles.get("batch1_large_k", Tile(warps=8, rows=4, words=4, unroll=8))
    else:
        t = tiles.get("batch1", Tile(warps=4, rows=2, words=4, unroll=8))
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
                         tile: Tile | None = None, epilogue: Epilogue = Epilogue()):
    """The scheduled PrimFunc ``(x, words, scale[, zero_point][, bias][, residual], y)`` computing
    ``y[m, n] = sum_k x[m, k] * ((u[n, k] + qmin - zp[r, g]) * scale[r, g]) (+ bias[n])`` in fp32, stored fp16
    through ``epilogue`` (:class:`.epilogue.Epilogue`: "none", "residual", which adds the fp16 ``residual``
    shaped as ``y``, or "float32", which stores fp32; "swiglu" is the tensor-core kernel's only).

    ``x``: ``(*lead, k)`` fp16 with ``prod(lead) == m`` (default ``(m, k)``), ``y`` likewise;
    ``words``: ``(n, k * bits / 32)`` uint32 (:func:`tvm.pack_words` layout);
    ``scale`` / ``zero_point``: ``(scale_rows, k / group_size)`` fp16; ``bias``: ``(n,)`` fp16.
    """
    t = tile or tile_for(m, k, n)
    if not isinstance(epilogue, Epilogue) or epilogue.kind == "swiglu":
        raise ValueError(f"packed GEMV kernel: epilogue must be an Epilogue other than 'swiglu', got {epilogue!r}")
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

    def acc_plus_bias(b, v, row):
        return v + T.Cast("float32", b[row]) if has_bias else v

    @T.macro
    def body(xin, w, s, z, b, rin, yout):
        x = T.decl_buffer((m, k), "float16", data=xin.data)
        y = T.decl_buffer((m, n), epilogue.out_dtype, data=yout.data)
        if epilogue.has_residual:
            res = T.decl_buffer((m, n), "float16", data=rin.data)
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
                                if epilogue.has_residual:
                                    y[mi, bx * rpb + ty * rows + r] = epilogue.store(
                                        acc_plus_bias(b, acc[r * m + mi], bx * rpb + ty * rows + r),
                                        res[mi, bx * rpb + ty * rows + r])
                                else:
                                    y[mi, bx * rpb + ty * rows + r] = epilogue.store(
                                        acc_plus_bias(b, acc[r * m + mi], bx * rpb + ty * rows + r))

    attrs = {"tir.is_scheduled": True, "tirx.is_scheduled": True, "tir.noalias": True, "op_pattern": 8}
    params = [("x", xshape, "float16"), ("w", (n, kw), "uint32"), ("s", zshape, "float16"),
              ("z", zshape if has_zero_point else None, "float16"), ("b", (n,) if has_bias else None, "float16"),
              ("r", yshape if epilogue.has_residual else None, "float16"), ("y", yshape, epilogue.out_dtype)]
    return primfunc_with_params(body, params, attrs).with_attr("global_symbol", name)
