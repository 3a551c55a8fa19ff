"""``torch.export.ExportedProgram`` in and out of the passes, and back to modules for the backends.

A pass given an ExportedProgram runs on ``ep.module()`` (an ATen-level GraphModule whose linears and
convs are ``aten.linear`` / ``aten.conv2d`` on ``get_attr`` weights, see :mod:`.graph`) and the rewritten
graph is exported again with the program's own example inputs and dynamic dimensions, so the result is
an ExportedProgram at the same level, with integer layers as ``fxcompress::quant_*`` op nodes.
"""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.export import ExportedProgram

from ..nn import QuantConv2d, QuantLinear
from ..nn.ops import L4Q_LINEAR, QUANT_CONV2D, QUANT_LINEAR, spec_of
from ..quant import QuantWeight
from .base import REPORT_KEY
from .graph import _free_path, _get_attr, call_module_instead, cleanup, layer_sites, replace_site
from .lift_layers import lift_functional_layers

_aten = torch.ops.aten


@dataclass
class ProgramInputs:
    """What an ExportedProgram needs to be exported again: its example inputs and dynamic dimensions."""

    args: tuple
    kwargs: dict
    dynamic_shapes: tuple | None
    dynamic_dims: list  # "input 0 dim 0 (s77)" descriptions


def _dynamic_dims(ep: ExportedProgram) -> list[tuple[int, int, str]]:
    user = [s.arg.name for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    phs = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    out = []
    for i, name in enumerate(user):
        val = phs[name].meta.get("val") if name in phs else None
        if isinstance(val, torch.Tensor):
            for d, size in enumerate(val.shape):
                if not isinstance(size, int):
                    out.append((i, d, str(size)))
    return out


def program_inputs(ep: ExportedProgram, pass_name: str) -> ProgramInputs:
    if ep.example_inputs is None:
        raise ValueError(f"{pass_name}: this ExportedProgram carries no example inputs (ep.example_inputs is None), "
                         "which re-exporting the rewritten graph needs; export it again with torch.export.export")
    args, kwargs = ep.example_inputs
    dims = _dynamic_dims(ep)
    shapes = None
    if dims:
        if kwargs:
            i, d, sym = dims[0]
            raise ValueError(f"{pass_name}: input {i} dim {d} ({sym}) is dynamic and the program takes keyword inputs; "
                             "the pass keeps dynamic dimensions only for positional inputs: export with static shapes "
                             "or positional inputs")
        leaves = [a for a in args]
        shapes = [None if not isinstance(a, torch.Tensor) else {} for a in leaves]
        for i, d, _ in dims:
            if i >= len(shapes) or shapes[i] is None:
                raise ValueError(f"{pass_name}: dynamic input {i} dim {d} is not a top-level tensor argument; "
                                 "export with static shapes")
            shapes[i][d] = torch.export.Dim.DYNAMIC
        shapes = tuple(s or None for s in shapes)
    return ProgramInputs(tuple(args), dict(kwargs), shapes, [f"input {i} dim {d} ({s})" for i, d, s in dims])


def graph_of(ep: ExportedProgram, pass_name: str) -> tuple[fx.GraphModule, ProgramInputs]:
    """The GraphModule a pass rewrites for ``ep`` (a private copy) and what re-exporting it needs."""
    inputs = program_inputs(ep, pass_name)
    gm = materialize_l4q_modules(copy.deepcopy(ep.module()))
    gm.meta[REPORT_KEY] = list(ep.graph_module.meta.get(REPORT_KEY, []))
    return gm, inputs


def to_program(gm: fx.GraphModule, inputs: ProgramInputs, pass_name: str) -> ExportedProgram:
    """Export the rewritten ``gm`` again (ATen level, ``fxcompress::`` ops for integer layers)."""
    l4q_to_op_nodes(gm)
    was_training = gm.training
    gm.eval()
    try:
        ep = torch.export.export(gm, inputs.args, inputs.kwargs, dynamic_shapes=inputs.dynamic_shapes)
    except Exception as e:  # noqa: BLE001 - any export failure is reported below
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if inputs.dynamic_dims:
            raise ValueError(f"{pass_name}: the rewritten program could not keep the dynamic dimension(s) "
                             f"{', '.join(inputs.dynamic_dims)}: {first}. Export the model with static shapes "
                             "(no dynamic_shapes) and run the pass again") from e
        raise ValueError(f"{pass_name}: torch.export of the rewritten graph failed: {type(e).__name__}: {first}") from e
    finally:
        gm.train(was_training)
    ep.graph_module.meta[REPORT_KEY] = list(gm.meta.get(REPORT_KEY, []))
    return ep


# ----------------------------------------------------------------------------------------------------------
# back to modules: what the ONNX / TVM backends lower


def _set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, attr, new)


