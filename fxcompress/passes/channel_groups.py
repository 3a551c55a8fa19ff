"""Channel-dependency analysis for structured (channel) pruning on a torch.fx graph.

For every ``call_module`` Conv2d / Linear (the *producer*) this finds the chain

    producer -> BatchNorm -> act -> consumer(s)                      (plain chain)
    producer -> BatchNorm -> act -> depthwise conv -> BatchNorm -> act -> consumer(s)   (inverted residual)

where ``act`` is ReLU or ReLU6 (the activations whose Gaussian moments UDFC has in closed form) and
the consumers are Conv2d (groups=1) / Linear layers, reached directly or through channel-preserving
linear ops (dropout, identity, a constant zero pad, global average pooling + flatten / ``view(n, -1)`` before
a Linear).  A zero pad between the activation and a depthwise conv (EfficientNet-Lite's asymmetric "same"
padding of a stride-2 conv, see :mod:`.lift_layers`) is part of the chain.  In the second form
the depthwise conv's channels are pruned together with the producer's (channel c of the depthwise conv
reads only channel c), and the compensation goes into the consumers after it.
Channels are *tied* when the producer's output reaches a residual ``add``, a ``cat``, a grouped conv,
a reshape, or any op whose channel mapping we do not model: such producers are reported with the
reason (and the group of producers they are tied to) and not pruned.  A grouped / depthwise producer
is never pruned on its own but may still be compensated for quantization.  The analysis never
changes the graph.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .lift_layers import zero_pad_amounts

_RELU_FNS = {F.relu, torch.relu, torch.relu_}
_RELU6_FNS = {F.relu6}
_ADD_FNS = {operator.add, operator.iadd, torch.add}
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)
_ELEMENTWISE_ACT_TYPES = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.SiLU, nn.GELU, nn.Hardswish, nn.Sigmoid, nn.Tanh,
                          nn.LeakyReLU, nn.ELU, nn.Mish, nn.Hardsigmoid, nn.PReLU, nn.Softplus)
_ELEMENTWISE_ACT_FNS = {F.silu, F.gelu, F.hardswish, F.sigmoid, torch.sigmoid, torch.tanh, F.leaky_relu, F.elu,
                        F.mish, F.hardsigmoid, F.hardtanh, F.softplus}
SUPPORTED_ACTIVATIONS = ("ReLU", "ReLU6")


def activation_upper(gm: fx.GraphModule, n: fx.Node) -> float | None:
    """The clip ceiling of a ReLU-family node: inf for ReLU, 6 for ReLU6 / Hardtanh(0, 6); None otherwise."""
    if n.op == "call_module":
        m = gm.get_submodule(n.target)
        if type(m) is nn.ReLU:
            return math.inf
        if type(m) in (nn.ReLU6, nn.Hardtanh) and m.min_val == 0.0 and math.isfinite(m.max_val) and m.max_val > 0:
            return float(m.max_val)
        return None
    if n.op == "call_function":
        if n.target in _RELU_FNS:
            return math.inf
        if n.target in _RELU6_FNS:
            return 6.0
        return None
    if n.op == "call_method" and n.target in ("relu", "relu_"):
        return math.inf
    return None


def is_relu(gm: fx.GraphModule, n: fx.Node) -> bool:
    """A ReLU or ReLU6 (clipped ReLU) node: the activations with Gaussian moments in closed form."""
    return activation_upper(gm, n) is not None


def is_activation(gm: fx.GraphModule, n: fx.Node) -> bool:
    """Any elementwise activation (supported or not): channel-preserving for the tie analysis."""
    if is_relu(gm, n):
        return True
    if n.op == "call_module":
        return isinstance(gm.get_submodule(n.target), _ELEMENTWISE_ACT_TYPES)
    if n.op == "call_function":
        return n.target in _ELEMENTWISE_ACT_FNS
    return n.op == "call_method" and n.target in ("sigmoid", "tanh")


def _module(gm: fx.GraphModule, n: fx.Node):
    return gm.get_submodule(n.target) if n.op == "call_module" else None


def is_prunable_layer(m) -> bool:
    return (type(m) is nn.Conv2d and m.groups == 1 and not isinstance(m.padding, str)) or type(m) is nn.Linear


def is_depthwise(m) -> bool:
    return type(m) is nn.Conv2d and m.groups > 1 and m.groups == m.in_channels == m.out_channels \
        and not isinstance(m.padding, str)


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
    relu: fx.Node | None = None  # the ReLU / ReLU6 right after the BN
    act_hi: float = math.inf  # its clip ceiling (inf: ReLU)
    dw: str | None = None  # depthwise conv between the activation and the consumers (inverted residual)
    dw_bn: str | None = None  # ... its BatchNorm
    dw_act: fx.Node | None = None  # ... and activation
    dw_act_hi: float = math.inf
    consumers: list = field(default_factory=list)  # module paths of Conv2d/Linear reading the (last) activation
    other_users: list = field(default_factory=list)  # descriptions of other readers (add, cat, ...)
    prune_blocker: str = ""  # why the output channels cannot be pruned ("" = prunable)
    compensation_blocker: str = ""  # why the damage cannot be compensated ("" = see .compensable)
    tied_with: tuple = ()  # producers whose channels are tied with this one (residual adds)

    @property
    def prunable(self) -> bool:
        return not self.prune_blocker

    @property
    def compensable(self) -> bool:
        """BN + activation present and at least one Conv2d/Linear consumer to fold a compensation into."""
        return self.bn is not None and self.relu is not None and bool(self.consumers) and not self.compensation_blocker

    @property
    def stat_bn(self) -> str | None:
        """The BatchNorm whose statistics model the consumers' input (the depthwise one if present)."""
        return self.dw_bn if self.dw else self.bn

    @property
    def stat_hi(self) -> float:
        return self.dw_act_hi if self.dw else self.act_hi


