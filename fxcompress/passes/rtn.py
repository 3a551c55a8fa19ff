"""Round-to-nearest weight quantization: Linear / Conv2d -> QuantLinear / QuantConv2d.

The plain baseline the other methods are measured against (and the quickest way to an
integer-weight graph that the backends can lower).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx
from torch import nn
from tqdm import tqdm

from ..capture import capture
from ..nn import QuantConv2d, QuantLinear
from ..quant import QuantSpec, QuantWeight
from .base import NOOP_MODES, LayerReport, PassResult, Report, check_modified, group_size_hint, record
from .graph import cleanup, layer_sites, match_names, replace_site
from .program import apply_pass


@dataclass(frozen=True)
class RTNConfig:
    bits: int = 8
    symmetric: bool = True
    granularity: str = "per_channel"
    group_size: int | None = None
    targets: tuple | None = None
    exclude: tuple = ()
    include_conv: bool = True
    on_noop: str = "raise"  # when no layer is rewritten: "raise" NothingToCompressError, or "warn"

    def __post_init__(self):
        self.spec  # validates bits / granularity / group_size
        if self.targets is not None and isinstance(self.targets, str):
            raise ValueError("RTNConfig.targets must be a tuple of globs, not a single string")
        if self.on_noop not in NOOP_MODES:
            raise ValueError(f"RTNConfig.on_noop must be one of {NOOP_MODES}, got {self.on_noop!r}")

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.symmetric, self.granularity, self.group_size)


def _rewrite(gm: fx.GraphModule, config: RTNConfig, progress: bool) -> PassResult:
    spec = config.spec
    report = Report()
    sites = {s.name: s for s in layer_sites(gm) if s.kind == "linear" or config.include_conv}
    names = match_names(list(sites), config.targets, config.exclude)
    for name in tqdm(names, desc="rtn", unit="layer", disable=not progress):
        s = sites[name]
        shape = tuple(s.weight.shape)
        if s.kind == "linear":
            if report.skipped_unfit(spec, name, "linear", shape):
                continue
            replace_site(gm, s, QuantLinear(QuantWeight.from_float(s.weight, spec), s.bias))
        else:
            ca = s.conv_args
            try:
                if isinstance(ca["padding"], str):
                    raise ValueError(f"string padding {ca['padding']!r} is not supported by QuantConv2d")
                qc = QuantConv2d(QuantWeight.from_float(s.weight, spec), s.bias, ca["stride"], ca["padding"],
                                 ca["dilation"], ca["groups"])
            except ValueError as e:
                report.append(LayerReport(name, "conv2d", "skipped", None, shape, shape, str(e)))
                continue
            replace_site(gm, s, qc)
        report.append(LayerReport(name, s.kind, "quantized", spec.bits, shape, shape, spec.granularity))
    if not sites:
        report.append(LayerReport("(graph)", "-", "skipped", note="no Linear / Conv2d layer with a weight tensor"))
    elif not names:
        report.append(LayerReport("(graph)", "-", "skipped",
                                  note=f"targets={config.targets} exclude={config.exclude} match no layer of "
                                       f"{', '.join(list(sites)[:8])}"))
    cleanup(gm)
    return record(gm, "rtn", report)


def rtn_pass(gm, config: RTNConfig = RTNConfig(), *, progress: bool = False) -> PassResult:
    """Replace target Linear (and Conv2d) layers with integer-weight layers; ``gm`` is not modified.

    ``gm``: a GraphModule or a ``torch.export.ExportedProgram`` (then ``PassResult.gm`` is one too).
    Raises :class:`NothingToCompressError` when no layer is rewritten (``config.on_noop="warn"`` warns).
    """
    if not isinstance(config, RTNConfig):
        raise ValueError(f"rtn_pass needs an RTNConfig, got {type(config).__name__}")
    res = apply_pass(gm, "rtn", lambda g: _rewrite(g, config, progress))
    return check_modified(res, config.on_noop, group_size_hint(res.report, "granularity='per_channel'"))


def quantize_rtn(model, config: RTNConfig = RTNConfig(), example_inputs=None, *, progress: bool = False):
    """Round-to-nearest integer weights; returns the model (GraphModule, or ExportedProgram for one).

    ``model``: a GraphModule, an ExportedProgram, or an ``nn.Module`` (captured with ``example_inputs``).
    The report is in ``fxc.report(result)``.
    """
    if isinstance(model, nn.Module) and not isinstance(model, fx.GraphModule):
        model = capture(model, example_inputs)
    return rtn_pass(model, config, progress=progress).gm
