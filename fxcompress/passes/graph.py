"""Graph matching helpers shared by the passes: where the linear / conv layers are, and how to swap them."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

_LINEAR_FNS = {F.linear, torch.ops.aten.linear.default}


@dataclass
class LinearSite:
    """One linear op in a graph: an ``nn.Linear`` call_module, or ``F.linear`` / ``aten.linear`` on get_attr weights."""

    node: fx.Node
    name: str  # module path of the layer (for function sites: the weight's owner)
    weight: torch.Tensor
    bias: torch.Tensor | None
    module: nn.Linear | None  # set for call_module sites


def _get_attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def linear_sites(gm: fx.GraphModule) -> list[LinearSite]:
    """Every linear layer whose weight is a parameter/buffer of ``gm``, in graph order."""
    sites = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            m = gm.get_submodule(node.target)
            if type(m) is nn.Linear:
                sites.append(LinearSite(node, node.target, m.weight, m.bias, m))
        elif node.op == "call_function" and node.target in _LINEAR_FNS:
            args = list(node.args) + [None] * 3
            w_node = args[1] if args[1] is not None else node.kwargs.get("weight")
            b_node = args[2] if args[2] is not None else node.kwargs.get("bias")
            if not (isinstance(w_node, fx.Node) and w_node.op == "get_attr"):
                continue
            if b_node is not None and not (isinstance(b_node, fx.Node) and b_node.op == "get_attr"):
                continue
            name = w_node.target[: -len(".weight")] if w_node.target.endswith(".weight") else w_node.target
            sites.append(LinearSite(node, name, _get_attr(gm, w_node.target),
                                    _get_attr(gm, b_node.target) if b_node is not None else None, None))
    return sites


def match_names(names: list[str], targets, exclude) -> list[str]:
    """Names matching any glob in ``targets`` (None = all) and none in ``exclude``."""
    out = []
    for n in names:
        if targets is not None and not any(fnmatch.fnmatchcase(n, t) for t in targets):
            continue
        if any(fnmatch.fnmatchcase(n, e) or fnmatch.fnmatchcase(n.split(".")[-1], e) for e in exclude):
            continue
        out.append(n)
    return out


def _free_name(gm: fx.GraphModule, name: str) -> str:
    base = name.replace(".", "_")
    cand, i = base, 0
    while hasattr(gm, cand):
        i += 1
        cand = f"{base}_{i}"
    return cand


def _plain_holder(gm: fx.GraphModule, site: LinearSite) -> bool:
    """True if ``site.name`` is a weight/bias-only module that nothing but this site reads."""
    try:
        holder = gm.get_submodule(site.name)
    except AttributeError:
        return False
    names = set(holder._parameters) | set(holder._buffers)
    if list(holder.children()) or not names <= {"weight", "bias"}:
        return False
    args = {a for a in site.node.all_input_nodes if a.op == "get_attr"}
    return not any(n.op == "get_attr" and n.target.startswith(site.name + ".") and n not in args
                   for n in gm.graph.nodes)


def replace_site(gm: fx.GraphModule, site: LinearSite, new_module: nn.Module) -> str:
    """Make ``site`` a ``call_module`` of ``new_module`` taking the same input; returns the module's path.

    A function site (``F.linear`` on get_attr weights, as torch.export leaves them) takes the
    place of its weight's owner module when that owner holds nothing else, so names stay.
    """
    if site.module is not None:
        gm.add_submodule(site.name, new_module)
        return site.name
    in_place = _plain_holder(gm, site)
    path = site.name if in_place else _free_name(gm, site.name)
    if not in_place:
        gm.add_submodule(path, new_module)
    node = site.node
    x = node.args[0] if node.args else node.kwargs["input"]
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(path, (x,))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    if in_place:
        for a in [n for n in gm.graph.nodes if n.op == "get_attr" and n.target.startswith(path + ".")]:
            if not a.users:
                gm.graph.erase_node(a)
        gm.add_submodule(path, new_module)
    return path


def cleanup(gm: fx.GraphModule) -> fx.GraphModule:
    """Drop dead get_attr nodes and unused parameters after a rewrite, then recompile."""
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        owner_path, _, attr = name.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        if name in used or isinstance(owner, fx.GraphModule) and owner is not gm:
            continue
        if any(n.op == "call_module" and (name.startswith(n.target + ".") or n.target == owner_path)
               for n in gm.graph.nodes):
            continue
        if attr in owner._parameters:
            del owner._parameters[attr]
        elif attr in owner._buffers:
            del owner._buffers[attr]
    gm.graph.lint()
    gm.recompile()
    return gm