def _attr(gm, node):
    if node is None:
        return None
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        raise ValueError(f"fxcompress op input {node} is not a constant of the graph")
    obj = gm
    for p in node.target.split("."):
        obj = getattr(obj, p)
    return obj


def materialize_quant_modules(model):
    """Turn ``fxcompress::quant_linear`` / ``quant_conv2d`` op nodes back into QuantLinear / QuantConv2d modules.

    Accepts an ExportedProgram (uses ``ep.module()``) or a GraphModule; returns a GraphModule the module-based
    lowerings handle (a copy whenever something was rebuilt). Anything else is returned as it is.
    """
    if isinstance(model, ExportedProgram):
        gm = model.module()
    elif isinstance(model, fx.GraphModule):
        if not any(n.op == "call_function" and n.target in (QUANT_LINEAR, QUANT_CONV2D) for n in model.graph.nodes):
            return model
        gm = copy.deepcopy(model)
    else:
        return model
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (QUANT_LINEAR, QUANT_CONV2D):
            continue
        x, packed_n, scale_n, zp_n, bias_n, bits, sym, gran = node.args[:8]
        packed, scale, zp, bias = (_attr(gm, n) for n in (packed_n, scale_n, zp_n, bias_n))
        if node.target is QUANT_LINEAR:
            gsz, out_f, in_f = node.args[8:11]
            qw = QuantWeight(packed, scale, zp, spec_of(bits, sym, gran, gsz), (out_f, in_f))
            mod = QuantLinear(qw, bias)
        else:
            wshape, stride, padding, dilation, groups = node.args[8:13]
            qw = QuantWeight(packed, scale, zp, spec_of(bits, sym, gran, 0), tuple(wshape))
            mod = QuantConv2d(qw, bias, tuple(stride), tuple(padding), tuple(dilation), groups)
        owner = packed_n.target.rpartition(".")[0] or node.name
        path = owner if owner != packed_n.target else node.name
        try:
            existing = gm.get_submodule(path)
        except AttributeError:
            existing = None
        if existing is not None and (list(existing.children()) or
                                     (set(existing._parameters) | set(existing._buffers)) -
                                     {"qweight", "scale", "zero_point", "bias"}):
            path = node.name
        call_module_instead(gm, node, x, path, mod, in_place=False)
    return cleanup(gm)


# ----------------------------------------------------------------------------------------------------------
# function sites -> modules (for passes that reason about call_module chains, e.g. UDFC)


_BN_STATE = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}


def _bn_holder(gm: fx.GraphModule, owner: str, node: fx.Node) -> bool:
    try:
        holder = gm.get_submodule(owner)
    except AttributeError:
        return False
    if list(holder.children()) or not set(holder._parameters) | set(holder._buffers) <= _BN_STATE:
        return False
    return all(not (set(n.users) - {node}) for n in gm.graph.nodes
               if n.op == "get_attr" and n.target.startswith(owner + "."))


