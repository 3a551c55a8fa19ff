"""Hand-scheduled int4 / int8 tensor-core kernel (TVM TIR) for small batches (5..32 activation rows by default):
mma.sync m16n8k16 on the weights of :func:`..packing.pack_mma_words`, decoded in registers, with each activation
fragment loaded once for several weight row tiles.

Why a second kernel: :mod:`.mma_gemv` gives each block 16 output features, so at 16-32 rows a lane issues 2
four-byte activation loads per n8 tile per 16-wide K slice for every 16 features -- 16-32 activation load
instructions per 16-byte weight load -- and every block re-reads all of ``x`` from L2 (``N / 16`` times ``m K``
fp16 values: 4x the int4 weight bytes at 16 rows).  Here each warp covers ``R`` row tiles (``16 R`` output
features): it loads the B fragments (activations) of a K slice once and runs them against ``R`` decoded A
fragments (weights), so the activation loads and the L2 traffic of ``x`` drop ``R``-fold, while the weight
stream keeps ``R x prefetch`` 16-byte loads in flight per lane.  With ``stage`` each warp first copies the
activations of a K block (``m`` rows x 64 / 32 K) to its rows of shared memory with coalesced 16-byte loads and
takes the B fragments from there (a 4-byte global load of a B fragment touches 8 rows, 8 cache lines).  Warps split
K and are summed through shared memory as in :mod:`.mma_gemv`; the epilogues are those of :mod:`.epilogue`.

Tile ``(row_tiles, warps, prefetch, stage)`` by case (:data:`BATCH_TILE_CASES`: up to 16 rows / 17..32 rows), from
``TVMBuildConfig.mma_batch_tiles`` or :data:`DEFAULT_BATCH_TILES`; :func:`batch_tile` adapts it to the layer.
"""
from __future__ import annotations

import math

from ..packing import MMA_BITS, mma_k_per_load, pack_mma_words  # noqa: F401  (pack_mma_words: the layout it reads)
from .epilogue import Epilogue, primfunc_with_params
from .mma_gemv import MAX_M as MMA_MAX_M, mma_prefetch_groups, mma_supports

LANES = 32  # threads per warp
MAX_M = MMA_MAX_M  # up to 4 n8 tiles of mma.m16n8k16 (the 1..32-row kernel's limit)
MAX_WARPS = 16  # 512 threads a block
SMEM_LIMIT = 48 * 1024  # bytes of static shared memory a kernel may declare
STAGE_PAD = 8  # fp16 pad per staged activation row: row stride 36 (int4) / 20 (int8) words, no bank conflicts
BATCH_TILE_CASES = ("rows16", "rows32")
MIN_BLOCKS = 128  # the default tile gives a layer at least this many blocks where it can (about one an H100 SM)
# (row tiles a warp covers, warps splitting K, 16-byte weight loads per row tile a lane issues before decoding,
# stage: 1 = the warp copies the activations of each K block to shared memory with 16-byte loads first, 0 = B
# fragments straight from global memory as 4-byte loads).
# Measured (tools/results/fxc_tile_sweep_batch.md, H100, weights cold): 2 row tiles a warp, 8 warps, 4 weight loads
# in flight per row tile, activations staged in shared memory was the fastest of the 6 tiles swept at 16 and 32 rows
# on 8192x8192 and 8192x28672 (e.g. 31.8 µs at 8192x8192 / 16 rows against 48.8 for the 4-row-tile tile first chosen
# by reasoning): half the row tiles give twice the blocks (256 at N = 8192) with the same 8 loads a lane in flight.
# Staging: a 4-byte B load from global touches 8 activation rows (8 cache lines for 128 useful bytes); the staged
# copy is coalesced 16-byte loads and the B fragments then come from conflict-free 4-byte shared loads.
DEFAULT_BATCH_TILES = {"rows16": (2, 8, 4, 1), "rows32": (2, 8, 4, 1)}


def batch_case(m: int) -> str:
    return "rows16" if m <= 16 else "rows32"


