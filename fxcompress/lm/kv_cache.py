"""The KV-cache rewrite: a traced ``(input_ids) -> logits`` graph -> a cached step
``(input_ids, cache_position, k_cache_0, v_cache_0, ...) -> (logits, k_cache_0', v_cache_0', ...)``.

Each attention node is replaced by :func:`~fxcompress.lm.attention.cached_attention`, which writes the step's
keys / values into a static cache of ``max_seq_len`` slots and attends over it with a position-causal mask.
Two attention patterns are recognised:

* **SDPA**: ``aten.scaled_dot_product_attention`` / ``F.scaled_dot_product_attention`` (``is_causal=True`` or an
  explicit mask, which is dropped: the cache's own mask replaces it);
* **manual**: ``matmul(q, k.transpose(-2, -1)) [* or / constant] [+ mask] -> softmax(-1) [-> cast / dropout(p=0)]
  -> matmul(., v)``, the "eager" attention of Hugging Face models.

Keys and values are cached *before* the grouped-query repeat: ``repeat_interleave(x, r, dim=1)`` and Hugging
Face's ``x[:, :, None].expand(b, kvh, r, t, d).reshape(b, kvh * r, t, d)`` are looked through, so the cache
holds ``[B, kv_heads, max_seq_len, head_dim]``.

Positions: the traced graph computes its positions from the sequence length (``arange(T)`` for Hugging Face
rotary embeddings, ``narrow(table, 0, 0, T)`` / ``table[:T]`` for a precomputed rope table).  Those nodes are
rewritten to read ``cache_position`` instead.  A graph the rewrite cannot handle raises
:class:`KVCacheRewriteError` naming the node; nothing falls back to an uncached graph.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F

from .attention import cached_attention
from .errors import KVCacheRewriteError
from .fx_meta import node_shape, node_tensor

__all__ = ["kv_cache_pass", "CacheSpec"]

aten = torch.ops.aten
_SDPA = {aten.scaled_dot_product_attention.default, F.scaled_dot_product_attention}
_SOFTMAX = {aten.softmax.int, aten._softmax.default, torch.softmax, F.softmax}
_MATMUL = {aten.matmul.default, aten.bmm.default, torch.matmul}
_CASTS = {aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout, aten.clone.default, aten.alias.default,
          aten.contiguous.default, aten.type_as.default}
_DROPOUT = {aten.dropout.default, F.dropout}
_ARANGE = {aten.arange.default, aten.arange.start, aten.arange.start_step}
_TABLE_SLICE = {aten.narrow.default, aten.slice.Tensor}


@dataclass
class CacheSpec:
    """What the rewrite produced: one entry per attention layer, in graph order."""
    batch: int
    seq: int
    max_seq_len: int
    layers: list = field(default_factory=list)  # [{"node", "pattern", "kv_heads", "heads", "head_dim", "dtype"}]
    position_nodes: list = field(default_factory=list)


def _arg(node, i, name, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _strip_repeat(x: fx.Node) -> fx.Node:
    """The tensor before a grouped-query repeat (or ``x`` itself when it is not repeated)."""
    if x.op == "call_function" and x.target in (aten.repeat_interleave.self_int, torch.repeat_interleave):
        if int(_arg(x, 2, "dim", 0)) % 4 == 1:
            return x.args[0]
    if x.op == "call_function" and x.target in (aten.reshape.default, aten.view.default, aten._unsafe_view.default):
        e = x.args[0]
        while isinstance(e, fx.Node) and e.op == "call_function" and e.target in (aten.clone.default,
                                                                                    aten.contiguous.default):
            e = e.args[0]
        if isinstance(e, fx.Node) and e.op == "call_function" and e.target == aten.expand.default:
            u = e.args[0]
            if (isinstance(u, fx.Node) and u.op == "call_function" and u.target == aten.unsqueeze.default
                    and u.args[1] == 2):
                return u.args[0]
            # x[:, :, None] is traced as slice/slice/unsqueeze(2)/slice chains
            while isinstance(u, fx.Node) and u.op == "call_function" and u.target == aten.slice.Tensor \
                    and node_shape(u) == node_shape(u.args[0]):
                u = u.args[0]
            if isinstance(u, fx.Node) and u.op == "call_function" and u.target == aten.unsqueeze.default \
                    and u.args[1] == 2:
                src = u.args[0]
                while isinstance(src, fx.Node) and src.op == "call_function" and src.target == aten.slice.Tensor \
                        and node_shape(src) == node_shape(src.args[0]):
                    src = src.args[0]
                return src
    return x


def _through(n: fx.Node, ops) -> fx.Node:
    while isinstance(n, fx.Node) and n.op == "call_function" and n.target in ops:
        n = n.args[0]
    return n


def _match_manual(sm: fx.Node):
    """``softmax`` node -> (q, k, v, scale, output node) of a softmax(QK^T)V attention, or a reason string."""
    if int(_arg(sm, 1, "dim", -1)) not in (-1, len(node_shape(sm) or (0,)) - 1):
        return f"softmax over dim {_arg(sm, 1, 'dim')} (not the key dimension)"
    scale = 1.0
    n = sm.args[0]
    saw_mask = False
    while True:
        if not (isinstance(n, fx.Node) and n.op == "call_function"):
            return f"softmax input {n} is not computed from a QK^T matmul"
        if n.target in _MATMUL:
            break
        if n.target in _CASTS:
            n = n.args[0]
        elif n.target in (aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar):
            a, b = n.args[0], n.args[1]
            if isinstance(b, (int, float)) and isinstance(a, fx.Node):
                scale = scale * b if n.target in (aten.mul.Tensor, aten.mul.Scalar) else scale / b
                n = a
            elif isinstance(a, (int, float)) and isinstance(b, fx.Node) and n.target in (aten.mul.Tensor,):
                scale, n = scale * a, b
            else:
                return f"{n.name} ({n.target}) scales the scores by a tensor, not a constant"
        elif n.target in (aten.add.Tensor,):
            a, b = n.args[0], n.args[1]
            sa = _through(a, _CASTS) if isinstance(a, fx.Node) else None
            # the score chain is the operand whose shape is the broadcast result; the other is the mask
            if isinstance(a, fx.Node) and node_shape(a) == node_shape(n):
                n = a
            elif isinstance(b, fx.Node) and node_shape(b) == node_shape(n):
                n = b
            else:
                return f"{n.name} adds two tensors that both broadcast ({sa})"
            saw_mask = True
        else:
            return f"{n.name} ({n.target}) between QK^T and softmax is not a cast, constant scale or mask add"
    qk = n
    q, kt = qk.args[0], qk.args[1]
    if not (isinstance(kt, fx.Node) and kt.op == "call_function" and kt.target in (aten.transpose.int,)):
        return f"{qk.name}: the key operand of QK^T is not a transpose(-2, -1)"
    dims = {int(d) % 4 for d in kt.args[1:3]}
    if dims != {2, 3}:
        return f"{qk.name}: the key operand transposes dims {kt.args[1:3]}, not (-2, -1)"
    k = kt.args[0]
    out = sm
    while True:
        users = list(out.users)
        if len(users) != 1:
            return f"the attention probabilities of {sm.name} have {len(users)} users (expected one matmul with V)"
        u = users[0]
        if u.op == "call_function" and u.target in _CASTS:
            out = u
        elif u.op == "call_function" and u.target in _DROPOUT:
            p = _arg(u, 1, "p", 0.5)
            train = _arg(u, 2, "train", _arg(u, 2, "training", True))
            if p and train:
                return f"{u.name}: attention dropout p={p} in training mode"
            out = u
        elif u.op == "call_function" and u.target in _MATMUL and u.args[0] is out:
            return q, k, u.args[1], scale, u, saw_mask
        else:
            return f"{u.name} ({u.target}) follows softmax instead of a matmul with V"


def kv_cache_pass(gm: fx.GraphModule, max_seq_len: int, *, require_causal: bool = True):
    """Rewrite ``gm`` (from :func:`~fxcompress.lm.capture.capture_lm`, modified in place) into a cached step.

    Returns ``(gm, CacheSpec)``.  ``require_causal``: an SDPA with neither ``is_causal`` nor a mask is an error
    (set False for single-token graphs, which Hugging Face traces without a mask)."""
    graph = gm.graph
    phs = [n for n in graph.nodes if n.op == "placeholder"]
    if len(phs) != 1:
        raise KVCacheRewriteError(f"expected one graph input (input_ids), got {[p.name for p in phs]}")
    ids = phs[0]
    bt = node_shape(ids)
    if bt is None or len(bt) != 2:
        raise KVCacheRewriteError("the graph input input_ids carries no [batch, seq] shape (capture with capture_lm)")
    batch, seq = bt
    if seq > max_seq_len:
        raise KVCacheRewriteError(f"the traced sequence length {seq} exceeds max_seq_len {max_seq_len}")
    for n in list(graph.nodes):  # torch.export's input guard: the cached graph has other inputs
        if n.op == "call_module" and n.target == "_guards_fn":
            graph.erase_node(n)
    sites = []  # (q, k, v, scale, node to replace, name, pattern)
    for n in graph.nodes:
        if n.op != "call_function":
            continue
        if n.target in _SDPA:
            q, k, v = n.args[:3]
            mask = _arg(n, 3, "attn_mask")
            dropout = _arg(n, 4, "dropout_p", 0.0)
            causal = _arg(n, 5, "is_causal", False)
            scale = n.kwargs.get("scale", n.args[6] if len(n.args) > 6 else None)
            if dropout:
                raise KVCacheRewriteError(f"attention node {n.name!r}: dropout_p={dropout}; put the model in eval mode")
            if require_causal and not causal and mask is None:
                raise KVCacheRewriteError(f"attention node {n.name!r} is neither causal (is_causal=False) nor masked: "
                                          "a bidirectional attention cannot use a KV cache")
            d = (node_shape(q) or (0,))[-1]
            sites.append((q, k, v, float(scale) if scale is not None else 1.0 / math.sqrt(d), n, "sdpa"))
        elif n.target in _SOFTMAX:
            m = _match_manual(n)
            if isinstance(m, str):
                raise KVCacheRewriteError(f"softmax node {n.name!r} is not a recognised attention: {m}")
            q, k, v, scale, out, saw_mask = m
            if require_causal and not saw_mask:
                raise KVCacheRewriteError(f"attention at softmax node {n.name!r} has no mask: a bidirectional "
                                          "attention cannot use a KV cache")
            sites.append((q, k, v, scale, out, "manual"))
    if not sites:
        raise KVCacheRewriteError("no attention node found in the graph (looked for scaled_dot_product_attention and "
                                  "matmul -> softmax -> matmul): nothing to cache")
    spec = CacheSpec(batch, seq, max_seq_len)
    plan = []
    for q, k, v, scale, node, pattern in sites:
        ks, vs = _strip_repeat(k), _strip_repeat(v)
        qs, kshape, vshape = node_shape(q), node_shape(ks), node_shape(vs)
        if qs is None or kshape is None or vshape is None or len(qs) != 4 or len(kshape) != 4:
            raise KVCacheRewriteError(f"attention node {node.name!r}: q / k are not 4-D [batch, heads, seq, head_dim] "
                                      f"tensors (q {qs}, k {kshape})")
        if kshape != vshape[:3] + (kshape[3],) or kshape[0] != batch or kshape[2] != seq or qs[2] != seq:
            raise KVCacheRewriteError(f"attention node {node.name!r}: expected k / v of shape [{batch}, kv_heads, "
                                      f"{seq}, head_dim], got k {kshape}, v {vshape}, q {qs}")
        if qs[1] % kshape[1] or qs[3] != kshape[3]:
            raise KVCacheRewriteError(f"attention node {node.name!r}: {qs[1]} query heads do not group over "
                                      f"{kshape[1]} key/value heads of the same head_dim")
        plan.append((q, ks, vs, scale, node, pattern, kshape, vshape, node_tensor(ks).dtype))
    with graph.inserting_after(ids):
        cpos = graph.placeholder("cache_position")
    cpos.meta["val"] = torch.zeros(seq, dtype=torch.long)
    caches = []
    last = cpos
    for i, (*_, kshape, vshape, dt) in enumerate(plan):
        with graph.inserting_after(last):
            kc = graph.placeholder(f"k_cache_{i}")
        with graph.inserting_after(kc):
            vc = graph.placeholder(f"v_cache_{i}")
        last = vc
        kc.meta["val"] = torch.empty(kshape[0], kshape[1], max_seq_len, kshape[3], dtype=dt)
        vc.meta["val"] = torch.empty(vshape[0], vshape[1], max_seq_len, vshape[3], dtype=dt)
        caches.append((kc, vc))
    new_outs = []
    for i, ((q, ks, vs, scale, node, pattern, kshape, vshape, dt), (kc, vc)) in enumerate(zip(plan, caches)):
        with graph.inserting_before(node):
            call = graph.call_function(cached_attention, (q, ks, vs, kc, vc, cpos, scale))
            out = graph.call_function(operator.getitem, (call, 0))
            kn = graph.call_function(operator.getitem, (call, 1))
            vn = graph.call_function(operator.getitem, (call, 2))
        ov = node_tensor(node)
        if ov is not None and node_tensor(q) is not None and ov.dtype != node_tensor(q).dtype:
            with graph.inserting_after(out):
                cast = graph.call_function(aten.to.dtype, (out, ov.dtype))
            out = cast
        out.meta["val"] = ov
        node.replace_all_uses_with(out)
        new_outs += [kn, vn]
        spec.layers.append({"node": node.name, "pattern": pattern, "heads": (node_shape(q) or (0, 0))[1],
                            "kv_heads": kshape[1], "head_dim": kshape[3], "dtype": str(dt).replace("torch.", "")})
    output = next(n for n in graph.nodes if n.op == "output")
    output.args = ((output.args[0], *new_outs),)
    _dead_code(graph)
    _rewrite_positions(gm, cpos, seq, spec)
    _dead_code(graph)
    graph.lint()
    gm.recompile()
    return gm, spec


def _dead_code(graph: fx.Graph) -> None:
    """Erase every computation without users (fx's own pass keeps SDPA and dropout: they are tagged random)."""
    for n in reversed(list(graph.nodes)):
        if n.op in ("call_function", "call_method", "call_module") and not n.users:
            graph.erase_node(n)


def _rewrite_positions(gm: fx.GraphModule, cpos: fx.Node, seq: int, spec: CacheSpec) -> None:
    graph = gm.graph
    for n in list(graph.nodes):
        if n.op != "call_function":
            continue
        if n.target in _ARANGE:
            nums = [a for a in n.args if not isinstance(a, fx.Node)]
            vals = [int(a) for a in nums]
            if n.target == aten.arange.default:
                ok = vals == [seq]
            else:
                ok = vals[:2] == [0, seq] and (len(vals) < 3 or vals[2] == 1)
            if not ok:
                continue
            dt = n.kwargs.get("dtype")
            with graph.inserting_before(n):
                rep = cpos if dt in (None, torch.long) else graph.call_function(aten.to.dtype, (cpos, dt))
            n.replace_all_uses_with(rep)
            graph.erase_node(n)
            spec.position_nodes.append(f"{n.name} (arange({seq}))")
        elif n.target in _TABLE_SLICE:
            src = n.args[0]
            if not (isinstance(src, fx.Node) and src.op == "get_attr"):
                continue
            args = list(n.args[1:]) + [None] * 3
            dim, start, end = args[0], args[1], args[2]
            if n.target == aten.narrow.default:
                end = None if start is None or end is None else start + end
            if not (dim == 0 and start == 0 and end == seq):
                continue
            with graph.inserting_before(n):
                rep = graph.call_function(aten.index_select.default, (src, 0, cpos))
            rep.meta = dict(n.meta)
            n.replace_all_uses_with(rep)
            graph.erase_node(n)
            spec.position_nodes.append(f"{n.name} ({src.target}[:{seq}])")
