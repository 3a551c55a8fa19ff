"""Fuse linears that read the same input into one wider linear (q/k/v; gate/up), float or integer.

A decode step at batch 1 is launch- and latency-bound: each linear is one kernel that reads its own weight.
Linears that read *the same graph node* (q_proj, k_proj, v_proj after the attention norm; gate_proj and up_proj
after the MLP norm) can be one linear whose weight is the row-wise concatenation of theirs, followed by a split
along the last dimension, so every downstream user sees the same tensor as before::

    q = q_proj(h); k = k_proj(h); v = v_proj(h)
  ->
    qkv = qkv_proj(h); q, k, v = torch.split(qkv, [nq, nk, nv], dim=-1)

Float ``nn.Linear`` layers (and ``F.linear`` / ``aten.linear`` on weights of the graph, as torch.export leaves
them) fuse into an ``nn.Linear``; ``QuantLinear`` layers with identical format (bits, symmetry, granularity,
group size) fuse into a ``QuantLinear`` whose codes, scales and zero points are concatenated along the output
dimension, so the dequantized weight is bit-equal to the stacked dequantized weights.  Backends that lower
``QuantLinear`` (ONNX MatMulNBits / QDQ, TVM) see one wider layer.

Never fused (each reported as "skipped" with the reason): linears of different kinds (float with integer),
integer layers of different formats, per-tensor integer layers with different scales, different input widths
or dtypes.  Linears whose inputs are *different nodes* are never grouped, even when those nodes compute equal
values (two calls of one norm module, a copy): only node identity proves the inputs are the same tensor.

When the shared input is the output of an RMSNorm module, the report row says so: a backend can apply the
norm in the fused linear's prologue (one kernel instead of two).  That fusion is the backend's job; this
pass leaves the norm as it is.
"""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass

import torch
from torch import fx, nn

from ..nn import QuantLinear
from ..quant import QuantWeight
from .base import REPORT_KEY, LayerReport, NothingToCompressError, PassResult, Report, record
from .graph import _LINEAR_FNS, _free_name, _get_attr, cleanup, match_names



@dataclass(frozen=True)
class FusionConfig:
    """Knobs of :func:`fuse_linears_pass`.

    ``targets`` / ``exclude``: globs over layer paths (as RTNConfig's); only matching linears are fused.
    ``contiguous_chunks``: make each split chunk contiguous (one copy per chunk).  Off by default: the chunks
    are views of the fused output, which every elementwise op, matmul, ``reshape`` and a ``view`` that only
    splits the last dimension accept; turn it on for a model that ``view``s a chunk across its last dimension
    (``fuse_linears`` does so by itself when the view form fails on the example inputs).
    ``min_group``: the fewest linears that make a group worth fusing (>= 2).
    """

    targets: tuple | None = None
    exclude: tuple = ()
    contiguous_chunks: bool = False
    min_group: int = 2

    def __post_init__(self):
        if self.targets is not None and (isinstance(self.targets, str) or not isinstance(self.targets, tuple)):
            raise ValueError("FusionConfig.targets must be a tuple of globs (or None), "
                             f"got {self.targets!r}")
        if isinstance(self.exclude, str) or not isinstance(self.exclude, tuple):
            raise ValueError(f"FusionConfig.exclude must be a tuple of globs, got {self.exclude!r}")
        if not isinstance(self.contiguous_chunks, bool):
            raise ValueError(f"FusionConfig.contiguous_chunks must be a bool, got {self.contiguous_chunks!r}")
        if isinstance(self.min_group, bool) or not isinstance(self.min_group, int) or self.min_group < 2:
            raise ValueError(f"FusionConfig.min_group must be an int >= 2, got {self.min_group!r}")


@dataclass
class _Site:
    node: fx.Node
    name: str
    x: fx.Node  # the input node
    kind: str  # "float" | "quant"
    module: nn.Module | None  # nn.Linear / QuantLinear for call_module sites
    weight: torch.Tensor | None  # float sites
    bias: torch.Tensor | None

    @property
    def out_features(self) -> int:
        return self.module.out_features if self.kind == "quant" else self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.module.in_features if self.kind == "quant" else self.weight.shape[1]


def _input_of(node: fx.Node):
    if node.args:
        return node.args[0]
    return node.kwargs.get("input")