def _single_user(n: fx.Node):
    users = list(n.users)
    return users[0] if len(users) == 1 else None


_PASSTHROUGH_MODULES = (nn.Dropout, nn.Identity)


def _passthrough(gm, n: fx.Node) -> str | None:
    """'same' for channel-preserving identity-like ops, 'pool' for global avg pooling, 'flatten' for flatten(1)."""
    m = _module(gm, n)
    if m is not None:
        if isinstance(m, _PASSTHROUGH_MODULES):
            return "same"
        if isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size in (1, (1, 1)):
            return "pool"
        if isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1:
            return "flatten"
        return None
    args = list(n.args[1:])
    if zero_pad_amounts(gm, n) is not None:
        return "same"
    if n.op == "call_function":
        if n.target is F.dropout:
            return "same"
        if n.target is F.adaptive_avg_pool2d and (args[:1] in ([1], [(1, 1)], [[1, 1]])
                                                 or n.kwargs.get("output_size") in (1, (1, 1))):
            return "pool"
        if n.target is torch.flatten and args[:1] == [1] and len(args) <= 1 and not n.kwargs:
            return "flatten"
    if n.op == "call_method" and n.target == "flatten" and args[:1] == [1] and len(args) <= 1 and not n.kwargs:
        return "flatten"
    if n.op == "call_method" and n.target in ("view", "reshape") and len(args) == 2 and args[1] == -1 \
            and _is_batch_size(args[0]) and not n.kwargs:
        return "flatten"  # x.view(x.size(0), -1) / x.view(batch, -1)
    return None


def _is_batch_size(a) -> bool:
    """``t.size(0)`` / ``t.shape[0]`` of a graph tensor (the batch dimension of a per-sample network)."""
    if not isinstance(a, fx.Node):
        return False
    if a.op == "call_method" and a.target == "size" and list(a.args[1:]) == [0] and not a.kwargs:
        return True
    if a.op == "call_function" and a.target is operator.getitem and a.args[1:] == (0,):
        src = a.args[0]
        return isinstance(src, fx.Node) and (src.op == "call_function" and src.target is getattr and
                                             src.args[1:] == ("shape",) or src.op == "call_method"
                                             and src.target == "size" and len(src.args) == 1)
    return False


def _collect_consumers(gm, ch: Chain, act_node: fx.Node, producer_is_conv: bool, module_calls) -> None:
    for u in act_node.users:
        node, prev, pooled, flat = u, act_node, False, False
        while True:
            kind = _passthrough(gm, node) if node.args and node.args[0] is prev else None
            if kind is None or len(node.users) != 1:
                break
            pooled |= kind == "pool"
            flat |= kind == "flatten"
            prev, node = node, _single_user(node)
        um = _module(gm, node)
        direct = um is not None and is_prunable_layer(um) and node.args and node.args[0] is prev \
            and module_calls[node.target] == 1 and len(node.args) == 1 and not node.kwargs
        if direct and type(um) is nn.Linear and producer_is_conv and not (pooled and flat):
            ch.other_users.append(describe(gm, node) + " on a 4-D tensor")
        elif direct and type(um) is nn.Conv2d and (pooled or flat):
            ch.other_users.append(describe(gm, node) + " after pooling")
        elif direct:
            ch.consumers.append(node.target)
        else:
            ch.other_users.append(describe(gm, node))


