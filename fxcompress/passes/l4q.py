"""prepare_l4q: rewrite each target linear layer into an L4QLinear (LoRA + LSQ+ fake quant)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from ..capture import capture
from ..nn import L4QLinear
from ..quant import SUPPORTED_BITS, QuantSpec
from .base import (NOOP_MODES, LayerReport, NothingToCompressError, PassResult, Report, check_modified,
                   group_size_hint, record)
from .graph import cleanup, linear_sites, match_names, replace_site
from .program import apply_pass


@dataclass(frozen=True)
class L4QConfig:
    """L4Q settings.  ``group_size=None`` means per-channel scales; ``targets`` are module-name
    globs (None = every linear with a parameter weight); ``exclude`` globs match full names or
    the last name component.  ``lora=False`` gives the LSQ-only QAT baseline (no adapters)."""

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False
    lora_rank: int = 16
    lora_alpha: float = 32.0
    targets: tuple | None = None
    exclude: tuple = ("lm_head",)
    lora: bool = True
    grad_scale: str = "lsq"
    fused: bool = True
    on_noop: str = "raise"  # when no layer is prepared: "raise" NothingToCompressError, or "warn"

    def __post_init__(self):
        if isinstance(self.bits, bool) or self.bits not in SUPPORTED_BITS:
            raise ValueError(f"L4QConfig.bits must be one of {SUPPORTED_BITS}, got {self.bits!r}")
        if self.group_size is not None and (isinstance(self.group_size, bool) or not isinstance(self.group_size, int)
                                            or self.group_size <= 0):
            raise ValueError(f"L4QConfig.group_size must be a positive int or None (per-channel), "
                             f"got {self.group_size!r}")
        if self.lora and (isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int)
                          or self.lora_rank <= 0):
            raise ValueError(f"L4QConfig.lora_rank must be a positive int, got {self.lora_rank!r}")
        if not self.lora_alpha > 0:
            raise ValueError(f"L4QConfig.lora_alpha must be > 0, got {self.lora_alpha!r}")
        for f in ("targets", "exclude"):
            v = getattr(self, f)
            if isinstance(v, str):
                raise ValueError(f"L4QConfig.{f} must be a tuple of name globs, not the string {v!r}")
        if self.on_noop not in NOOP_MODES:
            raise ValueError(f"L4QConfig.on_noop must be one of {NOOP_MODES}, got {self.on_noop!r}")
        if self.grad_scale not in ("lsq", "none"):
            raise ValueError(f"L4QConfig.grad_scale must be 'lsq' or 'none', got {self.grad_scale!r}")

    @property
    def spec(self) -> QuantSpec:
        if self.group_size is None:
            return QuantSpec(self.bits, self.symmetric, "per_channel", None)
        return QuantSpec(self.bits, self.symmetric, "per_group", self.group_size)


def _rewrite(gm: fx.GraphModule, config: L4QConfig) -> PassResult:
    spec = config.spec
    sites = {s.name: s for s in linear_sites(gm)}
    names = match_names(list(sites), config.targets, config.exclude)
    if not names:
        avail = ", ".join(sites) or "(no linear layers with parameter weights)"
        raise NothingToCompressError(f"l4q: L4QConfig.targets={config.targets} exclude={config.exclude} match no "
                                     f"linear layer; available: {avail}")
    report = Report()
    for p in gm.parameters():
        p.requires_grad_(False)
    for name in names:
        s = sites[name]
        shape = tuple(s.weight.shape)
        if report.skipped_unfit(spec, name, "linear", shape):
            continue
        if config.lora and config.lora_rank > min(shape):
            raise ValueError(f"L4QConfig.lora_rank={config.lora_rank} exceeds min(in, out)={min(shape)} "
                             f"of layer {name!r} (shape {shape})")
        layer = L4QLinear(s.weight.contiguous() if s.transposed else s.weight, s.bias, spec,
                          config.lora_rank if config.lora else 0, config.lora_alpha, config.grad_scale, config.fused)
        replace_site(gm, s, layer)
        note = f"rank={layer.rank}" + (f", g={spec.group_size}" if spec.group_size else ", per-channel")
        report.append(LayerReport(name, "linear", "prepared", spec.bits, shape, shape, note))
    cleanup(gm)
    gm.meta["fxcompress_l4q"] = True
    return record(gm, "l4q", report)


def l4q_pass(gm, config: L4QConfig = L4QConfig(), *, inplace: bool = False) -> PassResult:
    """Make every target linear of ``gm`` an L4QLinear (LoRA + LSQ+ fake quant); ``gm`` is copied unless ``inplace``.

    ``gm``: a GraphModule or a ``torch.export.ExportedProgram`` (then ``PassResult.gm`` is one, whose L4Q
    layers are ``fxcompress::l4q_linear`` nodes; train ``ep.module()``). Raises :class:`NothingToCompressError`
    when no layer can be prepared (``config.on_noop="warn"`` warns).
    """
    if not isinstance(config, L4QConfig):
        raise ValueError(f"config must be an L4QConfig, got {type(config).__name__}")
    if inplace and isinstance(gm, fx.GraphModule):
        res = _rewrite(gm, config)
    else:
        res = apply_pass(gm, "l4q", lambda g: _rewrite(g, config))
    return check_modified(res, config.on_noop, group_size_hint(res.report, "group_size=None (per-channel)"))


def prepare_l4q(model, example_inputs=None, config: L4QConfig = L4QConfig()):
    """Capture ``model`` and make every target linear an L4QLinear; returns the prepared model.

    ``model``: an ``nn.Module`` (captured with ``example_inputs``), a GraphModule, or an ExportedProgram
    (returns an ExportedProgram). Only LoRA A/B and the quantizers' scale/offset have ``requires_grad``;
    ``model`` itself is not modified.  Train the result with any loop; then :func:`convert_l4q`.
    """
    if not isinstance(config, L4QConfig):
        raise ValueError(f"config must be an L4QConfig, got {type(config).__name__}")
    if isinstance(model, nn.Module) and not isinstance(model, fx.GraphModule):
        gm = capture(model, example_inputs)  # already a private copy: rewrite it in place (no second copy of W0)
        return l4q_pass(gm, config, inplace=True).gm
    return l4q_pass(model, config).gm


def l4q_trainable_parameters(gm: nn.Module) -> list[torch.nn.Parameter]:
    """The parameters L4Q trains (LoRA factors, step sizes, offsets), in module order."""
    out = []
    for m in gm.modules():
        if isinstance(m, L4QLinear):
            out.extend(m.trainable_parameters())
    return out


def l4q_param_groups(gm: nn.Module, lora_lr: float = 2e-4, quant_lr: float = 1e-5) -> list[dict]:
    """Optimizer parameter groups: LoRA factors and quantizer step sizes / offsets learn at
    different rates (step sizes are ~1e-2, so they want a much smaller learning rate)."""
    lora, quant = [], []
    for m in gm.modules():
        if isinstance(m, L4QLinear):
            lora += [p for p in (m.lora_A, m.lora_B) if p is not None]
            quant += [p for p in (m.scale, m.offset) if p is not None]
    groups = [{"params": quant, "lr": quant_lr, "name": "quantizer"}]
    if lora:
        groups.insert(0, {"params": lora, "lr": lora_lr, "name": "lora"})
    return groups
