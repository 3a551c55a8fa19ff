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

Mask: ``cached_attention`` adds ``-30000`` to the scores of slots after ``pos`` (stale or empty entries), whose
``exp`` then underflows to exactly 0 in fp32; the kernel does not read those slots at all (the same result for
any scores within ~29000 of each other, and none of the stale slots' bytes are read).

The softmax is computed online in ``parts`` partitions of the slots (slot ``j`` in partition ``j % parts``): each
keeps a running max ``m``, a sum ``l`` of ``exp(s - m)`` and the weighted sum of V rows, rescaled by
``exp(m_old - m_new)`` when the max grows; the partitions are combined at the end.  On CUDA a thread block per
``(batch, KV head)`` (the ``rep`` query heads of one KV head share every K / V row it loads), a warp per partition
(slots ``j = ty, ty + warps, ...``, ``unroll`` slots per step so their loads are in flight together), the head dim
across the 32 lanes (``d = 32 i + lane``, coalesced) with warp-shuffle dot products, and the partitions combined
through shared memory.  The cache writes are race-free: only the block of a KV head writes its slot ``pos`` and no
block reads a cache's slot ``pos`` (it reads ``k`` / ``v``).  On LLVM the same partitioned online softmax runs in
plain loops (CPU tests check its numerics against torch).
"""
from __future__ import annotations

from dataclasses import dataclass

SHARED_BYTES = 48 * 1024
LANES = 32
MAX_WARPS = 16
NEG = -1.0e30  # the running max before any slot: exp(NEG - m) == 0 for every finite score m

__all__ = ["AttentionShape", "attention_supports", "attention_warps", "decode_attention_primfunc"]


@dataclass(frozen=True)
class AttentionShape:
    """A decode attention's static shapes and dtypes (one new token)."""

    batch: int
    heads: int
    kv_heads: int
    seq: int  # cache slots S
    head_dim: int
    q_dtype: str
    k_dtype: str  # the new key / value (before the cast to the cache dtype)
    v_dtype: str
    kc_dtype: str  # the caches
    vc_dtype: str
    index_dtype: str = "int64"  # cache_position

    def __post_init__(self):
        for name in ("batch", "heads", "kv_heads", "seq", "head_dim"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"AttentionShape.{name} must be an int >= 1, got {v!r}")
        if self.heads % self.kv_heads:
            raise ValueError(f"AttentionShape.heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")

    @property
    def rep(self) -> int:
        return self.heads // self.kv_heads


_FLOATS = ("float16", "bfloat16", "float32")


def attention_warps(shape: AttentionShape) -> int:
    """Warps per block on CUDA (= partitions of the online softmax): up to 16, no more than the slots, and few
    enough that each warp's partial sums (``rep * head_dim`` fp32) fit in 48 KB of shared memory."""
    w = MAX_WARPS
    while w > 1 and (w > shape.seq or w * shape.rep * (shape.head_dim + 2) * 4 > SHARED_BYTES):
        w //= 2
    return w


def attention_supports(shape: AttentionShape) -> str | None:
    """None when :func:`decode_attention_primfunc` handles ``shape``, else the reason it does not."""
    for name in ("q_dtype", "k_dtype", "v_dtype", "kc_dtype", "vc_dtype"):
        if getattr(shape, name) not in _FLOATS:
            return f"{name} is {getattr(shape, name)} (the kernel takes {', '.join(_FLOATS)})"
    if shape.index_dtype not in ("int32", "int64"):
        return f"cache_position is {shape.index_dtype} (int32 / int64 expected)"
    if shape.rep * (shape.head_dim + 2) * 4 > SHARED_BYTES:
        return (f"{shape.rep} query heads per KV head x head_dim {shape.head_dim} exceed {SHARED_BYTES} bytes of "
                "shared memory")
    return None


def decode_attention_primfunc(shape: AttentionShape, scale: float, cuda: bool, *, unroll: int = 4,
                              name: str = "fxc_decode_attention"):
    """The PrimFunc ``(q, k, v, k_cache, v_cache, cache_position, out)`` described in the module docstring.

    ``q``: ``[B, H, 1, D]``; ``k`` / ``v``: ``[B, KVH, 1, D]``; ``k_cache`` / ``v_cache``: ``[B, KVH, S, D]``
    (written in place at ``cache_position[0]``; nothing is written when it is outside ``0 .. S-1``);
    ``cache_position``: ``[1]``; ``out``: ``[B, H, 1, D]`` in ``q``'s dtype.  ``cuda``: thread-bound and marked
    scheduled (dlight leaves it alone); otherwise plain loops for LLVM.  ``unroll``: slots a warp loads per step
    (CUDA)."""
    reason = attention_supports(shape)
    if reason is not None:
        raise ValueError(f"decode attention kernel: {reason}")
    if isinstance(unroll, bool) or not isinstance(unroll, int) or unroll < 1:
        raise ValueError(f"decode attention kernel: unroll must be an int >= 1, got {unroll!r}")
    from tvm.script import tirx as T

    B, H, KVH, S, D, rep = shape.batch, shape.heads, shape.kv_heads, shape.seq, shape.head_dim, shape.rep
    qdt, kdt, vdt, kcdt, vcdt, idt = (shape.q_dtype, shape.k_dtype, shape.v_dtype, shape.kc_dtype, shape.vc_dtype,
                                      shape.index_dtype)
    W = attention_warps(shape)
    scale = float(scale)
    qshape, kvshape, cshape = (B, H, 1, D), (B, KVH, 1, D), (B, KVH, S, D)

    def f32(x):
        return T.Cast("float32", x)

    def key(kin, kc, b, g, j, p, d):
        """K[j, d] as cached_attention reads it (in q's dtype, as fp32); slot p from the new key."""
        return f32(T.Cast(qdt, T.if_then_else(j == p, T.Cast(kcdt, kin[b, g, 0, d]), kc[b, g, j, d])))

    def value(vin, vc, b, g, j, p, d):
        return f32(T.Cast(qdt, T.if_then_else(j == p, T.Cast(vcdt, vin[b, g, 0, d]), vc[b, g, j, d])))

    attrs = {"tir.noalias": True, "op_pattern": 8}
    if cuda:
        attrs.update({"tir.is_scheduled": True, "tirx.is_scheduled": True})
        DL = -(-D // LANES)  # head-dim elements per lane
        U = max(1, min(unroll, -(-S // W)))
        steps = -(-S // (W * U))
        threads = W * LANES
        write_iters = -(-D // threads)
        comb_iters = -(-(rep * D) // threads)

        @T.prim_func(private=True)
        def func(q: T.Buffer(qshape, qdt), k: T.Buffer(kvshape, kdt), v: T.Buffer(kvshape, vdt),
                 k_cache: T.Buffer(cshape, kcdt), v_cache: T.Buffer(cshape, vcdt), pos: T.Buffer((1,), idt),
                 out: T.Buffer(qshape, qdt)):
            T.func_attr(attrs)
            for bx in T.thread_binding(B * KVH, thread="blockIdx.x"):
                for ty in T.thread_binding(W, thread="threadIdx.y"):
                    for tx in T.thread_binding(LANES, thread="threadIdx.x"):
                        p = T.alloc_buffer((1,), "int32", scope="local")
                        qv = T.alloc_buffer((rep * DL,), "float32", scope="local")
                        acc = T.alloc_buffer((rep * DL,), "float32", scope="local")
                        ml = T.alloc_buffer((rep * 2,), "float32", scope="local")  # running (max, sum) per head
                        kv = T.alloc_buffer((U * DL,), "float32", scope="local")
                        vv = T.alloc_buffer((U * DL,), "float32", scope="local")
                        sc = T.alloc_buffer((U,), "float32", scope="local")
                        mx = T.alloc_buffer((2,), "float32", scope="local")  # new max, exp(old - new)
                        cmb = T.alloc_buffer((3,), "float32", scope="local")  # combine: max, sum, output
                        sm = T.alloc_buffer((W * rep * 2,), "float32", scope="shared")
                        sacc = T.alloc_buffer((W * rep * D,), "float32", scope="shared")
                        p[0] = T.Cast("int32", pos[0])
                        # 1. the cache writes (slot p), by this block's threads over the head dim
                        if p[0] >= 0 and p[0] < S:
                            for i in T.serial(write_iters):
                                if i * threads + ty * LANES + tx < D:
                                    k_cache[bx // KVH, bx % KVH, p[0], i * threads + ty * LANES + tx] = T.Cast(
                                        kcdt, k[bx // KVH, bx % KVH, 0, i * threads + ty * LANES + tx])
                                    v_cache[bx // KVH, bx % KVH, p[0], i * threads + ty * LANES + tx] = T.Cast(
                                        vcdt, v[bx // KVH, bx % KVH, 0, i * threads + ty * LANES + tx])
                        # 2. this warp's partition of the slots: online softmax per query head
                        for r in T.unroll(rep):
                            ml[r * 2] = T.float32(NEG)
                            ml[r * 2 + 1] = T.float32(0)
                            for i in T.unroll(DL):
                                acc[r * DL + i] = T.float32(0)
                                qv[r * DL + i] = T.if_then_else(
                                    i * LANES + tx < D,
                                    f32(q[bx // KVH, (bx % KVH) * rep + r, 0, T.min(i * LANES + tx, D - 1)]),
                                    T.float32(0))
                        for st in T.serial(steps):
                            if (st * U) * W + ty <= p[0]:  # warp-uniform: the shuffles below see all 32 lanes
                                for u in T.unroll(U):
                                    for i in T.unroll(DL):
                                        kv[u * DL + i] = T.if_then_else(
                                            (st * U + u) * W + ty <= p[0] and (st * U + u) * W + ty < S
                                            and i * LANES + tx < D,
                                            key(k, k_cache, bx // KVH, bx % KVH, T.min((st * U + u) * W + ty, S - 1),
                                                p[0], T.min(i * LANES + tx, D - 1)),
                                            T.float32(0))
                                        vv[u * DL + i] = T.if_then_else(
                                            (st * U + u) * W + ty <= p[0] and (st * U + u) * W + ty < S
                                            and i * LANES + tx < D,
                                            value(v, v_cache, bx // KVH, bx % KVH,
                                                  T.min((st * U + u) * W + ty, S - 1), p[0],
                                                  T.min(i * LANES + tx, D - 1)),
                                            T.float32(0))
                                for r in T.unroll(rep):
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
                                        sc[u] = T.if_then_else((st * U + u) * W + ty <= p[0]
                                                               and (st * U + u) * W + ty < S,
                                                               sc[u] * T.float32(scale), T.float32(NEG))
                                        mx[0] = T.max(mx[0], sc[u])
                                    mx[1] = T.exp(ml[r * 2] - mx[0])
                                    ml[r * 2] = mx[0]
                                    ml[r * 2 + 1] = ml[r * 2 + 1] * mx[1]
                                    for i in T.unroll(DL):
                                        acc[r * DL + i] = acc[r * DL + i] * mx[1]
                                    for u in T.unroll(U):
                                        sc[u] = T.if_then_else((st * U + u) * W + ty <= p[0]
                                                               and (st * U + u) * W + ty < S,
                                                               T.exp(sc[u] - mx[0]), T.float32(0))
                                        ml[r * 2 + 1] = ml[r * 2 + 1] + sc[u]
                                        for i in T.unroll(DL):
                                            acc[r * DL + i] = acc[r * DL + i] + sc[u] * vv[u * DL + i]
                        # 3. combine the partitions through shared memory
                        for r in T.unroll(rep):
                            if tx == 0:
                                sm[(ty * rep + r) * 2] = ml[r * 2]
                                sm[(ty * rep + r) * 2 + 1] = ml[r * 2 + 1]
                            for i in T.unroll(DL):
                                if i * LANES + tx < D:
                                    sacc[(ty * rep + r) * D + i * LANES + tx] = acc[r * DL + i]
                        T.tvm_storage_sync("shared")
                        for it in T.serial(comb_iters):
                            if it * threads + ty * LANES + tx < rep * D:
                                cmb[0] = T.float32(NEG)
                                for w in T.serial(W):
                                    cmb[0] = T.max(cmb[0], sm[(w * rep + (it * threads + ty * LANES + tx) // D) * 2])
                                cmb[1] = T.float32(0)
                                cmb[2] = T.float32(0)
                                for w in T.serial(W):
                                    cmb[1] = cmb[1] + sm[(w * rep + (it * threads + ty * LANES + tx) // D) * 2 + 1] \
                                        * T.exp(sm[(w * rep + (it * threads + ty * LANES + tx) // D) * 2] - cmb[0])
                                    cmb[2] = cmb[2] + sacc[w * rep * D + it * threads + ty * LANES + tx] \
                                        * T.exp(sm[(w * rep + (it * threads + ty * LANES + tx) // D) * 2] - cmb[0])
                                out[bx // KVH, (bx % KVH) * rep + (it * threads + ty * LANES + tx) // D, 0,
                                    (it * threads + ty * LANES + tx) % D] = T.Cast(qdt, cmb[2] / cmb[1])

        return func.with_attr("global_symbol", name)

    @T.prim_func(private=True)
    def func(q: T.Buffer(qshape, qdt), k: T.Buffer(kvshape, kdt), v: T.Buffer(kvshape, vdt),
             k_cache: T.Buffer(cshape, kcdt), v_cache: T.Buffer(cshape, vcdt), pos: T.Buffer((1,), idt),
             out: T.Buffer(qshape, qdt)):
        T.func_attr(attrs)
        p = T.alloc_buffer((1,), "int32")
        ml = T.alloc_buffer((W * 2,), "float32")  # per partition: running max, sum
        acc = T.alloc_buffer((W * D,), "float32")
        s = T.alloc_buffer((3,), "float32")  # score, new max, exp(old - new)
        cmb = T.alloc_buffer((2,), "float32")  # combine: max, sum
        p[0] = T.Cast("int32", pos[0])
        for b in T.serial(B):
            for g in T.serial(KVH):
                if p[0] >= 0 and p[0] < S:
                    for d in T.serial(D):
                        k_cache[b, g, p[0], d] = T.Cast(kcdt, k[b, g, 0, d])
                        v_cache[b, g, p[0], d] = T.Cast(vcdt, v[b, g, 0, d])
                for r in T.serial(rep):
                    for w in T.serial(W):
                        ml[w * 2] = T.float32(NEG)
                        ml[w * 2 + 1] = T.float32(0)
                        for d in T.serial(D):
                            acc[w * D + d] = T.float32(0)
                        for jj in T.serial(-(-S // W)):
                            if jj * W + w <= p[0] and jj * W + w < S:
                                s[0] = T.float32(0)
                                for d in T.serial(D):
                                    s[0] = s[0] + f32(q[b, g * rep + r, 0, d]) * key(k, k_cache, b, g, jj * W + w,
                                                                                      p[0], d)
                                s[0] = s[0] * T.float32(scale)
                                s[1] = T.max(ml[w * 2], s[0])
                                s[2] = T.exp(ml[w * 2] - s[1])
                                s[0] = T.exp(s[0] - s[1])
                                ml[w * 2] = s[1]
                                ml[w * 2 + 1] = ml[w * 2 + 1] * s[2] + s[0]
                                for d in T.serial(D):
                                    acc[w * D + d] = acc[w * D + d] * s[2] + s[0] * value(v, v_cache, b, g,
                                                                                          jj * W + w, p[0], d)
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
                        out[b, g * rep + r, 0, d] = T.Cast(qdt, s[0] / cmb[1])

    return func.with_attr("global_symbol", name)
