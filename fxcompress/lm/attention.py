"""Attention over a static KV cache: the function the KV-cache rewrite puts in place of each attention node.

Plain tensor ops only (scatter, matmul, softmax, where), so the same graph runs in PyTorch, exports to ONNX
with the TorchScript exporter and imports into TVM Relax.

For TVM, :func:`with_fused_decode_attention` puts the custom op ``fxc_lm::decode_attention`` (``cached_attention``
as one opaque node, which ``torch.export`` keeps whole, plus the reads of its inputs it absorbs) in place of the
decode step's attentions whose caches the build donates; the TVM importer lowers that op to one kernel
(:mod:`fxcompress.backends.tvm.kernels.decode_attention`).  The torch and ONNX paths never see the op.
"""
from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx

from ..runtime.artifact import register_artifact_function
from .fx_meta import node_shape

__all__ = ["FUSED_ATTENTION_OP", "cached_attention", "decode_attention", "with_fused_decode_attention"]

aten = torch.ops.aten


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     cache_position: torch.Tensor, scale: float):
    """Write ``k`` / ``v`` at ``cache_position`` into the caches, attend ``q`` causally over the whole cache.

    ``q``: ``[B, H, T, D]``; ``k``, ``v``: ``[B, KVH, T, D]`` (before any grouped-query repeat);
    ``k_cache``, ``v_cache``: ``[B, KVH, S, D]``; ``cache_position``: ``[T]`` int64, the absolute positions of
    the ``T`` new tokens.  Query ``t`` sees cache slots ``j <= cache_position[t]`` (slots beyond the current
    position hold stale or padding entries and are masked).  Query head ``h`` reads KV head ``h // (H / KVH)``
    (``repeat_interleave`` order, as Hugging Face's ``repeat_kv`` and SDPA's ``enable_gqa``).
    Returns ``(out [B, H, T, D], k_cache', v_cache')``.
    """
    b, kvh, t, d = k.shape
    h = q.shape[1]
    s = k_cache.shape[2]
    rep = h // kvh
    idx = cache_position.reshape(1, 1, t, 1).expand(b, kvh, t, d)
    k_cache = k_cache.scatter(2, idx, k.to(k_cache.dtype))
    v_cache = v_cache.scatter(2, idx, v.to(v_cache.dtype))
    qg = q.reshape(b, kvh, rep * t, d)  # heads kvh*rep + r of one KV head next to each other
    # (K q^T)^T, not q K^T: the cache is read in its stored layout (a compiler would otherwise copy the whole
    # transposed cache every step) and only the small [S, rep*T] product is transposed
    scores = torch.matmul(k_cache.to(q.dtype), qg.transpose(2, 3)).transpose(2, 3) * scale  # [B, KVH, rep*T, S]
    slots = torch.arange(s, device=q.device)
    visible = (slots.reshape(1, s) <= cache_position.reshape(t, 1)).repeat(rep, 1)  # [rep*T, S]
    # additive mask: 0 where visible, -30000 elsewhere (exp underflows to exactly 0; finite in fp16 too, and no
    # -inf constant, which TVM's importer cannot build)
    bias = (~visible).to(torch.float32) * -30000.0
    p = torch.softmax(scores.float() + bias, dim=-1).to(q.dtype)
    out = torch.matmul(p, v_cache.to(q.dtype))  # [B, KVH, rep*T, D]
    return out.reshape(b, h, t, d), k_cache, v_cache


register_artifact_function(cached_attention, "fxcompress.lm.cached_attention")  # saved torch-backend LMs


