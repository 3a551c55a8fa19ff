"""convert_l4q: merge W0 + s·B·A, round once, and store integer weights (QuantLinear). No LoRA left."""
from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from ..nn import L4QLinear, QuantLinear
from ..quant import QuantWeight
from .base import LayerReport, NothingToCompressError, PassResult, Report, record
from .program import apply_pass


def unwrap(model: nn.Module) -> nn.Module:
    """The module under torch.compile (``_orig_mod``) and DDP / FSDP-style (``module``) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


@torch.no_grad()
def l4q_to_quant_linear(layer: L4QLinear) -> QuantLinear:
    """Integer codes ``clamp(round((W - b)/s), Qn, Qp)``, zero point ``-b/s`` (fractional once b has trained)."""
    spec = layer.spec
    w = layer.merged_weight()
    out_f, in_f = w.shape
    gl = in_f if layer.group_size is None else layer.group_size
    wg = w.reshape(out_f, in_f // gl, gl)
    s = layer.scale.detach().float()
    b = torch.zeros_like(s) if layer.offset is None else layer.offset.detach().float()
    codes = torch.clamp(torch.round((wg - b.unsqueeze(-1)) / s.unsqueeze(-1)), spec.qmin, spec.qmax)
    qw = QuantWeight.from_codes(codes.to(torch.int32).reshape(out_f, in_f), s, -b / s, spec)
    return QuantLinear(qw, layer.bias)


def _rewrite(gm: fx.GraphModule) -> PassResult:
    report = Report()
    for n in gm.graph.nodes:
        if n.op != "call_module" or not isinstance(gm.get_submodule(n.target), L4QLinear):
            continue
        name, layer = n.target, gm.get_submodule(n.target)
        ql = l4q_to_quant_linear(layer)
        gm.add_submodule(name, ql)
        zp_note = "integer zero point" if ql.quant_weight.zero_point_is_integer else "fractional zero point"
        report.append(LayerReport(name, "linear", "quantized", layer.spec.bits, tuple(layer.weight.shape),
                                  tuple(layer.weight.shape),
                                  f"L4Q merged (rank={layer.rank}), {layer.spec.granularity}, {zp_note}"))
    if not report:
        raise NothingToCompressError("convert_l4q: the model has no L4QLinear layers; was it prepared with "
                                     "prepare_l4q (and did prepare_l4q prepare any layer)?")
    for p in gm.parameters():
        p.requires_grad_(False)
    gm.meta.pop("fxcompress_l4q", None)
    gm.recompile()
    return record(gm, "convert_l4q", report)


def convert_pass(gm, config=None) -> PassResult:
    """Pass form of :func:`convert_l4q` (``gm`` is not modified); ``config`` is unused (no knobs).

    ``gm``: the prepared GraphModule (under torch.compile / DDP wrappers too), or a prepared ExportedProgram
    (or its trained ``ep.module()``); an ExportedProgram gives an ExportedProgram.
    """
    gm = unwrap(gm)
    if not isinstance(gm, (fx.GraphModule, torch.export.ExportedProgram)):
        raise ValueError(f"convert_l4q needs the GraphModule (or ExportedProgram) returned by prepare_l4q, "
                         f"got {type(gm).__name__}")
    return apply_pass(gm, "convert_l4q", _rewrite)


def convert_l4q(model):
    """A plain integer-weight model (no LoRA left) from a prepared (and trained) L4Q model."""
    return convert_pass(model).gm
