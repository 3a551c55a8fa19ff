"""Functional conv2d / linear calls on a module's own weight -> real ``nn.Conv2d`` / ``nn.Linear`` call sites.

``torch.fx.symbolic_trace`` traces through a module whose own ``forward`` calls ``F.conv2d(x, self.weight, ...)``
(EfficientNet-Lite's ``Conv2dStaticSamePadding``: pad, then conv), leaving a ``conv2d`` call on ``get_attr``
weights that the module-based passes (UDFC, DFQ, ``quantize_activations``) do not see.
:func:`lift_functional_layers` rewrites such a call, on the graph it is given (a private copy: capture's),
into a ``call_module`` of a plain ``nn.Conv2d`` / ``nn.Linear`` holding the *same* weight and bias tensors, at
the owner's path (so names, skip globs and state-dict keys stay those of the model):

* a constant zero pad feeding only that conv (``nn.ZeroPad2d`` / ``nn.ConstantPad2d(value=0)`` module, or
  ``F.pad(x, (l, r, t, b))``) is folded into the conv's ``padding`` when it is symmetric (``l == r``, ``t == b``);
* an asymmetric one (TensorFlow "same" padding with stride 2: ``(0, 1, 0, 1)``) is kept as an explicit
  ``F.pad`` node before the conv (ONNX Runtime fuses ``DequantizeLinear -> Pad -> Conv`` into one QLinearConv).

A call is left as it is, with the reason in the returned rows, when the owner cannot be replaced as a whole:
the weight is not the owner's ``weight`` attribute, another op reads the weight or bias, the graph uses other
parts of the owner, the call's stride / padding / groups are graph values, or the owner is called with
different arguments.  The rows: ``action="lifted"`` or ``"skipped"`` (capture keeps them in
``gm.meta["fxcompress_lifted"]``).
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .base import LayerReport
from .graph import _arg, _get_attr, layer_sites

LIFT_KEY = "fxcompress_lifted"
_CONV_FNS = {F.conv2d}
_LINEAR_FNS = {F.linear}
_PAD_FNS = {F.pad}


def zero_pad_amounts(gm: fx.GraphModule, node) -> tuple[int, int, int, int] | None:
    """``(left, right, top, bottom)`` when ``node`` zero-pads the last two dims of its first input by constants
    (an ``nn.ConstantPad2d`` with value 0 / ``nn.ZeroPad2d`` module, or ``F.pad`` in constant mode, value 0);
    None for anything else (negative pads crop, so they are not zero pads)."""
    if not isinstance(node, fx.Node) or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if not isinstance(m, nn.ConstantPad2d) or float(m.value) != 0.0 or len(node.args) != 1 or node.kwargs:
            return None
        pad = tuple(m.padding)
    elif node.op == "call_function" and node.target in _PAD_FNS:
        args = list(node.args[1:]) + [None] * 3
        pad = args[0] if args[0] is not None else node.kwargs.get("pad")
        mode = args[1] if args[1] is not None else node.kwargs.get("mode", "constant")
        value = args[2] if args[2] is not None else node.kwargs.get("value", None)
        if mode != "constant" or value not in (None, 0, 0.0) or not isinstance(pad, (tuple, list)):
            return None
        pad = tuple(pad)
    else:
        return None
    if len(pad) == 2:
        pad = pad + (0, 0)
    if len(pad) != 4 or not all(isinstance(p, int) and not isinstance(p, bool) and p >= 0 for p in pad):
        return None
    return pad


def through_zero_pad(gm: fx.GraphModule, node):
    """The input of ``node`` when it is a constant zero pad (see :func:`zero_pad_amounts`), else ``node``."""
    return node.args[0] if zero_pad_amounts(gm, node) is not None else node


def _has_node(v) -> bool:
    return isinstance(v, fx.Node) or (isinstance(v, (tuple, list)) and any(_has_node(a) for a in v))


def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


class _Call:
    """One functional call to lift: its node, input, conv arguments and the pad it absorbs or keeps."""

    def __init__(self, node: fx.Node, kind: str):
        self.node, self.kind = node, kind
        self.x = _arg(node, 0, "input")
        self.args = {}
        if kind == "conv2d":
            self.args = dict(stride=_pair(_arg(node, 3, "stride", 1)), padding=_arg(node, 4, "padding", 0),
                             dilation=_pair(_arg(node, 5, "dilation", 1)), groups=_arg(node, 6, "groups", 1))
        self.fold_pad: fx.Node | None = None  # a symmetric zero pad folded into the conv's padding
        self.keep_pad: tuple | None = None  # an asymmetric one kept as F.pad (l, r, t, b)


def _plan_pad(gm: fx.GraphModule, call: _Call) -> None:
    pad_node = call.x
    amounts = zero_pad_amounts(gm, pad_node)
    padding = call.args["padding"]
    if not isinstance(padding, str) and not _has_node(padding):
        call.args["padding"] = _pair(padding)
    if amounts is None or len(pad_node.users) != 1 or isinstance(padding, str):
        return
    l, r, t, b = amounts
    if l == r and t == b:
        ph, pw = _pair(padding)
        call.args["padding"] = (ph + t, pw + l)
        call.fold_pad = pad_node
    else:
        call.keep_pad = amounts
        call.args["padding"] = _pair(padding)


def _owner_blocker(gm: fx.GraphModule, owner: str, calls: list[_Call], attrs: set) -> str:
    """Why ``owner`` cannot be replaced by one plain layer ("" when it can); ``attrs``: its weight / bias targets."""
    ok_users = {c.node for c in calls}
    pads = {c.x for c in calls if c.fold_pad is not None or c.keep_pad is not None}
    for n in gm.graph.nodes:
        if n.op not in ("get_attr", "call_module") or not str(n.target).startswith(owner + "."):
            continue
        if n.op == "get_attr" and n.target in attrs:
            other = sorted(u.name for u in set(n.users) - ok_users)
            if other:
                return f"{n.target} is also read by {', '.join(other[:2])}"
        elif n not in pads:
            return f"the graph also uses {n.target} of the owner module"
    if any(c.args != calls[0].args for c in calls[1:]):
        return f"{owner} is called {len(calls)} times with different arguments"
    return ""


def _new_layer(owner_mod: nn.Module, kind: str, w: torch.Tensor, b: torch.Tensor | None, args: dict) -> nn.Module:
    if kind == "conv2d":
        groups = args["groups"]
        padding = args["padding"]
        mod = nn.Conv2d(w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), stride=args["stride"],
                        padding=padding, dilation=args["dilation"], groups=groups, bias=b is not None,
                        device="meta")
    else:
        mod = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta")
    mod.weight = w if isinstance(w, nn.Parameter) else nn.Parameter(w, requires_grad=w.requires_grad)
    if b is not None:
        mod.bias = b if isinstance(b, nn.Parameter) else nn.Parameter(b, requires_grad=b.requires_grad)
    return mod.train(owner_mod.training)


def _fn_site(gm: fx.GraphModule, node: fx.Node) -> tuple[str, fx.Node, fx.Node | None] | None:
    """(kind, weight get_attr, bias get_attr) of a functional conv2d / linear call, else None."""
    if node.op != "call_function" or node.target not in _CONV_FNS | _LINEAR_FNS:
        return None
    w, b = _arg(node, 1, "weight"), _arg(node, 2, "bias")
    if not (isinstance(w, fx.Node) and w.op == "get_attr"):
        return None
    kind = "conv2d" if node.target in _CONV_FNS else "linear"
    return kind, w, b


def _owner_class(node: fx.Node, owner: str) -> str:
    """The class name of the traced-through module at ``owner`` (from the node's ``nn_module_stack``)."""
    for path, cls in (node.meta.get("nn_module_stack") or {}).values():
        if path == owner:
            return cls.__name__ if isinstance(cls, type) else str(cls).rsplit(".", 1)[-1].strip("'>")
    return ""


class _Plan:
    """The functional calls on one weight tensor, and why they cannot be lifted ("" when they can)."""

    def __init__(self, kind: str, weight_target: str):
        self.kind, self.weight_target = kind, weight_target
        self.owner = weight_target[: -len(".weight")] if weight_target.endswith(".weight") else ""
        self.calls: list[_Call] = []
        self.bias_targets: set = set()
        self.why = ""


def _plans(gm: fx.GraphModule) -> list[_Plan]:
    """Group the functional conv2d / linear calls by weight and decide which can be lifted (the graph is not
    changed; pads to fold / keep are recorded on the calls)."""
    plans: dict[str, _Plan] = {}
    for node in gm.graph.nodes:
        site = _fn_site(gm, node)
        if site is None:
            continue
        kind, w, b = site
        plan = plans.setdefault(w.target, _Plan(kind, w.target))
        plan.calls.append(_Call(node, kind))
        plan.bias_targets.add(b.target if isinstance(b, fx.Node) and b.op == "get_attr" else
                              None if b is None else "<computed>")
    for plan in plans.values():
        owner, kind, calls = plan.owner, plan.kind, plan.calls
        w = _get_attr(gm, plan.weight_target)
        if len({c.node.target for c in calls}) > 1:
            plan.why = "the weight is read by both conv2d and linear calls"
        elif not owner:
            plan.why = f"its weight {plan.weight_target!r} is not a module's 'weight' attribute"
        elif len(plan.bias_targets) != 1 or not plan.bias_targets <= {None, owner + ".bias"}:
            plan.why = "its bias is not the owner module's 'bias' attribute"
        elif any(_has_node(v) for c in calls for v in c.args.values()):
            plan.why = "stride / padding / dilation / groups are computed in the graph"
        elif w.dim() != (4 if kind == "conv2d" else 2):
            plan.why = f"weight of shape {tuple(w.shape)} is not a {kind} weight"
        if plan.why:
            continue
        if kind == "conv2d":
            for c in calls:
                _plan_pad(gm, c)
            padding, stride = calls[0].args["padding"], calls[0].args["stride"]
            if isinstance(padding, str) and (padding not in ("valid", "same") or padding == "same"
                                             and stride != (1, 1)):
                plan.why = f"padding {padding!r} with stride {stride}"
                continue
        plan.why = _owner_blocker(gm, owner, calls, {plan.weight_target} | (plan.bias_targets - {None}))
    return list(plans.values())


def unlifted_reasons(gm: fx.GraphModule) -> dict[str, str]:
    """weight target -> why its functional conv2d / linear call(s) cannot be lifted (only those that cannot)."""
    return {p.weight_target: p.why for p in _plans(gm) if p.why}


def lift_functional_layers(gm: fx.GraphModule) -> list[LayerReport]:
    """Rewrite the liftable functional conv2d / linear calls of ``gm`` in place (see the module docstring).

    Returns one row per functional call on a get_attr weight: ``"lifted"`` (note: padding folded / pad kept)
    or ``"skipped"`` (note: why).  A graph with no such call is left untouched and gives no rows.
    """
    rows: list[LayerReport] = []
    changed = False
    for plan in _plans(gm):
        kind, calls, owner = plan.kind, plan.calls, plan.owner
        w = _get_attr(gm, plan.weight_target)
        fn = getattr(calls[0].node.target, "__name__", str(calls[0].node.target))
        if plan.why:
            rows += [LayerReport(owner or plan.weight_target, kind, "skipped", None, tuple(w.shape), tuple(w.shape),
                                 f"{fn} call left as it is: {plan.why}"[:120]) for _ in calls]
            continue
        b = _get_attr(gm, owner + ".bias") if owner + ".bias" in plan.bias_targets else None
        owner_mod = gm.get_submodule(owner)
        cls = _owner_class(calls[0].node, owner) or type(owner_mod).__name__
        layer = _new_layer(owner_mod, kind, w, b, calls[0].args)
        # the owner (and any pad module inside it) is replaced as a whole by the plain layer
        for c in calls:
            x = c.x
            if c.fold_pad is not None:
                x = c.fold_pad.args[0]
            elif c.keep_pad is not None and c.x.op == "call_module":
                with gm.graph.inserting_before(c.x):
                    x = gm.graph.call_function(F.pad, (c.x.args[0], c.keep_pad, "constant", 0.0))
                x.meta = dict(c.x.meta)
                c.x.replace_all_uses_with(x)
                gm.graph.erase_node(c.x)
            with gm.graph.inserting_before(c.node):
                new = gm.graph.call_module(owner, (x,))
            new.meta = dict(c.node.meta)
            c.node.replace_all_uses_with(new)
            gm.graph.erase_node(c.node)
            if c.fold_pad is not None and not c.fold_pad.users:
                gm.graph.erase_node(c.fold_pad)
        for n in list(gm.graph.nodes):
            if n.op == "get_attr" and n.target in (plan.weight_target, owner + ".bias") and not n.users:
                gm.graph.erase_node(n)
        gm.add_submodule(owner, layer)
        changed = True
        if kind == "conv2d":
            pads = sorted({c.keep_pad for c in calls if c.keep_pad is not None})
            note = (f"{fn} in {cls}.forward -> nn.Conv2d(padding={layer.padding})"
                    + ("; symmetric zero pad folded in" if any(c.fold_pad is not None for c in calls) else "")
                    + (f"; asymmetric zero pad {pads[0]} kept as F.pad" if pads else ""))
        else:
            note = f"{fn} in {cls}.forward -> nn.Linear"
        rows += [LayerReport(owner, kind, "lifted", None, tuple(w.shape), tuple(w.shape), note[:120]) for _ in calls]
    if changed:
        gm.graph.lint()
        gm.recompile()
    return rows


def function_layer_skips(gm: fx.GraphModule, pass_name: str) -> list:
    """Report rows for the layers a module-based pass does not see: linear / conv2d *calls* on a weight attribute
    that :func:`lift_functional_layers` could not turn into ``nn.Conv2d`` /
    ``nn.Linear`` modules (capture lifts the others), each with the reason."""
    out = []
    sites = [s for s in layer_sites(gm) if s.module is None]
    reasons = unlifted_reasons(gm) if sites else {}
    for s in sites:
        module = "nn.Conv2d" if s.kind == "conv2d" else "nn.Linear"
        call = getattr(s.node.target, "__name__", s.node.target)
        why = reasons.get(s.weight_target, "not a module's own F.conv2d / F.linear call")
        note = f"{pass_name}: left float; a {call} call not lifted to {module}: {why}"
        out.append(LayerReport(s.name, s.kind, "skipped", None, None, None, note[:120]))
    return out


__all__ = ["LIFT_KEY", "function_layer_skips", "lift_functional_layers", "through_zero_pad", "unlifted_reasons",
           "zero_pad_amounts"]