def _unflatten(x: torch.Tensor, offset: int, heads: int, d: int) -> torch.Tensor:
    """``x`` itself (``offset < 0``: ``[B, heads, T, D]``) or ``[B, heads, 1, D]`` from the rows ``[B, width]`` at
    ``offset + h * D + d``."""
    if offset < 0:
        return x
    return x[:, offset:offset + heads * d].reshape(x.shape[0], 1, heads, d).transpose(1, 2)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` with ``cos`` / ``sin`` ``[rows, D]`` (rows 1 or B)."""
    d = x.shape[-1]
    c, s = cos.reshape(cos.shape[0], 1, 1, d), sin.reshape(sin.shape[0], 1, 1, d)
    return x * c + torch.cat([-x[..., d // 2:], x[..., :d // 2]], dim=-1) * s


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, cache_position: torch.Tensor, cos: torch.Tensor | None,
                     sin: torch.Tensor | None, scale: float, heads: int, offsets: list[int]):
    """:func:`cached_attention` of one new token, reading its inputs as the fused TVM kernel does:
    ``offsets[i] >= 0``: ``q`` / ``k`` / ``v`` (i = 0, 1, 2) are ``[B, width]`` rows holding the ``[B, heads, 1, D]``
    values at ``offsets[i] + h * D + d`` (``heads`` query heads; the caches give the KV heads and ``D``); ``cos`` /
    ``sin`` (``[rows, D]``, or None): the rotary embedding ``x * cos + rotate_half(x) * sin`` of ``q`` and ``k``."""
    kvh, d = k_cache.shape[1], k_cache.shape[3]
    q = _unflatten(q, offsets[0], heads, d)
    k = _unflatten(k, offsets[1], kvh, d)
    v = _unflatten(v, offsets[2], kvh, d)
    if cos is not None:
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    return cached_attention(q, k, v, k_cache, v_cache, cache_position, scale)


@torch.library.custom_op("fxc_lm::decode_attention", mutates_args=())
def _decode_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                         v_cache: torch.Tensor, cache_position: torch.Tensor, cos: torch.Tensor | None,
                         sin: torch.Tensor | None, scale: float, heads: int,
                         offsets: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out, kc, vc = decode_attention(q, k, v, k_cache, v_cache, cache_position, cos, sin, scale, heads, offsets)
    return out.contiguous().clone(), kc, vc  # (a custom op's outputs may not alias its inputs)


@_decode_attention_op.register_fake
def _(q, k, v, k_cache, v_cache, cache_position, cos, sin, scale, heads, offsets):
    dt = torch.promote_types(q.dtype, cos.dtype) if cos is not None else q.dtype
    return (q.new_empty((q.shape[0], heads, 1, k_cache.shape[3]), dtype=dt), torch.empty_like(k_cache),
            torch.empty_like(v_cache))


FUSED_ATTENTION_OP = torch.ops.fxc_lm.decode_attention.default  # the op the TVM importer lowers to one kernel


def _call(n, *targets) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target in targets


_SPLITS = (torch.split, torch.functional.split, aten.split.Tensor, aten.split_with_sizes.default)
_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, torch.reshape)
_COPIES = (aten.contiguous.default, aten.clone.default)


def _flat_source(x, batch: int, heads: int, d: int):
    """``(rows node, width, offset)`` when ``x`` (``[B, heads, 1, D]``) is ``transpose(view(r, [B, 1, heads, D]), 1,
    2)`` of ``r`` = a last-dim slice (a ``split`` chunk, ``slice`` or ``narrow``) of a ``[B, 1, width]`` tensor, or
    that tensor itself; None otherwise (the kernel then reads ``x`` as it is)."""
    if not (_call(x, aten.transpose.int) and {int(a) % 4 for a in x.args[1:3]} == {1, 2}):
        return None
    vw = x.args[0]
    if not (_call(vw, *_VIEWS) and node_shape(vw) == (batch, 1, heads, d)):
        return None
    r = vw.args[0]
    while _call(r, *_COPIES):
        r = r.args[0]
    off, width, sliced = 0, None, False
    if _call(r, operator.getitem) and _call(r.args[0], *_SPLITS):
        sp, i = r.args[0], int(r.args[1])
        sizes = sp.args[1] if len(sp.args) > 1 else sp.kwargs.get("split_size_or_sections", sp.kwargs.get("split_size"))
        dim = sp.args[2] if len(sp.args) > 2 else sp.kwargs.get("dim", 0)
        if not (isinstance(sizes, (list, tuple)) and all(isinstance(z, int) for z in sizes) and dim in (-1, 2)
                and sizes[i] == heads * d):
            return None
        off, width, r = sum(sizes[:i]), sum(sizes), sp.args[0]
    elif _call(r, aten.slice.Tensor, aten.narrow.default):
        dim = int(r.args[1]) if len(r.args) > 1 else 0
        start = r.args[2] if len(r.args) > 2 else 0
        if dim not in (-1, 2) or not isinstance(start, int) or start < 0 \
                or (r.target == aten.slice.Tensor and len(r.args) > 4 and r.args[4] != 1):
            return None
        off, r, sliced = start, r.args[0], True
    base = node_shape(r)
    if base is not None:
        if len(base) != 3 or base[:2] != (batch, 1) or (width is not None and width != base[2]):
            return None
        width = base[2]
    elif width is None and not sliced:
        width = heads * d  # the viewed tensor itself: its numel is the view's
    if width is None or off + heads * d > width:
        return None
    return r, width, off


def _rope_source(x, batch: int, d: int):
    """``(x0, cos, sin)`` when ``x`` is ``x0 * cos + cat([-x0[..., D/2:], x0[..., :D/2]], -1) * sin`` (the rotary
    embedding of Llama-style models, halves by ``chunk`` or ``slice``) with ``cos`` / ``sin`` of ``D`` values per
    batch row (any shape of ``D`` elements, or ``[B, 1, 1, D]``); None otherwise."""
    if not (_call(x, aten.add.Tensor) and len(x.args) == 2 and not x.kwargs):
        return None
    for a, b in ((x.args[0], x.args[1]), (x.args[1], x.args[0])):
        if not (_call(a, aten.mul.Tensor) and _call(b, aten.mul.Tensor)):
            continue
        for x0, c in ((a.args[0], a.args[1]), (a.args[1], a.args[0])):
            for cat, s in ((b.args[0], b.args[1]), (b.args[1], b.args[0])):
                if _call(cat, aten.cat.default) and _is_rotate_half(cat, x0, d) and _per_batch(c, batch, d) \
                        and _per_batch(s, batch, d):
                    return x0, c, s
    return None


def _half_of(n, x0, d: int):
    """0 / 1 when ``n`` is the first / second half of ``x0``'s last dim (a ``chunk(2, -1)`` item or a slice)."""
    if _call(n, operator.getitem) and _call(n.args[0], aten.chunk.default) and n.args[0].args[0] is x0:
        ch = n.args[0]
        chunks = ch.args[1] if len(ch.args) > 1 else ch.kwargs.get("chunks")
        dim = ch.args[2] if len(ch.args) > 2 else ch.kwargs.get("dim", 0)
        if chunks == 2 and dim in (-1, 3):
            return int(n.args[1])
    if _call(n, aten.slice.Tensor) and n.args[0] is x0 and len(n.args) >= 4 and n.args[1] in (-1, 3) \
            and (len(n.args) < 5 or n.args[4] == 1):
        if n.args[2] == 0 and n.args[3] == d // 2:
            return 0
        if n.args[2] == d // 2 and isinstance(n.args[3], int) and n.args[3] >= d:
            return 1
    return None


def _is_rotate_half(cat, x0, d: int) -> bool:
    parts = cat.args[0]
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    if d % 2 or dim not in (-1, 3) or not isinstance(parts, (list, tuple)) or len(parts) != 2:
        return False
    neg, first = parts
    return _call(neg, aten.neg.default) and _half_of(neg.args[0], x0, d) == 1 and _half_of(first, x0, d) == 0


def _per_batch(c, batch: int, d: int) -> bool:
    shape = node_shape(c)
    return shape is not None and shape[-1:] == (d,) and (math.prod(shape) == d or shape == (batch, 1, 1, d))


def _absorb_reads(graph: fx.Graph, n: fx.Node, heads: int):
    """The arguments of ``FUSED_ATTENTION_OP`` for the ``cached_attention`` node ``n``: the rotary embedding of q
    and k and the views / slices of q, k, v absorbed where they match (new reshape nodes inserted before ``n``)."""
    q, k, v = n.args[:3]
    kc = node_shape(n.args[3])
    batch, kvh, d = kc[0], kc[1], kc[3]
    cos = sin = None
    rq, rk = _rope_source(q, batch, d), _rope_source(k, batch, d)
    if rq is not None and rk is not None and rq[1] is rk[1] and rq[2] is rk[2]:
        (q, cos, sin), k = rq, rk[0]
    offsets = []
    srcs = []
    for x, nh in ((q, heads), (k, kvh), (v, kvh)):
        flat = _flat_source(x, batch, nh, d)
        if flat is None:
            srcs.append(x)
            offsets.append(-1)
            continue
        r, width, off = flat
        with graph.inserting_before(n):
            srcs.append(graph.call_function(aten.reshape.default, (r, [batch, width])))
        offsets.append(off)
    if cos is not None:
        rows = node_shape(cos)[0] if len(node_shape(cos)) == 4 and math.prod(node_shape(cos)) != d else 1
        with graph.inserting_before(n):
            cos = graph.call_function(aten.reshape.default, (cos, [rows, d]))
            sin = graph.call_function(aten.reshape.default, (sin, [rows, d]))
    return (*srcs, *n.args[3:6], cos, sin, float(n.args[6]), heads, offsets)


def with_fused_decode_attention(gm: fx.GraphModule, donated) -> tuple[fx.GraphModule, int]:
    """A copy of the cached step ``gm`` in which each :func:`cached_attention` of ONE new token
    (``cache_position`` of shape ``[1]``) whose two caches are graph inputs named in ``donated`` and read by
    nothing else calls :data:`FUSED_ATTENTION_OP` instead (the TVM importer lowers it to one kernel that writes the
    caches in place, so only a build that donates them may see it).  The op also absorbs what it can of the ops that
    produce ``q`` / ``k`` / ``v``: a rotary embedding of q and k with the same cos / sin, and a
    ``transpose(view(slice of a [B, 1, width] tensor))`` (the heads of a fused q/k/v linear's output), so that
    those are not separate kernels.  Returns ``(copy, number of attentions changed)``; ``gm`` is not modified (and is
    returned itself when nothing changes, e.g. a prefill graph: more than one token per step)."""
    donated = frozenset(donated)
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))  # node metadata (shapes) copied with the nodes
    out = fx.GraphModule(gm, graph)  # shares gm's parameters and submodules, not copied
    out.meta.update(gm.meta)
    changed = 0
    for n in list(graph.nodes):
        if not (n.op == "call_function" and n.target is cached_attention and len(n.args) == 7 and not n.kwargs):
            continue
        q, kc, vc, pos = n.args[0], n.args[3], n.args[4], n.args[5]
        caches_ok = all(isinstance(c, fx.Node) and c.op == "placeholder" and c.target in donated
                        and len(c.users) == 1 and len(node_shape(c) or ()) == 4 for c in (kc, vc))
        if not (caches_ok and kc is not vc and node_shape(pos) == (1,) and len(node_shape(q) or ()) == 4
                and all(u.op == "call_function" and u.target is operator.getitem for u in n.users)):
            continue
        n.args = _absorb_reads(graph, n, node_shape(q)[1])
        n.target = FUSED_ATTENTION_OP
        changed += 1
    if not changed:
        return gm, 0
    out.graph.eliminate_dead_code()  # the absorbed rotary / transpose nodes
    out.recompile()
    return out, changed
