"""Graph matching shared by the passes: where the linear / conv layers are, how to swap them, and how an
``ExportedProgram`` goes in and comes back out.

A *site* is one linear or conv2d op, whatever form capture left it in:

* ``call_module`` of an ``nn.Linear`` / ``nn.Conv2d`` (``symbolic_trace`` graphs), or of a Hugging Face
  ``Conv1D`` (GPT-2: a linear whose weight is stored transposed, ``[in, out]``);
* ``call_function`` ``aten.linear`` / ``aten.conv2d`` / ``F.linear`` / ``F.conv2d`` on ``get_attr`` weights
  (``torch.export`` graphs), or ``aten.addmm(bias, x, W)`` (an exported ``Conv1D``).

``Site.weight`` is always ``[out, in, ...]`` (a transposed view for Conv1D / addmm), so a pass never
needs to know which form it met.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

_aten = torch.ops.aten
_LINEAR_FNS = {F.linear, _aten.linear.default}
_ADDMM_FNS = {torch.addmm, _aten.addmm.default}
_CONV_FNS = {F.conv2d, _aten.conv2d.default}


@dataclass
class Site:
    """One linear or conv2d op of a graph."""

    node: fx.Node
    name: str  # module path of the layer (function sites: from nn_module_stack, else the weight's owner)
    kind: str  # "linear" | "conv2d"
    weight: torch.Tensor  # [out, in, ...]
    bias: torch.Tensor | None
    module: nn.Module | None = None  # set for call_module sites
    transposed: bool = False  # Conv1D / addmm: the stored weight is [in, out]
    conv_args: dict = field(default_factory=dict)  # stride, padding, dilation, groups (conv2d sites)
    weight_target: str = ""  # get_attr target of the weight (function sites)


LinearSite = Site  # the name earlier versions used


def _get_attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _is_conv1d(m: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2 family), recognised without importing transformers."""
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and getattr(m, "weight", None) is not None \
        and m.weight.dim() == 2


def _attr_node(a) -> bool:
    return isinstance(a, fx.Node) and a.op == "get_attr"


def _site_name(node: fx.Node, weight_target: str) -> str:
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        if path:
            return path
    return weight_target[: -len(".weight")] if weight_target.endswith(".weight") else weight_target


