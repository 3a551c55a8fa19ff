"""Attention over a static KV cache: the function the KV-cache rewrite puts in place of each attention node.

Plain tensor ops only (scatter, matmul, softmax, where), so the same graph runs in PyTorch, exports to ONNX
with the TorchScript exporter and imports into TVM Relax.
"""
from __future__ import annotations

import torch

from ..runtime.artifact import register_artifact_function

__all__ = ["cached_attention"]


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
