"""Attention over a static KV cache: the function the KV-cache rewrite puts in place of each attention node.

Plain tensor ops only (scatter, matmul, softmax, where), so the same graph runs in PyTorch, exports to ONNX
with the TorchScript exporter and imports into TVM Relax.

For TVM, :func:`with_fused_decode_attention` puts the custom op ``fxc_lm::cached_attention`` (the same function as
one opaque node: ``torch.export`` keeps it whole) in place of the decode step's attentions whose caches the build
donates; the TVM importer lowers that op to one kernel (:mod:`fxcompress.backends.tvm.kernels.decode_attention`).
The torch and ONNX paths never see the op.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..runtime.artifact import register_artifact_function

__all__ = ["cached_attention", "with_fused_decode_attention", "FUSED_ATTENTION_OP"]


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


@torch.library.custom_op("fxc_lm::cached_attention", mutates_args=())
def _cached_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                         v_cache: torch.Tensor, cache_position: torch.Tensor,
                         scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out, kc, vc = cached_attention(q, k, v, k_cache, v_cache, cache_position, scale)
    return out.contiguous().clone(), kc, vc  # (a custom op's outputs may not alias its inputs)


@_cached_attention_op.register_fake
def _(q, k, v, k_cache, v_cache, cache_position, scale):
    return q.new_empty(q.shape), torch.empty_like(k_cache), torch.empty_like(v_cache)


FUSED_ATTENTION_OP = torch.ops.fxc_lm.cached_attention.default  # the op the TVM importer lowers to one kernel


def _one_token(n) -> bool:
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    return isinstance(v, torch.Tensor) and tuple(v.shape) == (1,)


def with_fused_decode_attention(gm: fx.GraphModule, donated) -> tuple[fx.GraphModule, int]:
    """A copy of the cached step ``gm`` in which each :func:`cached_attention` of ONE new token
    (``cache_position`` of shape ``[1]``) whose two caches are graph inputs named in ``donated`` and read by
    nothing else calls :data:`FUSED_ATTENTION_OP` instead (the TVM importer lowers it to one kernel that writes the
    caches in place, so only a build that donates them may see it).  Returns ``(copy, number of nodes changed)``;
    ``gm`` is not modified.  Prefill graphs (more than one token) come back unchanged."""
    donated = frozenset(donated)
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))  # node metadata (shapes) copied with the nodes
    out = fx.GraphModule(gm, graph)  # shares gm's parameters and submodules, not copied
    out.meta.update(gm.meta)
    changed = 0
    for n in out.graph.nodes:
        if not (n.op == "call_function" and n.target is cached_attention and len(n.args) == 7 and not n.kwargs):
            continue
        kc, vc, pos = n.args[3], n.args[4], n.args[5]
        caches_ok = all(isinstance(c, fx.Node) and c.op == "placeholder" and c.target in donated
                        and len(c.users) == 1 for c in (kc, vc))
        if caches_ok and kc is not vc and _one_token(pos) \
                and all(u.op == "call_function" and u.target is operator.getitem for u in n.users):
            n.target = FUSED_ATTENTION_OP
            n.args = (*n.args[:6], float(n.args[6]))
            changed += 1
    out.recompile()
    return out, changed
