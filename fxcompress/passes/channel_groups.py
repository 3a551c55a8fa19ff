"""Channel-dependency analysis for structured (channel) pruning on a torch.fx graph.

For every ``call_module`` Conv2d / Linear (the *producer*) this finds the chain

    producer -> BatchNorm -> ReLU -> consumer(s)      (consumers: Conv2d groups=1 or Linear)

and whether the producer's output channels may be removed.  Channels are *tied* when
the producer's output reaches a residual ``add``, a ``cat``, a grouped / depthwise conv,
a reshape / flatten, or any op whose channel mapping we do not model: pruning them would
need every tensor in the tie pruned identically, so such producers are reported as tied
(with the group of producers they are tied to) and not pruned.  The analysis never
changes the graph.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

_RELU_FNS = {F.relu, torch.relu, torch.relu_, torch.nn.functional.relu}
_ADD_FNS = {operator.add, operator.iadd, torch.add}
_CAT_FNS = {torch.cat, torch.concat}
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)


def is_relu(gm: fx.GraphModule, n: fx.Node) -> bool:
    if n.op == "call_module":
        return type(gm.get_submodule(n.target)) is nn.ReLU
    if n.op == "call_function":
        return n.target in _RELU_FNS
    if n.op == "call_method":
        return n.target in ("relu", "relu_")
    return False


def _module(gm: fx.GraphModule, n: fx.Node):
    return gm.get_submodule(n.target) if n.op == "call_module" else None


def is_prunable_layer(m) -> bool:
    return (type(m) is nn.Conv2d and m.groups == 1 and not isinstance(m.padding, str)) or type(m) is nn.Linear


def describe(gm: fx.GraphModule, n: fx.Node) -> str:
    if n.op == "call_module":
        return f"{n.target} ({type(gm.get_submodule(n.target)).__name__})"
    if n.op == "call_function":
        return getattr(n.target, "__name__", str(n.target))
    if n.op == "call_method":
        return f".{n.target}()"
    return n.op


@dataclass
class Chain:
    """What follows one Conv2d / Linear producer in the graph."""

    producer: str  # module path
    node: fx.Node
    bn: str | None = None  # module path of the BatchNorm right after the producer
    bn_node: fx.Node | None = None
    relu: fx.Node | None = None  # the ReLU right after the BN
    consumers: list = field(default_factory=list)  # module paths of Conv2d/Linear reading the ReLU output
    other_users: list = field(default_factory=list)  # descriptions of other readers (add, cat, ...)
    prune_blocker: str = ""  # why the output channels cannot be pruned ("" = prunable)
    tied_with: tuple = ()  # producers whose channels are tied with this one (residual adds)

    @property
    def prunable(self) -> bool:
        return not self.prune_blocker

    @property
    def compensable(self) -> bool:
        """BN + ReLU present and at least one Conv2d/Linear consumer to fold a compensation into."""
        return self.bn is not None and self.relu is not None and bool(self.consumers)


def _single_user(n: fx.Node):
    users = list(n.users)
    return users[0] if len(users) == 1 else None


def analyze(gm: fx.GraphModule) -> dict[str, Chain]:
    """Map each call_module Conv2d / Linear path to its :class:`Chain` (graph order)."""
    chains: dict[str, Chain] = {}
    module_calls: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            module_calls[n.target] = module_calls.get(n.target, 0) + 1

    for n in gm.graph.nodes:
        m = _module(gm, n)
        if type(m) not in (nn.Conv2d, nn.Linear):
            continue
        ch = Chain(n.target, n)
        chains[n.target] = ch
        if module_calls[n.target] > 1:
            ch.prune_blocker = "module is called more than once in the graph"
            continue
        if type(m) is nn.Conv2d and m.groups != 1:
            ch.prune_blocker = f"grouped/depthwise conv (groups={m.groups})"
            continue
        if type(m) is nn.Conv2d and isinstance(m.padding, str):
            ch.prune_blocker = f"string padding {m.padding!r}"
            continue
        bn_node = _single_user(n)
        if bn_node is None or not isinstance(_module(gm, bn_node), _BN_TYPES):
            users = [describe(gm, u) for u in n.users]
            ch.prune_blocker = "no BatchNorm right after the layer" + (f" (output goes to {', '.join(users)})"
                                                                       if users else "")
            continue
        bn = _module(gm, bn_node)
        if module_calls[bn_node.target] > 1 or not bn.track_running_stats or bn.running_var is None:
            ch.prune_blocker = "BatchNorm is shared or has no running statistics"
            continue
        if bn.num_features != (m.out_channels if type(m) is nn.Conv2d else m.out_features):
            ch.prune_blocker = "BatchNorm size does not match the layer's outputs"
            continue
        ch.bn, ch.bn_node = bn_node.target, bn_node
        relu_node = _single_user(bn_node)
        if relu_node is None or not is_relu(gm, relu_node):
            users = [describe(gm, u) for u in bn_node.users]
            ch.prune_blocker = f"BatchNorm output is not followed by a ReLU alone (goes to {', '.join(users)})"
            continue
        ch.relu = relu_node
        for u in relu_node.users:
            um = _module(gm, u)
            if um is not None and is_prunable_layer(um) and u.args and u.args[0] is relu_node \
                    and module_calls[u.target] == 1 and len(u.args) == 1 and not u.kwargs:
                if type(um) is nn.Linear and type(m) is nn.Conv2d:
                    ch.other_users.append(describe(gm, u) + " on a 4-D tensor")
                else:
                    ch.consumers.append(u.target)
            else:
                ch.other_users.append(describe(gm, u))
        if ch.other_users:
            ch.prune_blocker = "channels tied: the activation also goes to " + ", ".join(ch.other_users)
        elif not ch.consumers:
            ch.prune_blocker = "the activation has no Conv2d/Linear consumer"

    _tie_residual_groups(gm, chains)
    return chains


def _tie_residual_groups(gm: fx.GraphModule, chains: dict[str, Chain]) -> None:
    """Union producers whose outputs meet in an add (through BN / ReLU / other adds): one channel group."""
    parent: dict[str, str] = {}

    def find(a):
        while parent.setdefault(a, a) != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    def union(a, b):
        parent[find(a)] = find(b)

    # which producers feed each node through channel-preserving ops
    sources: dict[fx.Node, set] = {}
    for n in gm.graph.nodes:
        srcs: set = set()
        m = _module(gm, n)
        if type(m) in (nn.Conv2d, nn.Linear):
            srcs = {n.target}
        elif isinstance(m, _BN_TYPES) or is_relu(gm, n) or (n.op == "call_function" and n.target in _ADD_FNS) \
                or (n.op == "call_method" and n.target in ("add", "add_")):
            for a in n.all_input_nodes:
                srcs |= sources.get(a, set())
            if (n.op == "call_function" and n.target in _ADD_FNS) or n.op == "call_method":
                roots = sorted(srcs)
                for a, b in zip(roots, roots[1:]):
                    union(a, b)
        sources[n] = srcs
    groups: dict[str, list] = {}
    for name in chains:
        groups.setdefault(find(name), []).append(name)
    for members in groups.values():
        if len(members) > 1:
            for name in members:
                chains[name].tied_with = tuple(x for x in members if x != name)


def channel_groups(gm: fx.GraphModule) -> list[tuple[str, ...]]:
    """Channel-dependency groups: producers that must be pruned together (singletons included)."""
    chains = analyze(gm)
    seen, out = set(), []
    for name, ch in chains.items():
        if name in seen:
            continue
        grp = tuple(sorted((name,) + ch.tied_with))
        seen.update(grp)
        out.append(grp)
    return out