def smem_bytes(m: int, bits: int, warps: int, stage: int) -> int:
    """Shared memory of the kernel: the cross-warp sums of one row tile (``warps x 16 x na`` fp32), aliased with
    the staged activations when ``stage`` (``warps x na`` rows of ``kpl + STAGE_PAD`` fp16)."""
    na = -(-m // 8) * 8
    red = warps * 16 * na * 4
    return max(red, warps * na * (mma_k_per_load(bits) + STAGE_PAD) * 2) if stage else red


def batch_tile(m: int, k: int, n: int, bits: int = 4, tiles=None) -> tuple[int, int, int, int]:
    """``(row_tiles, warps, prefetch, stage)`` for ``m`` rows of a ``K x N`` layer: the configured tile of ``m``'s
    case (``tiles``: ``TVMBuildConfig.mma_batch_tiles``; else :data:`DEFAULT_BATCH_TILES`), with ``row_tiles``
    lowered to a divisor of ``N / 16`` and ``warps`` halved until they divide the K loads and the shared memory
    (:func:`smem_bytes`) fits in :data:`SMEM_LIMIT`.  The default tile also gives up row tiles (raising
    ``prefetch`` to keep ``row_tiles x prefetch`` loads in flight) until the layer has :data:`MIN_BLOCKS` blocks
    or one row tile a warp: 4096 features at 4 row tiles would be 64 blocks, half an H100 idle."""
    configured = (tiles or {}).get(batch_case(m))
    rt, warps, pf, stage = configured or DEFAULT_BATCH_TILES[batch_case(m)]
    tiles16 = n // 16
    rt = max(1, min(rt, tiles16))
    while tiles16 % rt:
        rt -= 1
    while configured is None and rt > 1 and tiles16 // rt < MIN_BLOCKS:
        smaller = next(d for d in range(rt - 1, 0, -1) if tiles16 % d == 0)
        rt, pf = smaller, min(16, pf * rt // smaller)
    while warps > 1 and (k // mma_k_per_load(bits)) % warps:
        warps //= 2
    while warps > 1 and smem_bytes(m, bits, warps, stage) > SMEM_LIMIT:
        warps //= 2
    return rt, warps, pf, stage


def batch_supports(*, m: int, k: int, n: int, bits: int, group_size: int, dtype: str, tiles=None) -> str | None:
    """None when this kernel handles the layer, else the reason (the 1..32-row kernel's conditions, same packing,
    and a tile that fits)."""
    reason = mma_supports(m=m, k=k, n=n, bits=bits, group_size=group_size, dtype=dtype)
    if reason is not None:
        return reason
    rt, warps, pf, stage = batch_tile(m, k, n, bits, tiles)
    if not (1 <= warps <= MAX_WARPS and 1 <= rt <= 8 and 1 <= pf <= 16 and stage in (0, 1)):
        return (f"tile (row_tiles={rt}, warps={warps}, prefetch={pf}, stage={stage}) is outside 1..8 / "
                f"1..{MAX_WARPS} / 1..16 / 0..1")
    return None


def packed_mma_batch_primfunc(*, m: int, k: int, n: int, qmin: int, group_size: int, scale_rows: int,
                              has_zero_point: bool, has_bias: bool, lead: tuple = (),
                              name: str = "fxc_packed_mma_batch", bits: int = 4, tiles=None,
                              epilogue: Epilogue = Epilogue()):
    """The scheduled PrimFunc ``(x, words, scale[, zero_point][, bias][, residual], y)`` of an int4 / int8 linear
    (``words`` from :func:`pack_mma_words`, the buffers and epilogues of :func:`.mma_gemv.packed_mma_primfunc`).

    Block ``bx`` covers row tiles ``bx R .. bx R + R`` (``16 R`` features); warp ``ty`` the K loads
    ``ty kq_w .. (ty + 1) kq_w``.  Per group of ``pf`` K loads a lane issues ``R pf`` 16-byte weight loads, then per
    16-wide K slice loads its B fragments (``2 ceil(m / 8)`` fp16 pairs; with ``stage`` from the warp's rows of
    shared memory, filled per K block from registers between two block barriers, the next K block's 16-byte
    loads issued before this one is computed) once and, per row tile,
    decodes the A fragment (``(h - (1024 - qmin) - zp) * scale``) and runs one ``mma`` per n8 tile into that tile's
    fp32 accumulators.  Rows past ``m`` of the last n8 tile are zeros.  Then per row tile the warps' accumulators
    are summed through shared memory (aliasing the staging rows) and stored through ``epilogue``."""
    if not isinstance(epilogue, Epilogue):
        raise ValueError(f"tensor-core batch kernel: epilogue must be an Epilogue, got {type(epilogue).__name__}")
    reason = batch_supports(m=m, k=k, n=n, bits=bits, group_size=group_size, dtype="float16", tiles=tiles)
    if reason is not None:
        raise ValueError(f"tensor-core batch kernel: {reason}")
    lead = tuple(lead) or (m,)
    if math.prod(lead) != m:
        raise ValueError(f"tensor-core batch kernel: leading dims {lead} do not hold {m} rows")
    from tvm.script import tirx as T

    rt, warps, prefetch, stage = batch_tile(m, k, n, bits, tiles)
    staged = bool(stage)  # a Python bool: TVMScript resolves ``if staged`` while parsing
    nt = -(-m // 8)  # n8 tiles of activation rows (1..4)
    na = nt * 8  # activation columns of the C tile
    kpl = mma_k_per_load(bits)  # K per 16-byte lane load
    rpw = 16 // bits  # A registers per word
    spl = kpl // 16  # 16-wide K slices per load
    cmask = (1 << bits) - 1
    kq = k // kpl  # 16-byte lane loads per row tile
    kq_w = kq // warps  # per warp
    pf, tail = mma_prefetch_groups(kq_w, prefetch)
    # every group of pf loads (and every warp's first load) starts a scale group: the scales of load p are those
    # of load p - 1 unless p starts a group
    reuse_sz = (kq_w * kpl) % group_size == 0 and (pf * kpl) % group_size == 0
    threads = warps * LANES
    n_out = epilogue.out_features(n)
    swiglu = epilogue.kind == "swiglu"
    per_tile = 8 if swiglu else 16  # output features per row tile
    outs = per_tile * na  # (feature, activation row) outputs per row tile, padded rows included
    red_iters = -(-outs // threads)
    cw = 16 * na  # one warp's partial sums of one row tile in shared memory
    ldw = (kpl + STAGE_PAD) // 2  # words per staged activation row
    units = m * kpl // 8  # 16-byte pieces of the activations of one K block (all rows)
    unit_iters = -(-units // LANES)
    upr = kpl // 8  # 16-byte pieces per activation row
    smem_words = smem_bytes(m, bits, warps, stage) // 4
    zshape = (scale_rows, k // group_size)
    xshape, yshape = (*lead, k), (*lead, n_out)
    off = float(1024 - qmin)  # fp16 1024 + u  ->  u + qmin (exact: u < 256)

    def srow(row):
        return T.min(row, scale_rows - 1)

    def acc_plus_bias(b, v, row):
        return v + T.Cast("float32", b[row]) if has_bias else v

    @T.macro
    def load_sz(q, s, z, sz, bx, ty, tx):
        for r in T.unroll(rt):
            for h in T.unroll(2):  # scale / zero point of rows g and g + 8 of row tile r, the warp's K block q
                sz[r * 4 + h * 2] = s[srow((bx * rt + r) * 16 + tx // 4 + h * 8), (ty * kq_w + q) * kpl // group_size]
                if has_zero_point:
                    sz[r * 4 + h * 2 + 1] = z[srow((bx * rt + r) * 16 + tx // 4 + h * 8),
                                              (ty * kq_w + q) * kpl // group_size]
                else:
                    sz[r * 4 + h * 2 + 1] = T.float16(0)

    @T.macro
    def fetch_x(q, x32, xr, ty, tx):
        # the activations of the warp's K block q (m rows x kpl), 16 bytes a lane, into registers
        for u in T.unroll(unit_iters):
            if u * LANES + tx < units:
                for v in T.vectorized(4):
                    xr[u * 4 + v] = x32[(u * LANES + tx) // upr, (ty * kq_w + q) * kpl // 2 + (u * LANES + tx) % upr * 4
                                        + v]

    @T.macro
    def put_x(xs, xr, ty, tx):
        # ... and from registers to the warp's rows of xs (row stride ldw words: conflict-free B reads)
        for u in T.unroll(unit_iters):
            if u * LANES + tx < units:
                for v in T.vectorized(4):
                    xs[(ty * na + (u * LANES + tx) // upr) * ldw + (u * LANES + tx) % upr * 4 + v] = xr[u * 4 + v]

    @T.macro
    def kgroup(q0, cnt, w, s, z, x32, xs, xr, wv, sz, au, ah, bu, cf, bx, ty, tx):
        # a warp's loads q0 .. q0 + cnt of its K range, for each of the block's R row tiles: issue them all, then
        # per K slice load the activation fragments once and run them against every row tile's decoded weights
        for p in T.unroll(cnt):
            for r in T.unroll(rt):
                for v in T.vectorized(4):
                    wv[(p * rt + r) * 4 + v] = w[bx * rt + r, ty * kq_w + q0 + p, tx, v]
        if staged:
            fetch_x(q0, x32, xr, ty, tx)
        for p in T.unroll(cnt):
            if staged:  # K block p: registers -> xs between two block barriers (TVM's ThreadSync pass would insert
                # them anyway: it sees shared memory, not that each warp touches only its own rows); then the
                # next K block's activations are loaded while this one is computed
                T.tvm_storage_sync("shared")
                put_x(xs, xr, ty, tx)
                T.tvm_storage_sync("shared")
                if p + 1 < cnt:
                    fetch_x(q0 + p + 1, x32, xr, ty, tx)
            if reuse_sz:  # group boundaries fall on static p: load only where a new scale group starts
                if p == 0 or p * kpl % group_size == 0:
                    load_sz(q0 + p, s, z, sz, bx, ty, tx)
            else:
                load_sz(q0 + p, s, z, sz, bx, ty, tx)
            for j in T.unroll(spl):  # 16-wide K slice
                for t2 in T.unroll(nt):  # B fragments: once per slice for all row tiles
                    for hb in T.unroll(2):
                        if staged:
                            bu[t2 * 2 + hb] = T.if_then_else(
                                t2 * 8 + tx // 4 < m,
                                xs[(ty * na + T.min(t2 * 8 + tx // 4, m - 1)) * ldw + (j * 16 + (tx % 4) * 2 + hb * 8) // 2],
                                T.uint32(0))
                        else:
                            bu[t2 * 2 + hb] = T.if_then_else(
                                t2 * 8 + tx // 4 < m,
                                x32[T.min(t2 * 8 + tx // 4, m - 1),
                                    ((ty * kq_w + q0 + p) * kpl + j * 16 + (tx % 4) * 2 + hb * 8) // 2],
                                T.uint32(0))
                for r in T.unroll(rt):
                    for i in T.unroll(4):
                        au[i] = ((wv[(p * rt + r) * 4 + j * (4 // rpw) + i // rpw] >> T.Cast("uint32", bits * (i % rpw)))
                                 & T.uint32(cmask | (cmask << 16))) | T.uint32(0x64006400)
                    for e in T.unroll(8):  # a_i halves: rows g (i even) / g + 8 (i odd)
                        ah[e] = (ah[e] - T.float16(off) - sz[r * 4 + (e // 2) % 2 * 2 + 1]) * sz[r * 4 + (e // 2) % 2 * 2]
                    for t2 in T.unroll(nt):
                        T.evaluate(T.ptx_legacy.mma("m16n8k16", "row", "col", "fp16", "fp16", "fp32",
                                                    au.data, 0, bu.data, t2 * 2, cf.data, (r * nt + t2) * 4, False,
                                                    dtype="float32"))

    @T.macro
    def body(xin, w, s, z, b, rin, yout):
        x32 = T.decl_buffer((m, k // 2), "uint32", data=xin.data)
        y = T.decl_buffer((m, n_out), epilogue.out_dtype, data=yout.data)
        if epilogue.has_residual:
            res = T.decl_buffer((m, n_out), "float16", data=rin.data)
        for bx in T.thread_binding(n // 16 // rt, thread="blockIdx.x"):
            for ty in T.thread_binding(warps, thread="threadIdx.y"):
                for tx in T.thread_binding(LANES, thread="threadIdx.x"):
                    sm = T.alloc_buffer((smem_words,), "uint32", scope="shared")
                    red = T.decl_buffer((smem_words,), "float32", data=sm.data, scope="shared")
                    xs = T.decl_buffer((smem_words,), "uint32", data=sm.data, scope="shared")
                    xr = T.alloc_buffer((unit_iters * 4,), "uint32", scope="local")
                    cf = T.alloc_buffer((rt * nt * 4,), "float32", scope="local")
                    wv = T.alloc_buffer((pf * rt * 4,), "uint32", scope="local")
                    au = T.alloc_buffer((4,), "uint32", scope="local")
                    ah = T.decl_buffer((8,), "float16", data=au.data)
                    bu = T.alloc_buffer((nt * 2,), "uint32", scope="local")
                    sz = T.alloc_buffer((rt * 4,), "float16", scope="local")
                    acc = T.alloc_buffer((2,), "float32", scope="local")
                    for c in T.unroll(rt * nt * 4):
                        cf[c] = T.float32(0)
                    for qo in T.serial(kq_w // pf):
                        kgroup(qo * pf, pf, w, s, z, x32, xs, xr, wv, sz, au, ah, bu, cf, bx, ty, tx)
                    if tail > 0:
                        kgroup(kq_w - tail, tail, w, s, z, x32, xs, xr, wv, sz, au, ah, bu, cf, bx, ty, tx)
                    if staged:  # red aliases xs: every warp is done with its activations
                        T.tvm_storage_sync("shared")
                    # per row tile r: C fragments -> shared red[warp][row][act] (c0, c1: row tx // 4, acts
                    # 2 (tx % 4) + {0, 1}; c2, c3: row + 8), then one thread per output sums the warps
                    for r in T.unroll(rt):
                        for t2 in T.unroll(nt):
                            for c in T.unroll(4):
                                red[ty * cw + (tx // 4 + (c // 2) * 8) * na + t2 * 8 + (tx % 4) * 2 + c % 2] = \
                                    cf[(r * nt + t2) * 4 + c]
                        T.tvm_storage_sync("shared")
                        for o in T.serial(red_iters):  # output (feature of the tile, act) = divmod(idx, na)
                            if o * threads + ty * LANES + tx < outs and (o * threads + ty * LANES + tx) % na < m:
                                acc[0] = T.float32(0)
                                for wi in T.unroll(warps):
                                    acc[0] = acc[0] + red[wi * cw + o * threads + ty * LANES + tx]
                                if swiglu:  # up feature: tile row + 8
                                    acc[1] = T.float32(0)
                                    for wi in T.unroll(warps):
                                        acc[1] = acc[1] + red[wi * cw + 8 * na + o * threads + ty * LANES + tx]
                                    y[(o * threads + ty * LANES + tx) % na,
                                      (bx * rt + r) * 8 + (o * threads + ty * LANES + tx) // na] = epilogue.store((
                                          acc_plus_bias(b, acc[0], (bx * rt + r) * 16
                                                        + (o * threads + ty * LANES + tx) // na),
                                          acc_plus_bias(b, acc[1], (bx * rt + r) * 16 + 8
                                                        + (o * threads + ty * LANES + tx) // na)))
                                elif epilogue.has_residual:
                                    y[(o * threads + ty * LANES + tx) % na,
                                      (bx * rt + r) * 16 + (o * threads + ty * LANES + tx) // na] = epilogue.store(
                                          acc_plus_bias(b, acc[0], (bx * rt + r) * 16
                                                        + (o * threads + ty * LANES + tx) // na),
                                          res[(o * threads + ty * LANES + tx) % na,
                                              (bx * rt + r) * 16 + (o * threads + ty * LANES + tx) // na])
                                else:
                                    y[(o * threads + ty * LANES + tx) % na,
                                      (bx * rt + r) * 16 + (o * threads + ty * LANES + tx) // na] = epilogue.store(
                                          acc_plus_bias(b, acc[0], (bx * rt + r) * 16
                                                        + (o * threads + ty * LANES + tx) // na))
                        T.tvm_storage_sync("shared")  # the next row tile overwrites red

    wshape = (n // 16, kq, LANES, 4)
    attrs = {"tir.is_scheduled": True, "tirx.is_scheduled": True, "tir.noalias": True, "op_pattern": 8}
    params = [("x", xshape, "float16"), ("w", wshape, "uint32"), ("s", zshape, "float16"),
              ("z", zshape if has_zero_point else None, "float16"), ("b", (n,) if has_bias else None, "float16"),
              ("r", yshape if epilogue.has_residual else None, "float16"), ("y", yshape, epilogue.out_dtype)]
    return primfunc_with_params(body, params, attrs).with_attr("global_symbol", name)