def modularize(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite ``aten.conv2d`` / ``aten.linear`` / ``aten.batch_norm`` (eval) on get_attr weights into
    ``call_module`` Conv2d / Linear / BatchNorm2d, and ``aten.relu`` / ``aten.add.Tensor`` into ``F.relu`` /
    ``operator.add``, in place, so that module-level analyses see an export graph as a traced one.  Functional
    conv2d / linear calls on a module's own weight (a traced graph not made by :func:`fxcompress.capture`) are
    lifted first, at the module's path (:func:`~fxcompress.passes.lift_layers.lift_functional_layers`)."""
    lift_functional_layers(gm)
    for s in layer_sites(gm):
        if s.module is not None:
            continue
        w = s.weight.detach()
        if s.kind == "linear":
            mod = nn.Linear(w.shape[1], w.shape[0], bias=s.bias is not None)
        else:
            ca = s.conv_args
            pad = ca["padding"]
            mod = nn.Conv2d(w.shape[1] * ca["groups"], w.shape[0], tuple(w.shape[2:]), stride=ca["stride"],
                            padding=pad if isinstance(pad, str) else tuple(pad) if not isinstance(pad, int) else pad,
                            dilation=ca["dilation"], groups=ca["groups"], bias=s.bias is not None)
        mod.weight = nn.Parameter(w.clone(), requires_grad=False)
        if s.bias is not None:
            mod.bias = nn.Parameter(s.bias.detach().clone(), requires_grad=False)
        replace_site(gm, s, mod)
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is _aten.batch_norm.default and len(node.args) >= 8 and node.args[5] is False:
            x, w, b, rm, rv = node.args[:5]
            if not all(isinstance(a, fx.Node) and a.op == "get_attr" for a in (w, b, rm, rv)):
                continue
            weight = _get_attr(gm, w.target)
            bn = nn.BatchNorm2d(weight.shape[0], eps=node.args[7], momentum=node.args[6])
            bn.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
            bn.bias = nn.Parameter(_get_attr(gm, b.target).detach().clone(), requires_grad=False)
            bn.running_mean.copy_(_get_attr(gm, rm.target))
            bn.running_var.copy_(_get_attr(gm, rv.target))
            bn.eval()
            owner = w.target.rpartition(".")[0]
            in_place = bool(owner) and _bn_holder(gm, owner, node)
            path = owner if in_place else _free_path(gm, owner or node.name)
            call_module_instead(gm, node, x, path, bn, in_place)
        elif node.target is _aten.relu.default:
            node.target = F.relu
        elif node.target is _aten.add.Tensor and not node.kwargs:
            node.target = operator.add
    return cleanup(gm)


# ----------------------------------------------------------------------------------------------------------
# one entry for every pass: GraphModule / ExportedProgram / plain module in, the same kind out


def apply_pass(model, pass_name: str, rewrite, *, example_inputs=None):
    """Run ``rewrite(gm) -> PassResult`` (which may rewrite ``gm`` in place) on a private GraphModule of ``model``.

    ``model``: an ExportedProgram (the result's ``gm`` is an ExportedProgram again), a GraphModule (copied
    first), or a plain ``nn.Module`` (captured with ``example_inputs``). Non-finite weights are refused first.
    """
    from ..capture import capture, check_finite
    from .base import PassResult

    if isinstance(model, ExportedProgram):
        check_finite(model.module(), pass_name)
        gm, inputs = graph_of(model, pass_name)
        res = rewrite(gm)
        return PassResult(to_program(res.gm, inputs, pass_name), res.report, res.modified)
    if isinstance(model, fx.GraphModule):
        check_finite(model, pass_name)
        return rewrite(materialize_l4q_modules(copy.deepcopy(model)))
    if isinstance(model, nn.Module):
        return rewrite(capture(model, example_inputs))  # capture checks the weights and copies
    raise ValueError(f"{pass_name} needs a torch.export.ExportedProgram, a torch.fx.GraphModule or an nn.Module, "
                     f"got {type(model).__name__}")


def l4q_to_op_nodes(gm: fx.GraphModule) -> fx.GraphModule:
    """Replace every ``call_module`` L4QLinear with an ``fxcompress::l4q_linear`` node over its parameters
    (what an ExportedProgram holds; the inverse of :func:`materialize_l4q_modules`)."""
    from ..nn import L4QLinear

    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), L4QLinear):
            continue
        m = gm.get_submodule(node.target)
        with gm.graph.inserting_before(node):
            ref = [None if getattr(m, a) is None else gm.graph.get_attr(f"{node.target}.{a}")
                   for a in ("weight", "lora_A", "lora_B", "scale", "offset", "bias")]
            new = gm.graph.call_function(L4Q_LINEAR, (node.args[0], *ref, m.lora_scale, m.spec.qmin, m.spec.qmax,
                                                      m.group_size or 0, float(m.grad_scale)))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    gm.recompile()
    return gm


def materialize_l4q_modules(gm: fx.GraphModule) -> fx.GraphModule:
    """``fxcompress::l4q_linear`` nodes -> ``call_module`` L4QLinear with the same (trained) tensors, in place."""
    from ..nn import L4QLinear
    from ..quant import QuantSpec

    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not L4Q_LINEAR:
            continue
        x, w, a, b, s, o, bias = node.args[:7]
        lora_scale, qmin, qmax, group_size, grad_scale = node.args[7:12]
        t = {k: _attr(gm, n) for k, n in zip(("w", "a", "b", "s", "o", "bias"), (w, a, b, s, o, bias))}
        bits = int(qmax - qmin + 1).bit_length() - 1
        spec = QuantSpec(bits, qmin < 0, "per_group" if group_size else "per_channel", group_size or None)
        rank = 0 if t["a"] is None else t["a"].shape[0]
        layer = L4QLinear(t["w"], t["bias"], spec, rank, lora_scale * rank if rank else 1.0)
        with torch.no_grad():
            for attr, key in (("lora_A", "a"), ("lora_B", "b"), ("scale", "s"), ("offset", "o")):
                if t[key] is not None:
                    getattr(layer, attr).copy_(t[key])
        layer.grad_scale = grad_scale
        path = w.target[: -len(".weight")] if w.target.endswith(".weight") else node.name
        call_module_instead(gm, node, x, path, layer, in_place=False)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm
