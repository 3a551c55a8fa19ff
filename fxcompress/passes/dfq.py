"""DFQ: cross-layer equalization and analytic bias correction, the data-free quantization baseline.

After "Data-Free Quantization Through Weight Equalization and Bias Correction" (Nagel et al., ICCV 2019,
arXiv 1906.04721).

* **Cross-layer equalization.**  For consecutive layers ``conv1 -> [BN] -> act -> conv2`` with a positively
  homogeneous ``act`` (ReLU: ``relu(y / s) = relu(y) / s`` for ``s > 0``), channel ``i`` of conv1's output is
  divided by ``s_i`` and input channel ``i`` of conv2 multiplied by it; the float function is unchanged.  With
  ``r1_i`` the range of conv1's (BN-folded) output filter ``i`` and ``r2_i`` that of conv2's input channel ``i``,
  ``s_i = sqrt(r1_i / r2_i)`` makes both ``sqrt(r1_i r2_i)``: per-tensor and per-channel grids then waste less
  range.  Pairs are found on the graph (conv2 a dense or depthwise Conv2d, so MobileNetV2's
  ``conv -> depthwise -> conv`` chains are two pairs) and equalized in a few sweeps.  The BN after conv1 (if
  any) absorbs the ``1 / s_i`` in its affine parameters, so the BN statistics still describe the new tensor.
* **ReLU6 is not positively homogeneous** (``min(relu(y / s), 6) != min(relu(y), 6) / s``).  ``relu6="replace"``
  replaces the ReLU6 of every equalized pair by ReLU, as the paper does (this changes the float model where
  pre-activations exceed 6, which the report says); ``relu6="skip"`` leaves those pairs alone.
* **Bias correction.**  After per-channel RTN of the (BN-folded) weights, each layer's bias absorbs the
  expected output error ``(W_q - W) E[x]``, with ``E[x]`` from the BN statistics of the layer's input (the
  clipped-Gaussian means UDFC uses); see :func:`fxcompress.passes.activations.quantize_activations_pass`,
  whose weight step this pass reuses.
* Not done: the paper's high-bias absorption.

``weight_bits=None`` returns the equalized float model with its BatchNorms in place: feed it to
:func:`fxcompress.quantize_activations` (which folds BN, quantizes the weights with bias correction and adds
integer activations from the same BN statistics).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .activations import _BN_TYPES, _Stats, _fold_bn, _quantize_weights
from .base import LayerReport, NothingToCompressError, PassResult, Report, record
from .channel_groups import activation_upper
from .lift_layers import function_layer_skips, lift_functional_layers, through_zero_pad

RELU6_MODES = ("replace", "skip")


@dataclass(frozen=True)
class DFQConfig:
    equalize: bool = True  # cross-layer equalization of consecutive conv pairs
    relu6: str = "replace"  # "replace": ReLU6 -> ReLU in equalized pairs (as the paper); "skip": leave those pairs
    sweeps: int = 8  # equalization passes over all pairs (the scales converge within a few)
    weight_bits: int | None = 8  # 2..8: per-channel RTN of the BN-folded weights (None: float, BN kept)
    bias_correction: bool = True  # b -= (W_q - W) E[x] from BN statistics

    def __post_init__(self):
        if not isinstance(self.equalize, bool):
            raise ValueError(f"DFQConfig.equalize must be a bool, got {self.equalize!r}")
        if self.relu6 not in RELU6_MODES:
            raise ValueError(f"DFQConfig.relu6 must be one of {RELU6_MODES}, got {self.relu6!r}")
        if isinstance(self.sweeps, bool) or not isinstance(self.sweeps, int) or not (1 <= self.sweeps <= 100):
            raise ValueError(f"DFQConfig.sweeps must be an int in 1..100, got {self.sweeps!r}")
        wb = self.weight_bits
        if wb is not None and (isinstance(wb, bool) or not isinstance(wb, int) or not (2 <= wb <= 8)):
            raise ValueError(f"DFQConfig.weight_bits must be None or an int in 2..8 (5..7 stored in 8-bit), got {wb!r}")
        if not isinstance(self.bias_correction, bool):
            raise ValueError(f"DFQConfig.bias_correction must be a bool, got {self.bias_correction!r}")


@dataclass
class _Pair:
    conv1: str  # module paths
    bn: str | None
    act: fx.Node | None
    conv2: str


def _conv(gm: fx.GraphModule, n) -> nn.Conv2d | None:
    if isinstance(n, fx.Node) and n.op == "call_module":
        m = gm.get_submodule(n.target)
        if type(m) is nn.Conv2d:
            return m
    return None


def find_pairs(gm: fx.GraphModule, relu6: str = "replace") -> tuple[list[_Pair], list[tuple[str, str]]]:
    """Equalizable ``conv1 -> [BN] -> ReLU/ReLU6 (or nothing) -> conv2`` pairs, and (conv2, reason) skips."""
    pairs, skips = [], []
    for n in gm.graph.nodes:
        c2 = _conv(gm, n)
        if c2 is None or not n.args or not isinstance(n.args[0], fx.Node):
            continue
        if c2.groups not in (1, c2.in_channels):
            skips.append((n.target, "grouped conv (not dense or depthwise)"))
            continue
        a, act, bn = n.args[0], None, None
        if through_zero_pad(gm, a) is not a:  # a zero pad is positively homogeneous: pad(x / s) = pad(x) / s
            if len(a.users) != 1:
                skips.append((n.target, "its input zero pad has other users"))
                continue
            a = a.args[0]
        if activation_upper(gm, a) is not None:
            act, a = a, a.all_input_nodes[0] if a.all_input_nodes else None
            if len(act.users) != 1:
                skips.append((n.target, "its input activation has other users"))
                continue
            if activation_upper(gm, act) != math.inf and relu6 == "skip":
                skips.append((n.target, "ReLU6 before it is not positively homogeneous (relu6='skip')"))
                continue
        if isinstance(a, fx.Node) and a.op == "call_module" and isinstance(gm.get_submodule(a.target), _BN_TYPES):
            bnm = gm.get_submodule(a.target)
            if len(a.users) != 1 or not bnm.affine or bnm.running_var is None:
                skips.append((n.target, "the BatchNorm before it has other users or no affine parameters"))
                continue
            bn, a = a.target, a.args[0]
        c1 = _conv(gm, a)
        if c1 is None:
            skips.append((n.target, "its input is not a conv output through BN / ReLU alone (residual add, pooling, network input)"))
            continue
        if len(a.users) != 1:
            skips.append((n.target, f"{a.target}'s output has other users (residual / branch)"))
            continue
        pairs.append(_Pair(a.target, bn, act, n.target))
    return pairs, skips


def _bn_gain(bn: nn.Module) -> torch.Tensor:
    return (bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)).abs()


@torch.no_grad()
def _equalize(gm: fx.GraphModule, p: _Pair) -> torch.Tensor:
    """One equalization step of a pair in place (on the pass's copy); returns the scales s."""
    c1, c2 = gm.get_submodule(p.conv1), gm.get_submodule(p.conv2)
    w1 = c1.weight.double().flatten(1).abs().amax(1)
    if p.bn is not None:
        w1 = w1 * _bn_gain(gm.get_submodule(p.bn))
    if c2.groups == 1:
        r2 = c2.weight.double().transpose(0, 1).flatten(1).abs().amax(1)
    else:
        r2 = c2.weight.double().flatten(1).abs().amax(1)
    ok = (w1 > 0) & (r2 > 0)
    s = torch.where(ok, torch.sqrt(w1 / r2.clamp_min(1e-30)), torch.ones_like(w1))
    if p.bn is not None:
        bn = gm.get_submodule(p.bn)
        bn.weight.copy_((bn.weight.double() / s).to(bn.weight.dtype))
        bn.bias.copy_((bn.bias.double() / s).to(bn.bias.dtype))
    else:
        c1.weight.copy_((c1.weight.double() / s.view(-1, 1, 1, 1)).to(c1.weight.dtype))
        if c1.bias is not None:
            c1.bias.copy_((c1.bias.double() / s).to(c1.bias.dtype))
    shape = (1, -1, 1, 1) if c2.groups == 1 else (-1, 1, 1, 1)
    c2.weight.copy_((c2.weight.double() * s.view(shape)).to(c2.weight.dtype))
    return s


def _to_relu(gm: fx.GraphModule, act: fx.Node) -> bool:
    """Replace a ReLU6 / Hardtanh(0, 6) node by ReLU; True when it was not a ReLU already."""
    if activation_upper(gm, act) == math.inf:
        return False
    shared = act.op == "call_module" and sum(n.op == "call_module" and n.target == act.target
                                             for n in gm.graph.nodes) > 1
    if act.op == "call_module" and not shared:
        gm.add_submodule(act.target, nn.ReLU())
    else:  # a function, or a module also called elsewhere (EfficientNet's one ReLU6 per block): this call only
        act.op, act.target, act.args, act.kwargs = "call_function", F.relu, act.args[:1], {}
    return True


@torch.no_grad()
def dfq_pass(gm: fx.GraphModule, config: DFQConfig = DFQConfig()) -> PassResult:
    """Cross-layer equalization + per-channel RTN with bias correction; ``gm`` is not modified."""
    if not isinstance(config, DFQConfig):
        raise ValueError(f"dfq_pass needs a DFQConfig, got {type(config).__name__}")
    if not isinstance(gm, fx.GraphModule):
        raise ValueError(f"dfq_pass needs a torch.fx.GraphModule (see fxcompress.capture), got {type(gm).__name__}")
    gm = copy.deepcopy(gm)
    lift_functional_layers(gm)  # conv2d / linear calls inside a module's own forward -> modules (capture did it)
    report = Report()
    changed = False
    if config.equalize:
        pairs, skips = find_pairs(gm, config.relu6)
        relu6 = [p.conv2 for p in pairs if p.act is not None and _to_relu(gm, p.act)]
        spread = {}
        for _ in range(config.sweeps):
            for p in pairs:
                s = _equalize(gm, p)
                spread[p.conv2] = float(s.max() / s.min())
        for p in pairs:
            note = f"equalized with {p.conv1}" + ("; ReLU6 before it replaced by ReLU" if p.conv2 in relu6 else "")
            report.append(LayerReport(p.conv2, "conv2d", "equalized", None, None, None,
                                      f"{note}; last sweep's scale spread {spread[p.conv2]:.3g}"[:120]))
        for name, why in skips:
            report.append(LayerReport(name, "conv2d", "skipped", None, None, None, f"not equalized: {why}"[:120]))
        changed = bool(pairs)
    if config.weight_bits is not None:
        stats = _Stats(gm, 4.0)  # BN statistics of the equalized graph (also validates them)
        folded = _fold_bn(gm)
        unfolded = {conv: bn for bn, conv in folded.items()}
        wreport = Report()
        _quantize_weights(gm, config.weight_bits, wreport,
                          (lambda x: stats.mean(unfolded.get(x, x))) if config.bias_correction else None,
                          preserve_kernel_sums=False)
        report.extend(wreport)
        changed = changed or bool(wreport)
    report.extend(function_layer_skips(gm, "dfq"))
    if not changed:
        raise NothingToCompressError("dfq changed nothing: no conv pair to equalize (conv -> [BN] -> ReLU -> conv "
                                     "with single users) and weight_bits=None; " + "; ".join(
                                         f"{r.layer}: {r.note}" for r in report)[:400])
    gm.graph.lint()
    gm.recompile()
    return record(gm, "dfq", report)


def dfq(model, example_inputs=None, config: DFQConfig = DFQConfig()) -> fx.GraphModule:
    """Capture ``model`` (a copy; a GraphModule is copied by the pass) and run :func:`dfq_pass`."""
    from ..capture import capture

    if isinstance(model, nn.Module) and not isinstance(model, fx.GraphModule):
        model = capture(model, example_inputs)
    return dfq_pass(model, config).gm