def _bn_after(gm, n: fx.Node, m, module_calls) -> tuple[fx.Node | None, str]:
    bn_node = _single_user(n)
    if bn_node is None or not isinstance(_module(gm, bn_node), _BN_TYPES):
        users = [describe(gm, u) for u in n.users]
        return None, "no BatchNorm right after the layer" + (f" (output goes to {', '.join(users)})" if users else "")
    bn = _module(gm, bn_node)
    if module_calls[bn_node.target] > 1 or not bn.track_running_stats or bn.running_var is None:
        return None, "BatchNorm is shared or has no running statistics"
    if bn.num_features != (m.out_channels if type(m) is nn.Conv2d else m.out_features):
        return None, "BatchNorm size does not match the layer's outputs"
    return bn_node, ""


def _act_after(gm, bn_node: fx.Node) -> tuple[fx.Node | None, float, str]:
    act = _single_user(bn_node)
    if act is not None and is_relu(gm, act):
        return act, activation_upper(gm, act), ""
    if act is not None and is_activation(gm, act):
        return None, math.inf, (f"activation {describe(gm, act)} has no Gaussian moment model "
                                f"(supported: {', '.join(SUPPORTED_ACTIVATIONS)})")
    users = [describe(gm, u) for u in bn_node.users]
    return None, math.inf, f"BatchNorm output is not followed by a ReLU/ReLU6 alone (goes to {', '.join(users)})"


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
        if type(m) is nn.Conv2d and isinstance(m.padding, str):
            ch.prune_blocker = f"string padding {m.padding!r}"
            continue
        bn_node, why = _bn_after(gm, n, m, module_calls)
        if bn_node is None:
            ch.prune_blocker = why
            continue
        ch.bn, ch.bn_node = bn_node.target, bn_node
        act, hi, why = _act_after(gm, bn_node)
        if act is None:
            ch.prune_blocker = why
            continue
        ch.relu, ch.act_hi = act, hi
        grouped = type(m) is nn.Conv2d and m.groups != 1
        dw_node = _single_user(act)
        dw_in = act
        if dw_node is not None and zero_pad_amounts(gm, dw_node) is not None:  # act -> zero pad -> depthwise
            dw_in, dw_node = dw_node, _single_user(dw_node)
        dwm = _module(gm, dw_node) if dw_node is not None else None
        if is_depthwise(dwm) and not grouped and dw_node.args and dw_node.args[0] is dw_in \
                and module_calls[dw_node.target] == 1 and len(dw_node.args) == 1 and not dw_node.kwargs:
            bn2, why = _bn_after(gm, dw_node, dwm, module_calls)
            act2, hi2, why2 = _act_after(gm, bn2) if bn2 is not None else (None, math.inf, why)
            if act2 is None:
                ch.prune_blocker = f"feeds depthwise conv {dw_node.target} whose output cannot be modelled: {why2}"
                continue
            ch.dw, ch.dw_bn, ch.dw_act, ch.dw_act_hi = dw_node.target, bn2.target, act2, hi2
            act = act2
        _collect_consumers(gm, ch, act, type(m) is nn.Conv2d, module_calls)
        if grouped:
            ch.prune_blocker = (f"depthwise conv (groups={m.groups}): pruned with the conv feeding it"
                                if is_depthwise(m) else f"grouped conv (groups={m.groups})")
        elif ch.other_users:
            ch.prune_blocker = "channels tied: the activation also goes to " + ", ".join(ch.other_users)
        elif not ch.consumers:
            ch.prune_blocker = "the activation has no Conv2d/Linear consumer"

    # a depthwise conv handled inside a producer's chain is not a chain of its own
    for ch in list(chains.values()):
        if ch.dw and ch.dw in chains:
            chains[ch.dw].prune_blocker = f"depthwise conv: handled with {ch.producer}"
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
        elif isinstance(m, _BN_TYPES) or is_activation(gm, n) or zero_pad_amounts(gm, n) is not None \
                or (n.op == "call_function" and n.target in _ADD_FNS) \
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
