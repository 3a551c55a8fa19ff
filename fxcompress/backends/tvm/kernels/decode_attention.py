"""One kernel for a decode step's attention over a static KV cache (TVM TIR): cache write + grouped-query attention.

The cached step graphs of :mod:`fxcompress.lm` attend with ``cached_attention(q, k, v, k_cache, v_cache,
cache_position, scale)`` (:func:`fxcompress.lm.attention.cached_attention`).  Decomposed by ``torch.export`` it
becomes about ten kernels per layer (cache scatters, a transposed scores matmul, the mask, softmax, the values
matmul, casts).  For a decode step (one new token, caches donated) :func:`decode_attention_primfunc` does it in one:

1. writes ``k`` / ``v`` (cast to the caches' dtype) into slot ``pos = cache_position[0]`` of the caches, in place;
2. for each query head ``h`` (KV head ``h // rep``, ``rep = H / KVH``: ``repeat_interleave`` order) computes
   ``softmax(scale * q K^T) V`` over slots ``0 .. pos`` with fp32 scores, an fp32 softmax and an fp32 sum, and
   stores it in ``q``'s dtype.  ``K`` / ``V`` are read as ``cached_attention`` reads them: the cache's values cast
   to ``q``'s dtype (slot ``pos`` from ``k`` / ``v`` cast to the cache dtype and then to ``q``'s, the value it
   writes there).

Reads absorbed from the graph (:func:`fxcompress.lm.attention.with_fused_decode_attention` finds them): ``q`` /
``k`` / ``v`` may be read straight from the rows of a ``[B, width]`` tensor at ``offset + h * D + d`` (a slice of
a fused q/k/v linear's output, viewed ``[B, 1, heads, D]`` and transposed: a :class:`Source` with a width) instead
of a materialized ``[B, heads, 1, D]`` tensor, and the rotary embedding ``x * cos + rotate_half(x) * sin`` may be
applied to ``q`` and ``k`` as they are read (``cos`` / ``sin``: ``[rows, D]``, rows 1 or B), with the rounding points
of the ops it replaces: each product and the sum rounded to their result dtype (torch's promotion of ``x``'s and
``cos``'s), so the kernel sees the values the separate rotary kernels stored.

Mask: ``cached_attention`` adds ``-30000`` to the scores of slots after ``pos`` (stale or empty entries), whose
``exp`` then underflows to exactly 0 in fp32; the kernel does not read those slots at all (the same result for
any scores within ~29000 of each other, and none of the stale slots' bytes are read).

The softmax is computed online in ``W`` partitions of the slots (slot ``j`` in partition ``j % W``): each
keeps a running max ``m``, a sum ``l`` of ``exp(s - m)`` and the weighted sum of V rows, rescaled by
``exp(m_old - m_new)`` when the max grows; the partitions are combined at the end.  On CUDA a thread block per
``(batch, KV head)`` when there are many (the ``rep`` query heads of one KV head share every K / V row it loads),
else per query head (:func:`heads_per_block`: more blocks for a batch-1 GQA model), a warp per partition (slots
``j = ty, ty + warps, ...``, ``unroll`` slots per step so their loads are in flight together), the head dim across
the 32 lanes (``d = 32 i + lane``, coalesced) with warp-shuffle dot products, and the partitions combined through
shared memory.  The cache writes are race-free: one block per KV head writes its slot ``pos`` and no block reads a
cache's slot ``pos`` (it reads ``k`` / ``v``).  On LLVM the same partitioned online softmax runs in plain loops
(CPU tests check its numerics against torch; the CUDA variant's against torch on a GPU, gpu mark).

Split over the slots (flash-decoding): with few blocks (batch 1 with 16 heads: 16 blocks on a 132-SM H100) each
block walks all ``pos + 1`` slots one unrolled group after another and the kernel is latency-bound.  With
``splits = P > 1`` (:func:`attention_splits` gives the importer's default from the shape, 1 when there are enough
blocks) the slots are split over ``P`` blocks per head, split ``i`` taking the slots ``j = i, i + P, ... <= pos``
(a split with none, e.g. ``i > pos``, leaves the state ``m = -1e30, l = 0``, sum 0).  Two kernels then do the
work: :func:`decode_attention_primfunc` (``call_tir_inplace``, as the single kernel: it still writes ``k`` / ``v``
into the donated caches, one block, split 0, writes slot ``pos``) stores each ``(batch, head, split)``'s partial
online-softmax state into two fp32 tensors, ``acc`` ``[B, H, P, D]`` (the unnormalized weighted sum of V rows) and
``state`` ``[B, H, P, 2]`` (running max ``m``, sum ``l`` of ``exp(s - m)``), and
:func:`decode_attention_combine_primfunc` rescales the splits by ``exp(m_i - max_i m_i)``, sums and normalizes
them and stores the output in ``q``'s dtype.  (Two tensors, so the combine has two inputs: TVM 0.27's
``RewriteDataflowReshape`` checks every one-input ``call_tir`` for a reshape pattern, an analysis that fails on a
hand-scheduled PrimFunc.)  A decode step's middle layer then launches 8 kernels instead of 7 (issue 13's target:
at most 8 per layer; the 2048-wide model's step: 38 launches, per layer [12, 8, 8, 8], was 34, [11, 7, 7, 7]).
Both have an LLVM variant of the same math (CPU tests); the importer uses the same split count on LLVM and CUDA.
"""
from __future__ import annotations