def _sites(gm: fx.GraphModule) -> list[_Site]:
    """Float and integer linear call sites with a plain single input, in graph order."""
    out = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            m = gm.get_submodule(node.target)
            if type(m) is nn.Linear or type(m) is QuantLinear:
                x = _input_of(node)
                if isinstance(x, fx.Node) and len(node.args) + len(node.kwargs) == 1:
                    kind = "float" if type(m) is nn.Linear else "quant"
                    out.append(_Site(node, node.target, x, kind, m, m.weight if kind == "float" else None,
                                     m.bias))
        elif node.op == "call_function" and node.target in _LINEAR_FNS:
            args = list(node.args) + [None] * 3
            x = args[0] if args[0] is not None else node.kwargs.get("input")
            w = args[1] if args[1] is not None else node.kwargs.get("weight")
            b = args[2] if args[2] is not None else node.kwargs.get("bias")
            if not (isinstance(x, fx.Node) and isinstance(w, fx.Node) and w.op == "get_attr"):
                continue
            if b is not None and not (isinstance(b, fx.Node) and b.op == "get_attr"):
                continue
            name = w.target.removesuffix(".weight")
            out.append(_Site(node, name, x, "float", None, _get_attr(gm, w.target),
                             _get_attr(gm, b.target) if b is not None else None))
    return out


def _key(s: _Site) -> tuple:
    """Sites fuse only when their keys are equal."""
    if s.kind == "float":
        return ("float", s.in_features, s.weight.dtype, s.weight.device)
    qw = s.module.quant_weight
    return ("quant", s.in_features, qw.spec, qw.scale.dtype, qw.packed.device)


def _describe(key: tuple) -> str:
    if key[0] == "float":
        return f"float, in_features={key[1]}, {key[2]}"
    spec = key[2]
    return (f"int{spec.bits} {spec.granularity}{'' if spec.group_size is None else f' g{spec.group_size}'} "
            f"{'symmetric' if spec.symmetric else 'asymmetric'}, in_features={key[1]}")


def fused_name(names: list[str]) -> str:
    """``a.b.q_proj, a.b.k_proj, a.b.v_proj`` -> ``a.b.qkv_proj``; ``gate_proj, up_proj`` -> ``gate_up_proj``."""
    parent = names[0].rpartition(".")[0]
    leaves = [n.rpartition(".")[2] for n in names]
    suffix = ""
    if all("_" in leaf for leaf in leaves):
        tails = {leaf[leaf.index("_"):] for leaf in leaves}
        if len(tails) == 1:
            suffix = tails.pop()
    if suffix:
        heads = [leaf[: -len(suffix)] for leaf in leaves]
        leaf = ("".join(heads) if all(len(h) == 1 for h in heads) else "_".join(heads)) + suffix
    else:
        leaf = "_".join(leaves)
    return f"{parent}.{leaf}" if parent else leaf


def _concat_bias(sites: list[_Site], dtype, device) -> torch.Tensor | None:
    if all(s.bias is None for s in sites):
        return None
    dtype = next(s.bias.dtype for s in sites if s.bias is not None)
    return torch.cat([s.bias.detach() if s.bias is not None else torch.zeros(s.out_features, dtype=dtype, device=device)
                      for s in sites])  # a zero bias adds exactly 0


def concat_quant_weights(qws: list[QuantWeight]) -> QuantWeight:
    """One QuantWeight whose rows are those of ``qws`` stacked (same spec and in_features required).

    Codes are a bit stream in row-major order (:mod:`fxcompress.quant.packing`), so when every part's bit
    length is a whole number of bytes the packed bytes concatenate as they are; otherwise (e.g. 3-bit with an
    odd element count) the codes are unpacked and packed again.  Either way the codes are exact.
    """
    spec = qws[0].spec
    if any(q.spec != spec or q.shape[1:] != qws[0].shape[1:] for q in qws):
        raise ValueError("concat_quant_weights needs weights of one spec and one in_features, got "
                         + ", ".join(repr(q) for q in qws))
    if spec.granularity == "per_tensor" and not all(
            torch.equal(q.scale, qws[0].scale) and torch.equal(q.zero_point, qws[0].zero_point) for q in qws):
        raise ValueError("per_tensor weights with different scales / zero points cannot share one tensor scale")
    rows = sum(q.shape[0] for q in qws)
    shape = (rows,) + tuple(qws[0].shape[1:])
    if spec.granularity == "per_tensor":
        scale, zp = qws[0].scale, qws[0].zero_point
    else:
        scale = torch.cat([q.scale for q in qws])
        zp = torch.cat([q.zero_point for q in qws])
    if all((q.packed.numel() * 8) == (torch.Size(q.shape).numel() * spec.bits) for q in qws):
        return QuantWeight(torch.cat([q.packed for q in qws]), scale.contiguous(), zp.contiguous(), spec, shape)
    return QuantWeight.from_codes(torch.cat([q.codes() for q in qws]), scale, zp, spec)


