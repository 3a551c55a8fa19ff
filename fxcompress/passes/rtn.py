"""Round-to-nearest weight quantization: Linear / Conv2d -> QuantLinear / QuantConv2d.

The plain baseline the other methods are measured against (and the quickest way to an
integer-weight graph that the backends can lower).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch.fx as fx
from torch import nn
from tqdm import tqdm

from ..nn import QuantConv2d, QuantLinear
from ..quant import QuantSpec, QuantWeight
from .base import LayerReport, PassResult, Report, record
from .graph import cleanup, linear_sites, match_names, replace_site


@dataclass(frozen=True)
class RTNConfig:
    bits: int = 8
    symmetric: bool = True
    granularity: str = "per_channel"
    group_size: int | None = None
    targets: tuple | None = None
    exclude: tuple = ()
    include_conv: bool = True

    def __post_init__(self):
        self.spec  # validates bits / granularity / group_size
        if self.targets is not None and isinstance(self.targets, str):
            raise ValueError("RTNConfig.targets must be a tuple of globs, not a single string")

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.symmetric, self.granularity, self.group_size)


def quantize_rtn(gm: fx.GraphModule, config: RTNConfig = RTNConfig(), *, progress: bool = False) -> PassResult:
    """Replace target Linear (and Conv2d) layers with integer-weight layers. ``gm`` is not modified."""
    gm = copy.deepcopy(gm)
    spec = config.spec
    report = Report()
    sites = {s.name: s for s in linear_sites(gm)}
    convs = {}
    if config.include_conv:
        for n in gm.graph.nodes:
            if n.op == "call_module" and type(gm.get_submodule(n.target)) is nn.Conv2d:
                convs[n.target] = (n, gm.get_submodule(n.target))
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    node_of = {**{k: s.node for k, s in sites.items()}, **{k: n for k, (n, _) in convs.items()}}
    candidates = sorted(node_of, key=lambda k: position[node_of[k]])  # graph order
    names = match_names(candidates, config.targets, config.exclude)
    for name in tqdm(names, desc="rtn", unit="layer", disable=not progress):
        if name in sites:
            s = sites[name]
            shape = tuple(s.weight.shape)
            if report.skipped_unfit(spec, name, "linear", shape):
                continue
            replace_site(gm, s, QuantLinear(QuantWeight.from_float(s.weight, spec), s.bias))
            report.append(LayerReport(name, "linear", "quantized", spec.bits, shape, shape, spec.granularity))
        else:
            conv = convs[name][1]
            shape = tuple(conv.weight.shape)
            try:
                qc = QuantConv2d.from_conv(conv, spec)
            except ValueError as e:
                report.append(LayerReport(name, "conv2d", "skipped", None, shape, shape, str(e)))
                continue
            gm.add_submodule(name, qc)
            report.append(LayerReport(name, "conv2d", "quantized", spec.bits, shape, shape, spec.granularity))
    cleanup(gm)
    return record(gm, "rtn", report)