from dataclasses import dataclass

from .epilogue import primfunc_with_params

SHARED_BYTES = 48 * 1024
LANES = 32
MAX_WARPS = 16
MIN_BLOCKS = 64  # (batch, KV head) blocks below which each query head gets its own block
NEG = -1.0e30  # the running max before any slot: exp(NEG - m) == 0 for every finite score m
FLOATS = ("float16", "bfloat16", "float32")
SMS = 132  # streaming multiprocessors the default split count fills: an H100 SXM's (an A100 has 108)
MIN_SPLIT_SLOTS = 16  # cache slots a split holds at least (the default split count: no split of a short cache)
COMBINE_THREADS = 128  # threads per block of the CUDA combine kernel (one per output element)

__all__ = ["AttentionShape", "Source", "attention_splits", "attention_supports", "attention_warps",
           "decode_attention_combine_primfunc", "decode_attention_primfunc", "heads_per_block", "promote"]


def promote(a: str, b: str) -> str:
    """torch's result dtype of a binary op on two float tensors of dtypes ``a`` and ``b``."""
    return a if a == b else "float32"


@dataclass(frozen=True)
class Source:
    """Where the ``[B, heads, 1, D]`` values of ``q``, ``k`` or ``v`` are read: the 4-D tensor itself
    (``width`` None) or element ``[b, offset + h * D + d]`` of a ``[B, width]`` tensor."""

    dtype: str
    width: int | None = None
    offset: int = 0

    def __post_init__(self):
        if self.width is not None and (isinstance(self.width, bool) or not isinstance(self.width, int)
                                       or self.width < 1):
            raise ValueError(f"Source.width must be None or an int >= 1, got {self.width!r}")
        if isinstance(self.offset, bool) or not isinstance(self.offset, int) or self.offset < 0:
            raise ValueError(f"Source.offset must be an int >= 0, got {self.offset!r}")