def _fused_module(sites: list[_Site]) -> nn.Module:
    if sites[0].kind == "float":
        w = torch.cat([s.weight.detach() for s in sites])
        lin = nn.Linear(w.shape[1], w.shape[0], bias=any(s.bias is not None for s in sites), device=w.device,
                        dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
            b = _concat_bias(sites, w.dtype, w.device)
            if b is not None:
                lin.bias.copy_(b)
        lin.requires_grad_(any(s.weight.requires_grad for s in sites))
        return lin
    qws = [s.module.quant_weight for s in sites]
    return QuantLinear(concat_quant_weights(qws), _concat_bias(sites, torch.float32, qws[0].packed.device))


def _norm_note(gm: fx.GraphModule, x: fx.Node) -> str:
    """A note when ``x`` is the output of an RMSNorm (a leaf module, or the last op traced inside one)."""
    name = None
    if x.op == "call_module" and "rmsnorm" in type(gm.get_submodule(x.target)).__name__.lower():
        name = x.target
    else:
        stack = list((x.meta.get("nn_module_stack") or {}).values())
        if stack:
            path, cls = stack[-1][0], stack[-1][1]
            inside = [u for u in x.users if path in [v[0] for v in (u.meta.get("nn_module_stack") or {}).values()]]
            if "rmsnorm" in str(getattr(cls, "__name__", cls)).lower() and not inside:
                name = path
    return f"; input is RMSNorm {name} (a backend can fuse it into the prologue)" if name else ""


def _rewrite(gm: fx.GraphModule, sites: list[_Site], contiguous: bool) -> str:
    """Replace ``sites`` (same input, same key) by one fused call + split; returns the fused module's path."""
    path = fused_name([s.name for s in sites])
    if path in {s.name for s in sites} or _exists(gm, path):
        parent, _, leaf = path.rpartition(".")
        owner = gm.get_submodule(parent) if parent else gm
        leaf = _free_name(owner, leaf)
        path = f"{parent}.{leaf}" if parent else leaf
    gm.add_submodule(path, _fused_module(sites))
    first = sites[0].node
    with gm.graph.inserting_before(first):
        fused = gm.graph.call_module(path, (sites[0].x,))
        parts = gm.graph.call_function(torch.split, (fused, [s.out_features for s in sites]), {"dim": -1})
        chunks = []
        for i, _ in enumerate(sites):
            c = gm.graph.call_function(operator.getitem, (parts, i))
            if contiguous:
                c = gm.graph.call_method("contiguous", (c,))
            chunks.append(c)
    fused.meta = {k: v for k, v in first.meta.items() if k in ("nn_module_stack", "stack_trace")}
    for s, c in zip(sites, chunks):
        s.node.replace_all_uses_with(c)
        gm.graph.erase_node(s.node)
    return path


def _exists(gm: fx.GraphModule, path: str) -> bool:
    try:
        gm.get_submodule(path)
        return True
    except AttributeError:
        return False


def fuse_linears_pass(gm: fx.GraphModule, config: FusionConfig = FusionConfig()) -> PassResult:
    """Fuse the linears of ``gm`` that read the same node (see the module docstring). ``gm`` is not modified.

    Raises NothingToCompressError (a ValueError) when no group can be fused, with the reasons.
    """
    if not isinstance(gm, fx.GraphModule):
        raise ValueError(f"fuse_linears_pass needs a torch.fx.GraphModule (use fxcompress.capture or "
                         f"fuse_linears(model, example_inputs)), got {type(gm).__name__}")
    if not isinstance(config, FusionConfig):
        raise ValueError(f"fuse_linears_pass needs a FusionConfig, got {type(config).__name__}")
    gm = copy.deepcopy(gm)
    report = Report()
    all_sites = _sites(gm)
    chosen = set(match_names([s.name for s in all_sites], config.targets, config.exclude))
    by_input: dict[fx.Node, list[_Site]] = {}
    for s in all_sites:
        if s.name not in chosen:
            continue
        group = by_input.setdefault(s.x, [])
        twin = next((t for t in group if t.name == s.name), None)
        if twin is not None:  # one layer applied twice to one tensor: stacking its weight twice gains nothing
            report.append(LayerReport(s.name, "linear", "skipped", None, None, None,
                                      f"a second call of {s.name} on {s.x.name} ({s.node.name}); left as it is"))
            continue
        group.append(s)
    fused_any = False
    for x, group in by_input.items():
        if len(group) < 2:
            continue
        by_key: dict[tuple, list[_Site]] = {}
        for s in group:
            by_key.setdefault(_key(s), []).append(s)
        main_key = max(by_key, key=lambda k: len(by_key[k]))
        for key, sub in by_key.items():
            if len(sub) < config.min_group:
                if key != main_key:
                    why = (f"reads {x.name} like {[t.name for t in by_key[main_key]]} ({_describe(main_key)}) "
                           f"but is {_describe(key)}: formats differ, not fused")
                else:
                    why = f"only {len(sub)} linear(s) of this format read {x.name} (min_group={config.min_group})"
                for s in sub:
                    report.append(LayerReport(s.name, "linear", "skipped", None, None, None, why))
                continue
            if key[0] == "quant" and key[2].granularity == "per_tensor":
                try:
                    concat_quant_weights([s.module.quant_weight for s in sub])
                except ValueError as e:
                    for s in sub:
                        report.append(LayerReport(s.name, "linear", "skipped", None, None, None, str(e)))
                    continue
            shapes = [(s.out_features, s.in_features) for s in sub]
            path = _rewrite(gm, sub, config.contiguous_chunks)
            fused_any = True
            bits = key[2].bits if key[0] == "quant" else None
            total = (sum(o for o, _ in shapes), shapes[0][1])
            note = f"into {path} ({len(sub)} -> 1 linear, split {[o for o, _ in shapes]})" + _norm_note(gm, x)
            for s, shp in zip(sub, shapes):
                report.append(LayerReport(s.name, "linear", "fused", bits, shp, total, note))
    if not fused_any:
        reasons = "; ".join(f"{r.layer}: {r.note}" for r in report) or (
            f"none of the {len(all_sites)} linear(s) shares its input node with another "
            "(linears whose inputs are different nodes are never fused, even when the values are equal)")
        raise NothingToCompressError(f"fuse_linears: nothing to fuse ({reasons}). Fuse a model whose projections "
                                     "read one tensor (q/k/v, gate/up), or widen FusionConfig.targets.")
    cleanup(gm)
    return record(gm, "fuse_linears", report)


def _leaves(out) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def fuse_linears(model: nn.Module, example_inputs=None, config: FusionConfig = FusionConfig(), *,
                 atol: float = 1e-5, rtol: float = 0.0) -> fx.GraphModule:
    """Capture ``model`` (if needed), fuse its shared-input linears, check parity on ``example_inputs``.

    Returns the fused GraphModule (``model`` is not modified).  If a chunk view fails on the example inputs
    (a model that ``view``s a chunk across its last dimension), the pass is redone with contiguous chunks and
    the report says so.  Raises ValueError when the fused graph does not reproduce the model within ``atol`` +
    ``rtol`` * |ref| (float GEMMs of another width may sum in another order: loosen them for large models on GPUs).
    """
    from ..capture import capture

    gm = model if isinstance(model, fx.GraphModule) else capture(model, example_inputs)
    res = fuse_linears_pass(gm, config)
    if example_inputs is None:
        return res.gm
    args = example_inputs if isinstance(example_inputs, tuple) else (
        tuple(example_inputs) if isinstance(example_inputs, list) else (example_inputs,))
    with torch.no_grad():
        ref = _leaves(gm(*args))
        try:
            out = _leaves(res.gm(*args))
        except RuntimeError as e:
            if config.contiguous_chunks or "view" not in str(e):
                raise
            res = fuse_linears_pass(gm, FusionConfig(config.targets, config.exclude, True, config.min_group))
            for r in res.report:
                r.note += "; contiguous chunks (a chunk view failed: " + str(e).splitlines()[0][:80] + ")"
            res.gm.meta[REPORT_KEY][-1] = ("fuse_linears", [r.as_dict() for r in res.report])
            out = _leaves(res.gm(*args))
    bad = [i for i, (a, b) in enumerate(zip(ref, out))
           if a.shape != b.shape or not torch.allclose(b, a, atol=atol, rtol=rtol)]
    if len(ref) != len(out) or bad:
        worst = max(((a - b).abs().max().item() for a, b in zip(ref, out) if a.shape == b.shape), default=float("nan"))
        raise ValueError(f"fuse_linears: the fused graph differs from the model on the example inputs (outputs {bad}, "
                         f"max |diff| {worst:.3g}; atol={atol}, rtol={rtol})")
    return res.gm


__all__ = ["FusionConfig", "concat_quant_weights", "fuse_linears", "fuse_linears_pass", "fused_name"]