def _arg(node: fx.Node, i: int, name: str, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _function_site(gm: fx.GraphModule, node: fx.Node) -> Site | None:
    if node.target in _LINEAR_FNS or node.target in _CONV_FNS:
        w, b = _arg(node, 1, "weight"), _arg(node, 2, "bias")
        transposed = False
    elif node.target in _ADDMM_FNS:
        if _arg(node, 3, "beta", 1) != 1 or _arg(node, 4, "alpha", 1) != 1:
            return None
        b, w = node.args[0], node.args[2]
        transposed = True
    else:
        return None
    if not _attr_node(w) or (b is not None and not _attr_node(b)):
        return None
    weight = _get_attr(gm, w.target)
    bias = _get_attr(gm, b.target) if b is not None else None
    if transposed:
        weight = weight.t()
    kind = "conv2d" if node.target in _CONV_FNS else "linear"
    if kind == "linear" and weight.dim() != 2 or kind == "conv2d" and weight.dim() != 4:
        return None
    conv_args = {}
    if kind == "conv2d":
        conv_args = dict(stride=_arg(node, 3, "stride", 1), padding=_arg(node, 4, "padding", 0),
                         dilation=_arg(node, 5, "dilation", 1), groups=_arg(node, 6, "groups", 1))
    return Site(node, _site_name(node, w.target), kind, weight, bias, None, transposed, conv_args, w.target)


def _sites(gm: fx.GraphModule, kinds: tuple) -> list[Site]:
    sites, seen = [], {}
    for node in gm.graph.nodes:
        s = None
        if node.op == "call_module":
            m = gm.get_submodule(node.target)
            if type(m) is nn.Linear:
                s = Site(node, node.target, "linear", m.weight, m.bias, m)
            elif _is_conv1d(m):
                s = Site(node, node.target, "linear", m.weight.t(), m.bias, m, transposed=True)
            elif type(m) is nn.Conv2d:
                s = Site(node, node.target, "conv2d", m.weight, m.bias, m,
                         conv_args=dict(stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups))
        elif node.op == "call_function":
            s = _function_site(gm, node)
        if s is None or s.kind not in kinds:
            continue
        if s.module is None and s.name in seen:  # one exported layer called twice: two sites, distinct names
            seen[s.name] += 1
            s.name = f"{s.name}#{seen[s.name]}"
        else:
            seen.setdefault(s.name, 0)
        sites.append(s)
    return sites


def linear_sites(gm: fx.GraphModule) -> list[Site]:
    """Every linear layer whose weight is a parameter/buffer of ``gm``, in graph order."""
    return _sites(gm, ("linear",))


def conv_sites(gm: fx.GraphModule) -> list[Site]:
    """Every conv2d whose weight is a parameter/buffer of ``gm``, in graph order."""
    return _sites(gm, ("conv2d",))


def layer_sites(gm: fx.GraphModule) -> list[Site]:
    """Linear and conv2d sites together, in graph order."""
    return _sites(gm, ("linear", "conv2d"))


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


def _path_free(gm: fx.GraphModule, path: str) -> bool:
    try:
        gm.get_submodule(path)
        return False
    except AttributeError:
        pass
    parent, _, attr = path.rpartition(".")
    try:
        owner = gm.get_submodule(parent) if parent else gm
    except AttributeError:
        return True  # add_submodule creates the missing parents
    return not hasattr(owner, attr)


def _free_name(owner: nn.Module, name: str) -> str:
    """``name`` (dots made underscores), or ``name_1``, ``name_2`` ... whichever ``owner`` lacks."""
    base = name.replace(".", "_")
    cand, i = base, 0
    while hasattr(owner, cand):
        i += 1
        cand = f"{base}_{i}"
    return cand


def unsuffixed_path(path: str) -> str:
    """The layer path a rewritten layer came from: :func:`_free_path` names a replacement ``<path>_q<i>`` when
    ``<path>`` is still taken (a tied ``lm_head`` whose module also holds the embedding's weight)."""
    return re.sub(r"_q\d+$", "", path)


def _free_path(gm: fx.GraphModule, name: str) -> str:
    base = name.replace("#", "_")
    if _path_free(gm, base):
        return base
    i = 0
    while not _path_free(gm, f"{base}_q{i}"):
        i += 1
    return f"{base}_q{i}"


def _plain_holder(gm: fx.GraphModule, site: Site) -> bool:
    """True if ``site.name`` owns the weight, holds only weight/bias, and nothing but ``site`` reads them."""
    if site.weight_target != site.name + ".weight":
        return False
    try:
        holder = gm.get_submodule(site.name)
    except AttributeError:
        return False
    names = set(holder._parameters) | set(holder._buffers)
    if list(holder.children()) or not names <= {"weight", "bias"}:
        return False
    for n in gm.graph.nodes:
        if n.op == "get_attr" and n.target.startswith(site.name + "."):
            if set(n.users) - {site.node}:
                return False  # a tied weight (e.g. GPT-2's lm_head shares the embedding): keep it for the others
    return True


def replace_site(gm: fx.GraphModule, site: Site, new_module: nn.Module) -> str:
    """Make ``site`` a ``call_module`` of ``new_module`` taking the same input; returns the module's path.

    A function site takes the place of its weight's owner module when that owner holds nothing else and
    no other node reads its weight (so names stay); otherwise the module goes to a free path named after
    the site, and other readers of a shared weight keep the float tensor.
    """
    if site.module is not None:
        gm.add_submodule(site.name, new_module)
        return site.name
    in_place = _plain_holder(gm, site)
    path = site.name if in_place else _free_path(gm, site.name)
    node = site.node
    x = node.args[1] if node.target in _ADDMM_FNS else (node.args[0] if node.args else node.kwargs["input"])
    call_module_instead(gm, node, x, path, new_module, in_place)
    return path


def call_module_instead(gm: fx.GraphModule, node: fx.Node, x: fx.Node, path: str, module: nn.Module,
                        in_place: bool) -> fx.Node:
    """Replace ``node`` by ``call_module(path, (x,))`` of ``module``.  ``in_place``: ``path`` is the module that
    owned ``node``'s get_attr tensors; those reads are dropped and ``module`` takes its place."""
    if not in_place:
        gm.add_submodule(path, module)
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(path, (x,))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    if in_place:
        for a in [n for n in gm.graph.nodes if n.op == "get_attr" and n.target.startswith(path + ".")]:
            if not a.users:
                gm.graph.erase_node(a)
        gm.add_submodule(path, module)
    return new


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