@dataclass(frozen=True)
class AttentionShape:
    """A decode attention's static shapes and dtypes (one new token).  ``q`` / ``k`` / ``v``: a :class:`Source`
    or a dtype name (a 4-D input of that dtype); ``rope_rows``: 0 (no rotary embedding in the kernel) or the rows
    (1 or ``batch``) of the ``[rows, head_dim]`` cos / sin inputs, of dtype ``rope_dtype``."""

    batch: int
    heads: int
    kv_heads: int
    seq: int  # cache slots S
    head_dim: int
    q: Source | str
    k: Source | str
    v: Source | str
    kc_dtype: str  # the caches
    vc_dtype: str
    index_dtype: str = "int64"  # cache_position
    rope_rows: int = 0
    rope_dtype: str = "float32"

    def __post_init__(self):
        for name in ("batch", "heads", "kv_heads", "seq", "head_dim"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"AttentionShape.{name} must be an int >= 1, got {v!r}")
        if self.heads % self.kv_heads:
            raise ValueError(f"AttentionShape.heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        for name, nh in (("q", self.heads), ("k", self.kv_heads), ("v", self.kv_heads)):
            src = getattr(self, name)
            if isinstance(src, str):
                object.__setattr__(self, name, Source(src))
            elif not isinstance(src, Source):
                raise ValueError(f"AttentionShape.{name} must be a Source or a dtype name, got {src!r}")
            src = getattr(self, name)
            if src.width is not None and src.offset + nh * self.head_dim > src.width:
                raise ValueError(f"AttentionShape.{name}: {nh} heads x {self.head_dim} at offset {src.offset} do not "
                                 f"fit in rows of width {src.width}")
        if self.rope_rows not in (0, 1, self.batch):
            raise ValueError(f"AttentionShape.rope_rows must be 0, 1 or batch ({self.batch}), got {self.rope_rows!r}")

    @property
    def rep(self) -> int:
        return self.heads // self.kv_heads

    @property
    def q_dtype(self) -> str:
        """The attention's dtype (its output's): ``q``'s, after the rotary embedding's promotion."""
        return promote(self.q.dtype, self.rope_dtype) if self.rope_rows else self.q.dtype

    @property
    def k_dtype(self) -> str:
        """The new key's dtype before the cast to the cache's."""
        return promote(self.k.dtype, self.rope_dtype) if self.rope_rows else self.k.dtype


def heads_per_block(shape: AttentionShape) -> int:
    """Query heads per CUDA block: all ``rep`` heads of a KV head (each K / V row loaded once for them) when there
    are at least :data:`MIN_BLOCKS` ``(batch, KV head)`` blocks; otherwise one (``rep`` times the blocks, e.g. 9
    instead of 3 for SmolLM2's 3 KV heads at batch 1: the step is latency-bound, not bandwidth-bound)."""
    return shape.rep if shape.batch * shape.kv_heads >= MIN_BLOCKS else 1


def attention_warps(shape: AttentionShape, heads: int | None = None, slots: int | None = None) -> int:
    """Warps per block on CUDA (= partitions of the online softmax): up to 16, no more than the slots a block
    walks (``slots``, default all ``seq``; a split's share when split), and few enough that each warp's partial sums
    (``heads * head_dim`` fp32, ``heads`` the block's query heads, default ``rep``) fit in 48 KB of shared memory."""
    heads = shape.rep if heads is None else heads
    slots = shape.seq if slots is None else slots
    w = MAX_WARPS
    while w > 1 and (w > slots or w * heads * (shape.head_dim + 2) * 4 > SHARED_BYTES):
        w //= 2
    return w


def attention_supports(shape: AttentionShape) -> str | None:
    """None when :func:`decode_attention_primfunc` handles ``shape``, else the reason it does not."""
    dts = {"q": shape.q.dtype, "k": shape.k.dtype, "v": shape.v.dtype, "kc_dtype": shape.kc_dtype,
           "vc_dtype": shape.vc_dtype}
    if shape.rope_rows:
        dts["rope_dtype"] = shape.rope_dtype
    for name, dt in dts.items():
        if dt not in FLOATS:
            return f"{name} is {dt} (the kernel takes {', '.join(FLOATS)})"
    if shape.index_dtype not in ("int32", "int64"):
        return f"cache_position is {shape.index_dtype} (int32 / int64 expected)"
    if shape.rope_rows and shape.head_dim % 2:
        return f"a rotary embedding needs an even head_dim, got {shape.head_dim}"
    if shape.rep * (shape.head_dim + 2) * 4 > SHARED_BYTES:
        return (f"{shape.rep} query heads per KV head x head_dim {shape.head_dim} exceed {SHARED_BYTES} bytes of "
                "shared memory")
    return None


def _readers(shape: AttentionShape):
    """TIR expressions of the kernel's reads, shared by the CUDA and LLVM variants: ``(qval, knew, vnew, key,
    value)``.  ``qval(q, cs, sn, b, h, d)``: fp32 of the attention's query element (rotary applied);
    ``knew`` / ``vnew(x, cs, sn, b, g, d)``: the new key / value in the cache dtype; ``key`` / ``value(x, c, cs, sn,
    b, g, j, p, d)``: fp32 of slot ``j`` as read in the attention's dtype (slot ``p`` from the new key / value)."""
    from tvm.script import tirx as T

    D, half = shape.head_dim, shape.head_dim // 2
    rd, kd = shape.q_dtype, shape.k_dtype

    def f32(x):
        return T.Cast("float32", x)

    def rnd(x, dt):
        return f32(T.Cast(dt, x)) if dt != "float32" else x

    def src(buf, s: Source, b, h, d):
        return buf[b, s.offset + h * D + d] if s.width is not None else buf[b, h, 0, d]

    def rope(buf, s: Source, cs, sn, b, h, d, dt):
        """``x * cos + cat(-x2, x1) * sin`` at ``d``, each op rounded to ``dt`` (torch's dtype for it)."""
        if not shape.rope_rows:
            return f32(src(buf, s, b, h, d))
        row = T.min(b, shape.rope_rows - 1)
        rot = T.if_then_else(d < half, -f32(src(buf, s, b, h, T.min(d + half, D - 1))),
                             f32(src(buf, s, b, h, T.max(d - half, 0))))
        return rnd(rnd(f32(src(buf, s, b, h, d)) * f32(cs[row, d]), dt) + rnd(rot * f32(sn[row, d]), dt), dt)

    def qval(q, cs, sn, b, h, d):
        return rope(q, shape.q, cs, sn, b, h, d, rd)

    def knew(k, cs, sn, b, g, d):
        return T.Cast(shape.kc_dtype, rope(k, shape.k, cs, sn, b, g, d, kd))

    def vnew(v, cs, sn, b, g, d):
        return T.Cast(shape.vc_dtype, f32(src(v, shape.v, b, g, d)))

    def key(k, kc, cs, sn, b, g, j, p, d):
        return f32(T.Cast(rd, T.if_then_else(j == p, knew(k, cs, sn, b, g, d), kc[b, g, j, d])))

    def value(v, vc, cs, sn, b, g, j, p, d):
        return f32(T.Cast(rd, T.if_then_else(j == p, vnew(v, cs, sn, b, g, d), vc[b, g, j, d])))

    return qval, knew, vnew, key, value


def _check_splits(splits) -> int:
    if isinstance(splits, bool) or not isinstance(splits, int) or splits < 1:
        raise ValueError(f"decode attention kernel: splits must be an int >= 1 (1: the single kernel), got {splits!r}")
    return splits


def attention_splits(shape: AttentionShape, *, sms: int = SMS, min_slots: int = MIN_SPLIT_SLOTS) -> int:
    """The default number of splits of the cache slots (flash-decoding; 1: the single kernel).

    The CUDA kernel has ``blocks = batch * kv_heads * rep / heads_per_block`` blocks (:func:`heads_per_block`);
    when they are fewer than half of ``sms`` (the GPU's streaming multiprocessors, default an H100 SXM's 132) the
    step is latency-bound: each block walks ``pos + 1`` slots one group after another while most SMs idle.  Then
    the slots are split over ``min(sms // blocks, seq // min_slots)`` blocks per head (at least ``min_slots`` cache
    slots per split): 8 for the 2048-wide model (16 heads, 384 slots: 128 blocks), 14 for SmolLM2-135M (9 query
    heads).  The same count is used on LLVM, so the CPU build runs the kernels' structure that the GPU runs."""
    for name, v in (("sms", sms), ("min_slots", min_slots)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"attention_splits: {name} must be an int >= 1, got {v!r}")
    blocks = shape.batch * shape.kv_heads * (shape.rep // heads_per_block(shape))
    return max(1, min(sms // blocks, shape.seq // min_slots))


def decode_attention_primfunc(shape: AttentionShape, scale: float, cuda: bool, *, unroll: int = 4,
                              heads_per_block_: int | None = None, splits: int = 1, name: str | None = None):
    """The PrimFunc ``(q, k, v, k_cache, v_cache, cache_position[, cos, sin], out)`` described in the module
    docstring.

    ``q`` / ``k`` / ``v``: ``[B, heads, 1, D]``, or ``[B, width]`` rows (:class:`Source`); ``k_cache`` /
    ``v_cache``: ``[B, KVH, S, D]`` (written in place at ``cache_position[0]``; nothing is written when it is
    outside ``0 .. S-1``); ``cache_position``: ``[1]``; ``cos`` / ``sin``: ``[rope_rows, D]`` (only with a rotary
    embedding); ``out``: ``[B, H, 1, D]`` in :attr:`AttentionShape.q_dtype`.  ``cuda``: thread-bound; otherwise
    plain loops for LLVM (either is marked scheduled: dlight and MetaSchedule leave it alone).  ``unroll``: slots
    a warp loads per step (CUDA); ``heads_per_block_``: query heads per CUDA block, a divisor of ``rep`` (default
    :func:`heads_per_block`).

    ``splits`` (default 1: this one kernel; :func:`attention_splits` gives the importer's choice): ``P > 1`` splits
    the slots over ``P`` blocks per head (split ``i`` takes slots ``j = i, i + P, i + 2P, .. <= pos``) and the
    function's last parameter ``out`` is replaced by two, fp32, per split: ``acc`` ``[B, H, P, D]``, the
    unnormalized weighted sum of V rows, and ``state`` ``[B, H, P, 2]``, its running max ``m`` (-1e30 for an empty
    split) and sum ``l`` of ``exp(s - m)``; :func:`decode_attention_combine_primfunc` then gives ``out``.  The
    caches are still written by this kernel, by one block (split 0).  ``name``: the global symbol (default
    ``fxc_decode_attention``, ``fxc_decode_attention_split`` when split)."""
    reason = attention_supports(shape)
    if reason is not None:
        raise ValueError(f"decode attention kernel: {reason}")
    if isinstance(unroll, bool) or not isinstance(unroll, int) or unroll < 1:
        raise ValueError(f"decode attention kernel: unroll must be an int >= 1, got {unroll!r}")
    P = _check_splits(splits)
    if name is None:
        name = "fxc_decode_attention" if P == 1 else "fxc_decode_attention_split"
    from tvm.script import tirx as T

    B, H, KVH, S, D, rep = shape.batch, shape.heads, shape.kv_heads, shape.seq, shape.head_dim, shape.rep
    rd = shape.q_dtype
    C = -(-S // P)  # the most slots one split holds
    W = attention_warps(shape, slots=C)
    scale = float(scale)
    qval, knew, vnew, key, value = _readers(shape)

    def buf_shape(s: Source, nh):
        return (B, s.width) if s.width is not None else (B, nh, 1, D)

    rope = (shape.rope_rows, D) if shape.rope_rows else None
    params = [("q", buf_shape(shape.q, H), shape.q.dtype), ("k", buf_shape(shape.k, KVH), shape.k.dtype),
              ("v", buf_shape(shape.v, KVH), shape.v.dtype), ("k_cache", (B, KVH, S, D), shape.kc_dtype),
              ("v_cache", (B, KVH, S, D), shape.vc_dtype), ("pos", (1,), shape.index_dtype),
              ("cs", rope, shape.rope_dtype), ("sn", rope, shape.rope_dtype)]
    params += [("out", (B, H, 1, D), rd), ("state", None, None)] if P == 1 else \
        [("acc", (B, H, P, D), "float32"), ("state", (B, H, P, 2), "float32")]
    # scheduled as written (CUDA: thread-bound; LLVM: plain loops): dlight and MetaSchedule leave it alone
    attrs = {"tir.noalias": True, "op_pattern": 8, "tir.is_scheduled": True, "tirx.is_scheduled": True}
    if cuda:
        hb = heads_per_block(shape) if heads_per_block_ is None else heads_per_block_
        if isinstance(hb, bool) or not isinstance(hb, int) or hb < 1 or rep % hb:
            raise ValueError(f"decode attention kernel: heads_per_block must divide {rep}, got {hb}")
        ns = rep // hb  # blocks per KV head (per split)
        W = attention_warps(shape, hb, slots=C)
        DL = -(-D // LANES)  # head-dim elements per lane
        U = max(1, min(unroll, -(-C // W)))
        steps = -(-C // (W * U))
        threads = W * LANES
        write_iters = -(-D // threads)
        comb_iters = -(-(hb * D) // threads)

        def qb(bx):
            """The block's (batch, KV head, head group) index: ``bx`` is ``qb * P + split``."""
            return bx // P if P > 1 else bx

        def slot(t, bx):
            """The cache slot of the block's split's ``t``-th slot."""
            return t * P + bx % P if P > 1 else t

        @T.macro
        def body(q, k, v, k_cache, v_cache, pos, cs, sn, out, state):
            for bx in T.thread_binding(B * KVH * ns * P, thread="blockIdx.x"):
                for ty in T.thread_binding(W, thread="threadIdx.y"):
                    for tx in T.thread_binding(LANES, thread="threadIdx.x"):
                        p = T.alloc_buffer((1,), "int32", scope="local")
                        qv = T.alloc_buffer((hb * DL,), "float32", scope="local")
                        acc = T.alloc_buffer((hb * DL,), "float32", scope="local")
                        ml = T.alloc_buffer((hb * 2,), "float32", scope="local")  # running (max, sum) per head
                        kv = T.alloc_buffer((U * DL,), "float32", scope="local")
                        vv = T.alloc_buffer((U * DL,), "float32", scope="local")
                        sc = T.alloc_buffer((U,), "float32", scope="local")
                        mx = T.alloc_buffer((2,), "float32", scope="local")  # new max, exp(old - new)
                        cmb = T.alloc_buffer((3,), "float32", scope="local")  # combine: max, sum, output
                        sm = T.alloc_buffer((W * hb * 2,), "float32", scope="shared")
                        sacc = T.alloc_buffer((W * hb * D,), "float32", scope="shared")
                        p[0] = T.Cast("int32", pos[0])
                        # 1. the cache writes (slot p), by this block's threads over the head dim
                        if p[0] >= 0 and p[0] < S and qb(bx) % ns == 0 and bx % P == 0:  # one block per KV head
                            for i in T.serial(write_iters):
                                if i * threads + ty * LANES + tx < D:
                                    k_cache[qb(bx) // (KVH * ns), qb(bx) // ns % KVH, p[0],
                                            i * threads + ty * LANES + tx] = \
                                        knew(k, cs, sn, qb(bx) // (KVH * ns), qb(bx) // ns % KVH,
                                             i * threads + ty * LANES + tx)
                                    v_cache[qb(bx) // (KVH * ns), qb(bx) // ns % KVH, p[0],
                                            i * threads + ty * LANES + tx] = \
                                        vnew(v, cs, sn, qb(bx) // (KVH * ns), qb(bx) // ns % KVH,
                                             i * threads + ty * LANES + tx)
                        # 2. this warp's partition of the (split's) slots: online softmax per query head
                        for r in T.unroll(hb):
                            ml[r * 2] = T.float32(NEG)
                            ml[r * 2 + 1] = T.float32(0)
                            for i in T.unroll(DL):
                                acc[r * DL + i] = T.float32(0)
                                qv[r * DL + i] = T.if_then_else(
                                    i * LANES + tx < D,
                                    qval(q, cs, sn, qb(bx) // (KVH * ns),
                                         (qb(bx) // ns % KVH) * rep + qb(bx) % ns * hb + r,
                                         T.min(i * LANES + tx, D - 1)),
                                    T.float32(0))
                        for st in T.serial(steps):
                            if slot((st * U) * W + ty, bx) <= p[0]:  # warp-uniform: the shuffles see all lanes
                                for u in T.unroll(U):
                                    for i in T.unroll(DL):
                                        kv[u * DL + i] = T.if_then_else(
                                            slot((st * U + u) * W + ty, bx) <= p[0]
                                            and slot((st * U + u) * W + ty, bx) < S and i * LANES + tx < D,
                                            key(k, k_cache, cs, sn, qb(bx) // (KVH * ns), qb(bx) // ns % KVH,
                                                T.min(slot((st * U + u) * W + ty, bx), S - 1), p[0],
                                                T.min(i * LANES + tx, D - 1)),
                                            T.float32(0))
                                        vv[u * DL + i] = T.if_then_else(
                                            slot((st * U + u) * W + ty, bx) <= p[0]
                                            and slot((st * U + u) * W + ty, bx) < S and i * LANES + tx < D,
                                            value(v, v_cache, cs, sn, qb(bx) // (KVH * ns), qb(bx) // ns % KVH,
                                                  T.min(slot((st * U + u) * W + ty, bx), S - 1), p[0],
                                                  T.min(i * LANES + tx, D - 1)),
                                            T.float32(0))
                                for r in T.unroll(hb):
                                    for u in T.unroll(U):
                                        sc[u] = T.float32(0)
                                        for i in T.unroll(DL):
                                            sc[u] = sc[u] + qv[r * DL + i] * kv[u * DL + i]
                                    for o in T.unroll(5):  # butterfly: every lane ends with the full dot products
                                        for u in T.unroll(U):
                                            sc[u] = sc[u] + T.tvm_warp_shuffle(
                                                T.uint32(0xFFFFFFFF), sc[u], T.bitwise_xor(tx, T.shift_right(16, o)),
                                                32, 32)
                                    mx[0] = ml[r * 2]
                                    for u in T.unroll(U):
                                        sc[u] = T.if_then_else(slot((st * U + u) * W + ty, bx) <= p[0]
                                                               and slot((st * U + u) * W + ty, bx) < S,
                                                               sc[u] * T.float32(scale), T.float32(NEG))
                                        mx[0] = T.max(mx[0], sc[u])
                                    mx[1] = T.exp(ml[r * 2] - mx[0])
                                    ml[r * 2] = mx[0]
                                    ml[r * 2 + 1] = ml[r * 2 + 1] * mx[1]
                                    for i in T.unroll(DL):
                                        acc[r * DL + i] = acc[r * DL + i] * mx[1]
                                    for u in T.unroll(U):
                                        sc[u] = T.if_then_else(slot((st * U + u) * W + ty, bx) <= p[0]
                                                               and slot((st * U + u) * W + ty, bx) < S,
                                                               T.exp(sc[u] - mx[0]), T.float32(0))
                                        ml[r * 2 + 1] = ml[r * 2 + 1] + sc[u]
                                        for i in T.unroll(DL):
                                            acc[r * DL + i] = acc[r * DL + i] + sc[u] * vv[u * DL + i]
                        # 3. combine the warps' partitions through shared memory
                        for r in T.unroll(hb):
                            if tx == 0:
                                sm[(ty * hb + r) * 2] = ml[r * 2]
                                sm[(ty * hb + r) * 2 + 1] = ml[r * 2 + 1]
                            for i in T.unroll(DL):
                                if i * LANES + tx < D:
                                    sacc[(ty * hb + r) * D + i * LANES + tx] = acc[r * DL + i]
                        T.tvm_storage_sync("shared")
                        for it in T.serial(comb_iters):
                            if it * threads + ty * LANES + tx < hb * D:
                                cmb[0] = T.float32(NEG)
                                for w in T.serial(W):
                                    cmb[0] = T.max(cmb[0], sm[(w * hb + (it * threads + ty * LANES + tx) // D) * 2])
                                cmb[1] = T.float32(0)
                                cmb[2] = T.float32(0)
                                for w in T.serial(W):
                                    cmb[1] = cmb[1] + sm[(w * hb + (it * threads + ty * LANES + tx) // D) * 2 + 1] \
                                        * T.exp(sm[(w * hb + (it * threads + ty * LANES + tx) // D) * 2] - cmb[0])
                                    cmb[2] = cmb[2] + sacc[w * hb * D + it * threads + ty * LANES + tx] \
                                        * T.exp(sm[(w * hb + (it * threads + ty * LANES + tx) // D) * 2] - cmb[0])
                                if P == 1:  # the attention output
                                    out[qb(bx) // (KVH * ns),
                                        (qb(bx) // ns % KVH) * rep + qb(bx) % ns * hb
                                        + (it * threads + ty * LANES + tx) // D, 0,
                                        (it * threads + ty * LANES + tx) % D] = T.Cast(rd, cmb[2] / cmb[1])
                                else:  # this split's state: weighted V sum (out: acc), max, sum
                                    out[qb(bx) // (KVH * ns),
                                        (qb(bx) // ns % KVH) * rep + qb(bx) % ns * hb
                                        + (it * threads + ty * LANES + tx) // D, bx % P,
                                        (it * threads + ty * LANES + tx) % D] = cmb[2]
                                    if (it * threads + ty * LANES + tx) % D == 0:
                                        state[qb(bx) // (KVH * ns),
                                              (qb(bx) // ns % KVH) * rep + qb(bx) % ns * hb
                                              + (it * threads + ty * LANES + tx) // D, bx % P, 0] = cmb[0]
                                        state[qb(bx) // (KVH * ns),
                                              (qb(bx) // ns % KVH) * rep + qb(bx) % ns * hb
                                              + (it * threads + ty * LANES + tx) // D, bx % P, 1] = cmb[1]

        return primfunc_with_params(body, params, attrs).with_attr("global_symbol", name)

    def lslot(t, i):
        """The cache slot of split ``i``'s ``t``-th slot."""
        return t * P + i if P > 1 else t

    @T.macro
    def body(q, k, v, k_cache, v_cache, pos, cs, sn, out, state):
        p = T.alloc_buffer((1,), "int32")
        ml = T.alloc_buffer((W * 2,), "float32")  # per partition: running max, sum
        acc = T.alloc_buffer((W * D,), "float32")
        qv = T.alloc_buffer((D,), "float32")
        s = T.alloc_buffer((3,), "float32")  # score, new max, exp(old - new)
        cmb = T.alloc_buffer((2,), "float32")  # combine: max, sum
        p[0] = T.Cast("int32", pos[0])
        for b in T.serial(B):
            for g in T.serial(KVH):
                for r in T.serial(rep):  # (the new key / value read from the inputs: the write can come last)
                    for d in T.serial(D):
                        qv[d] = qval(q, cs, sn, b, g * rep + r, d)
                    for i in T.serial(P):
                        for w in T.serial(W):
                            ml[w * 2] = T.float32(NEG)
                            ml[w * 2 + 1] = T.float32(0)
                            for d in T.serial(D):
                                acc[w * D + d] = T.float32(0)
                            for jj in T.serial(-(-C // W)):
                                if lslot(jj * W + w, i) <= p[0] and lslot(jj * W + w, i) < S:
                                    s[0] = T.float32(0)
                                    for d in T.serial(D):
                                        s[0] = s[0] + qv[d] * key(k, k_cache, cs, sn, b, g, lslot(jj * W + w, i),
                                                                  p[0], d)
                                    s[0] = s[0] * T.float32(scale)
                                    s[1] = T.max(ml[w * 2], s[0])
                                    s[2] = T.exp(ml[w * 2] - s[1])
                                    s[0] = T.exp(s[0] - s[1])
                                    ml[w * 2] = s[1]
                                    ml[w * 2 + 1] = ml[w * 2 + 1] * s[2] + s[0]
                                    for d in T.serial(D):
                                        acc[w * D + d] = acc[w * D + d] * s[2] + s[0] * value(
                                            v, v_cache, cs, sn, b, g, lslot(jj * W + w, i), p[0], d)
                        cmb[0] = T.float32(NEG)
                        for w in T.serial(W):
                            cmb[0] = T.max(cmb[0], ml[w * 2])
                        cmb[1] = T.float32(0)
                        for w in T.serial(W):
                            cmb[1] = cmb[1] + ml[w * 2 + 1] * T.exp(ml[w * 2] - cmb[0])
                        for d in T.serial(D):
                            s[0] = T.float32(0)
                            for w in T.serial(W):
                                s[0] = s[0] + acc[w * D + d] * T.exp(ml[w * 2] - cmb[0])
                            if P == 1:
                                out[b, g * rep + r, 0, d] = T.Cast(rd, s[0] / cmb[1])
                            else:
                                out[b, g * rep + r, i, d] = s[0]
                        if P > 1:
                            state[b, g * rep + r, i, 0] = cmb[0]
                            state[b, g * rep + r, i, 1] = cmb[1]
                if p[0] >= 0 and p[0] < S:
                    for d in T.serial(D):
                        k_cache[b, g, p[0], d] = knew(k, cs, sn, b, g, d)
                        v_cache[b, g, p[0], d] = vnew(v, cs, sn, b, g, d)

    return primfunc_with_params(body, params, attrs).with_attr("global_symbol", name)


def decode_attention_combine_primfunc(shape: AttentionShape, splits: int, cuda: bool, *,
                                      name: str = "fxc_decode_attention_combine"):
    """The PrimFunc ``(acc, state, out)`` that combines the ``splits`` partial softmax states of
    :func:`decode_attention_primfunc` (``acc``: ``[B, H, P, D]``, ``state``: ``[B, H, P, 2]`` = ``(m, l)``, fp32)
    into ``out`` (``[B, H, 1, D]`` in :attr:`AttentionShape.q_dtype`): with ``M = max_i m_i`` and weights
    ``w_i = exp(m_i - M)`` (0 for an empty split, whose ``l`` and ``acc`` are 0 anyway),
    ``out = sum_i w_i acc_i / sum_i w_i l_i``.  CUDA: a thread per output element (:data:`COMBINE_THREADS` a
    block); LLVM: plain loops."""
    P = _check_splits(splits)
    from tvm.script import tirx as T

    B, H, D = shape.batch, shape.heads, shape.head_dim
    rd = shape.q_dtype
    params = [("acc", (B, H, P, D), "float32"), ("state", (B, H, P, 2), "float32"), ("out", (B, H, 1, D), rd)]
    attrs = {"tir.noalias": True, "op_pattern": 8, "tir.is_scheduled": True, "tirx.is_scheduled": True}
    if cuda:
        E = B * H * D
        threads = COMBINE_THREADS
        loop = T.unroll if P <= 32 else T.serial  # the splits' loads in flight together

        def at(buf, e, i, c):
            """``buf[b, h, i, c]`` for the (batch, head) of output element ``e``."""
            return buf[e // (H * D), e // D % H, i, c]

        @T.macro
        def body(acc, state, out):
            for bx in T.thread_binding(-(-E // threads), thread="blockIdx.x"):
                for tx in T.thread_binding(threads, thread="threadIdx.x"):
                    cmb = T.alloc_buffer((3,), "float32", scope="local")  # max, sum, output
                    if bx * threads + tx < E:
                        cmb[0] = T.float32(NEG)
                        for i in loop(P):
                            cmb[0] = T.max(cmb[0], at(state, bx * threads + tx, i, 0))
                        cmb[1] = T.float32(0)
                        cmb[2] = T.float32(0)
                        for i in loop(P):
                            cmb[1] = cmb[1] + at(state, bx * threads + tx, i, 1) \
                                * T.exp(at(state, bx * threads + tx, i, 0) - cmb[0])
                            cmb[2] = cmb[2] + at(acc, bx * threads + tx, i, (bx * threads + tx) % D) \
                                * T.exp(at(state, bx * threads + tx, i, 0) - cmb[0])
                        out[(bx * threads + tx) // (H * D), (bx * threads + tx) // D % H, 0,
                            (bx * threads + tx) % D] = T.Cast(rd, cmb[2] / cmb[1])

        return primfunc_with_params(body, params, attrs).with_attr("global_symbol", name)

    @T.macro
    def body(acc, state, out):
        cmb = T.alloc_buffer((3,), "float32")  # max, sum, output
        for b in T.serial(B):
            for h in T.serial(H):
                cmb[0] = T.float32(NEG)
                for i in T.serial(P):
                    cmb[0] = T.max(cmb[0], state[b, h, i, 0])
                cmb[1] = T.float32(0)
                for i in T.serial(P):
                    cmb[1] = cmb[1] + state[b, h, i, 1] * T.exp(state[b, h, i, 0] - cmb[0])
                for d in T.serial(D):
                    cmb[2] = T.float32(0)
                    for i in T.serial(P):
                        cmb[2] = cmb[2] + acc[b, h, i, d] * T.exp(state[b, h, i, 0] - cmb[0])
                    out[b, h, 0, d] = T.Cast(rd, cmb[2] / cmb[1])

    return primfunc_with_params(body, params, attrs).with_attr("global_symbol", name)
