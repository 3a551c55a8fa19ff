"""Static integer activations without data: per-tensor activation ranges from BatchNorm statistics.

``quantize_activations_pass(gm, config)`` inserts ``torch.fake_quantize_per_tensor_affine`` nodes (uint8,
asymmetric, per tensor) on the input of every Conv2d / Linear and on both operands of every residual
``add``, folds each BatchNorm into the conv before it, and quantizes float conv / linear weights per
channel (8-bit RTN by default).  Exported with :func:`fxcompress.export_onnx`, the fake-quant nodes become
QuantizeLinear / DequantizeLinear pairs, and ONNX Runtime fuses them with the integer weights into
``QLinearConv`` / ``QLinearMatMul`` / ``QLinearAdd``.

Ranges (``ranges="bn"``, no data): a BatchNorm output is modelled as ``y_c ~ N(beta_c, gamma_c^2 var_c /
(var_c + eps))`` (the Gaussian model UDFC uses).  A tensor ``act(y)`` (ReLU / ReLU6) gets the range
``[0, min(ceiling, max_c(beta_c + k std_c))]``; a BN output (or a sum of them, at a residual add: means
and variances add, treating the branches as independent) ``[min_c(m_c - k s_c), max_c(m_c + k s_c)]``.  A
ReLU / ReLU6 between adds is moment-matched (clipped-Gaussian mean and variance) so the statistics
propagate through residual stages; max pooling passes them through unchanged (an approximation).
A tensor the model cannot describe (the network input, an unsupported activation such as SiLU, ...) is
calibrated on ``config.calibration`` (or the example inputs given to :func:`quantize_activations`) and
the report says so; with no data at all it stays float (reported).  ``ranges="calibrate"`` uses the
calibration min / max everywhere, for comparison.
"""
from __future__ import annotations

import copy
import dataclasses
import fnmatch
import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..nn import QuantConv2d, QuantLinear
from ..quant import QuantSpec, QuantWeight, affine
from .base import LayerReport, PassResult, Report, record
from .channel_groups import activation_upper, is_activation
from .lift_layers import function_layer_skips, lift_functional_layers, zero_pad_amounts

RANGES = ("bn", "calibrate")
_ADD_FNS = {operator.add, torch.add}
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)
_LAYER_TYPES = (nn.Conv2d, nn.Linear, QuantConv2d, QuantLinear)
_PASS_MODULES = (nn.Dropout, nn.Identity, nn.MaxPool2d)
QMIN, QMAX = 0, 255  # uint8: ONNX Runtime's fast u8s8 path on x86


@dataclass(frozen=True)
class ActivationConfig:
    bits: int = 8  # activation bits (8 only: QuantizeLinear's uint8)
    ranges: str = "bn"  # "bn": from BatchNorm statistics (no data); "calibrate": min/max over `calibration`
    calibration: tuple | None = None  # batches (tensors, or tuples of tensors) for "calibrate" / fallbacks
    k_std: float = 4.0  # a BN-derived range is mean +- k_std * std (clipped at the activation)
    weight_bits: int | None = 8  # float Conv2d/Linear weights -> per-channel RTN at these bits (None: keep float)
    fold_bn: bool = True  # fold BatchNorm into the conv before it (needed for fused integer convs)
    # range of the network inputs (e.g. fxcompress.data.images.IMAGENET_INPUT_RANGE): no data needed for them;
    # None: calibrated on `calibration` / the example inputs (a clipped input range costs much accuracy)
    input_range: tuple | None = None
    # analytic bias correction of the weight-rounding error (Nagel et al. 2019): b -= (W_q - W) E[x], with E[x]
    # from the BN statistics of the layer's input (clipped-Gaussian means); layers without them are reported
    bias_correction: bool = True
    # round each conv kernel so that its sum over the spatial taps (its response to a locally constant input) is
    # the nearest code sum: plain RTN of a k x k kernel that nearly cancels (an edge filter; MobileNetV2's depthwise
    # convs) errs by up to k*k/2 codes in that sum, which BN's gain then amplifies; 1x1 kernels are plain RTN
    preserve_kernel_sums: bool = True
    # globs of Conv2d / Linear names (full path or last component) left float, input and weights: e.g.
    # ("classifier.*",) keeps an ImageNet head float, which ONNX Runtime then runs as a prepacked float Gemm
    # instead of dequantizing its 1.28M int8 weights on every run (see tools/results/cnn_ort_cpu.md)
    skip: tuple = ()

    def __post_init__(self):
        if self.bits != 8 or isinstance(self.bits, bool):
            raise ValueError(f"ActivationConfig.bits must be 8 (uint8 QuantizeLinear), got {self.bits!r}")
        if self.ranges not in RANGES:
            raise ValueError(f"ActivationConfig.ranges must be one of {RANGES}, got {self.ranges!r}")
        if self.calibration is not None and (not isinstance(self.calibration, (tuple, list)) or not all(
                isinstance(b, (torch.Tensor, tuple, list)) for b in self.calibration)):
            raise ValueError("ActivationConfig.calibration must be a tuple of batches (tensors or tuples of tensors)")
        if self.ranges == "calibrate" and not self.calibration:
            raise ValueError("ActivationConfig.calibration must hold at least one batch when ranges='calibrate'")
        k = self.k_std
        if isinstance(k, bool) or not isinstance(k, (int, float)) or not (0 < k < 100) or math.isnan(k):
            raise ValueError(f"ActivationConfig.k_std must be a number in (0, 100), got {k!r}")
        wb = self.weight_bits
        if wb is not None and (isinstance(wb, bool) or wb not in (2, 3, 4, 8)):
            raise ValueError(f"ActivationConfig.weight_bits must be None or one of 2, 3, 4, 8, got {wb!r}")
        if not isinstance(self.fold_bn, bool):
            raise ValueError(f"ActivationConfig.fold_bn must be a bool, got {self.fold_bn!r}")
        r = self.input_range
        if r is not None and not (isinstance(r, (tuple, list)) and len(r) == 2 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in r)
                and r[0] < r[1]):
            raise ValueError(f"ActivationConfig.input_range must be None or a finite (lo, hi) with lo < hi, got {r!r}")
        if not isinstance(self.preserve_kernel_sums, bool):
            raise ValueError(f"ActivationConfig.preserve_kernel_sums must be a bool, got {self.preserve_kernel_sums!r}")
        if not isinstance(self.skip, tuple) or not all(isinstance(g, str) for g in self.skip):
            raise ValueError(f"ActivationConfig.skip must be a tuple of name globs, got {self.skip!r}")
        if not isinstance(self.bias_correction, bool):
            raise ValueError(f"ActivationConfig.bias_correction must be a bool, got {self.bias_correction!r}")


# ----------------------------------------------------------------------------------------------
# Gaussian statistics from BatchNorm

def _check_bn(name: str, bn: nn.Module) -> None:
    for attr in ("running_mean", "running_var", "weight", "bias"):
        t = getattr(bn, attr, None)
        if t is not None and not torch.isfinite(t).all():
            raise ValueError(f"BatchNorm {name!r} has non-finite {attr} (NaN/Inf): its activation range would be "
                             "undefined; fix or re-estimate the BN statistics, or use ranges='calibrate'")
    if bn.running_var is not None and (bn.running_var < 0).any():
        raise ValueError(f"BatchNorm {name!r} has a negative running_var; fix the BN statistics")


def _bn_gauss(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    if bn.running_var is None:
        return None
    var = bn.running_var.double()
    g = bn.weight.double() if bn.affine else torch.ones_like(var)
    b = bn.bias.double() if bn.affine else torch.zeros_like(var)
    return b, g * g * var / (var + bn.eps)


def _clipped_moments(m, v, hi):
    from .udfc import clipped_mean, clipped_second_moment

    s = v.clamp_min(0).sqrt()
    e1, e2 = clipped_mean(m, s, hi), clipped_second_moment(m, s, hi)
    return e1, (e2 - e1 * e1).clamp_min(0)


class _Stats:
    """Per-node Gaussian statistics (mean, var per channel) and per-tensor ranges from BN alone."""

    def __init__(self, gm: fx.GraphModule, k: float):
        self.gm, self.k = gm, k
        self.gauss: dict[fx.Node, tuple | None] = {}
        self.why: dict[fx.Node, str] = {}
        for n in gm.graph.nodes:
            self.gauss[n] = self._gauss(n)

    def _mod(self, n):
        return self.gm.get_submodule(n.target) if n.op == "call_module" else None

    def _gauss(self, n: fx.Node):
        m = self._mod(n)
        ins = [a for a in n.all_input_nodes]
        if isinstance(m, _BN_TYPES):
            _check_bn(n.target, m)
            return _bn_gauss(m)
        if activation_upper(self.gm, n) is not None and ins and self.gauss.get(ins[0]) is not None:
            mu, v = self.gauss[ins[0]]
            return _clipped_moments(mu, v, activation_upper(self.gm, n))
        if (n.op == "call_function" and n.target in _ADD_FNS) or (n.op == "call_method" and n.target == "add"):
            gs = [self.gauss.get(a) for a in n.args[:2] if isinstance(a, fx.Node)]
            if len(gs) == 2 and all(g is not None for g in gs) and gs[0][0].shape == gs[1][0].shape:
                return gs[0][0] + gs[1][0], gs[0][1] + gs[1][1]
            return None
        if (isinstance(m, _PASS_MODULES) or zero_pad_amounts(self.gm, n) is not None) and ins:
            return self.gauss.get(ins[0])  # a zero pad adds a border of zeros: ignored (an approximation)
        return None

    def mean(self, n: fx.Node) -> torch.Tensor | None:
        """Per-channel mean of the tensor ``n`` from BN statistics, also through mean-preserving ops (global
        average pooling, flatten, dropout, identity); None when no BN statistics reach it."""
        g = self.gauss.get(n)
        if g is not None:
            return g[0]
        m = self._mod(n)
        ins = n.all_input_nodes
        keeps = zero_pad_amounts(self.gm, n) is not None or isinstance(
            m, (nn.Dropout, nn.Identity, nn.Flatten, nn.AdaptiveAvgPool2d)) or (
            n.op == "call_function" and n.target in (torch.flatten, F.adaptive_avg_pool2d, F.dropout)) or (
            n.op == "call_method" and n.target in ("flatten", "view", "reshape", "mean"))
        if keeps and ins:
            if n.target is F.adaptive_avg_pool2d and n.args[1:2] not in ((1,), ((1, 1),)):
                return None
            return self.mean(ins[0])
        return None

    def bn_range(self, n: fx.Node) -> tuple[float, float, str] | None:
        """(lo, hi, how) for the tensor ``n`` from BN statistics, or None with self.why[n] set."""
        hi_clip = activation_upper(self.gm, n)
        src = n.all_input_nodes[0] if n.all_input_nodes else None
        m = self._mod(n)
        if (isinstance(m, nn.MaxPool2d) or zero_pad_amounts(self.gm, n) is not None) and src is not None:
            return self.bn_range(src)  # max pooling keeps the range of its input; a zero pad adds 0 (always in range)
        if hi_clip is not None and src is not None and self.gauss.get(src) is not None:
            mu, v = self.gauss[src]
            hi = float((mu + self.k * v.sqrt()).max().clamp(max=hi_clip))
            how = "BN: relu6" if hi_clip == 6 else "BN: relu" if hi_clip == math.inf else f"BN: clip({hi_clip:g})"
            return 0.0, hi, how
        if hi_clip is None and is_activation(self.gm, n):
            self.why[n] = f"activation {n.target if n.op != 'call_module' else type(m).__name__} has no moment model"
            return None
        g = self.gauss.get(n)
        if g is None:
            self.why[n] = "no BatchNorm statistics reach this tensor"
            return None
        mu, v = g
        s = v.sqrt()
        return float((mu - self.k * s).min()), float((mu + self.k * s).max()), "BN: gaussian"


def _calibrate(gm: fx.GraphModule, nodes: list[fx.Node], batches) -> dict[fx.Node, tuple[float, float]]:
    """min / max of each node's output over the calibration batches (a plain fx.Interpreter run)."""
    want = set(nodes)
    seen: dict[fx.Node, list] = {n: [math.inf, -math.inf] for n in nodes}

    class Rec(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n in want and isinstance(out, torch.Tensor):
                seen[n][0] = min(seen[n][0], float(out.min()))
                seen[n][1] = max(seen[n][1], float(out.max()))
            return out

    was = gm.training
    gm.eval()
    with torch.no_grad():
        for b in batches:
            Rec(gm).run(*(b if isinstance(b, (tuple, list)) else (b,)))
    gm.train(was)
    return {n: tuple(v) for n, v in seen.items() if math.isfinite(v[0])}


def qparams(lo: float, hi: float) -> tuple[float, int]:
    """uint8 asymmetric (scale, zero_point) covering [min(lo, 0), max(hi, 0)]."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"activation range [{lo}, {hi}] is not finite")
    if hi - lo <= 1e-12:
        raise ValueError(f"activation range [{lo}, {hi}] is empty")
    scale = (hi - lo) / (QMAX - QMIN)
    zp = int(min(QMAX, max(QMIN, round(QMIN - lo / scale))))
    return scale, zp


# ----------------------------------------------------------------------------------------------
# Graph rewriting: BN folding, weight quantization, fake-quant insertion

def _fold_scale(bn: nn.Module):
    var = bn.running_var.double()
    g = bn.weight.double() if bn.affine else torch.ones_like(var)
    b = bn.bias.double() if bn.affine else torch.zeros_like(var)
    c = g / torch.sqrt(var + bn.eps)
    return c, b - bn.running_mean.double() * c


def _fold_bn(gm: fx.GraphModule) -> dict[fx.Node, fx.Node]:
    """Fold every BatchNorm that follows a conv (its only user) into the conv; returns {bn node: conv node}."""
    folded = {}
    for n in list(gm.graph.nodes):
        if n.op != "call_module" or not isinstance(gm.get_submodule(n.target), _BN_TYPES):
            continue
        src = n.args[0]
        if not (isinstance(src, fx.Node) and src.op == "call_module" and len(src.users) == 1):
            continue
        conv = gm.get_submodule(src.target)
        if sum(1 for x in gm.graph.nodes if x.op == "call_module" and x.target == src.target) != 1:
            continue
        bn = gm.get_submodule(n.target)
        c, shift = _fold_scale(bn)
        if type(conv) is nn.Conv2d:
            new = copy.deepcopy(conv)
            with torch.no_grad():
                new.weight.copy_((conv.weight.double() * c.view(-1, 1, 1, 1)).to(conv.weight.dtype))
                b0 = conv.bias.double() if conv.bias is not None else torch.zeros_like(c)
                new.bias = nn.Parameter((b0 * c + shift).to(conv.weight.dtype), requires_grad=False)
        elif isinstance(conv, QuantConv2d) and conv.spec.granularity == "per_channel" and conv.spec.symmetric:
            qw = conv.quant_weight
            codes = qw.codes() * torch.sign(c).view(-1, 1, 1, 1).to(torch.int32)
            codes = codes.clamp(qw.spec.qmin, qw.spec.qmax)
            scale = (qw.scale.double() * c.abs().view(-1, 1)).float()
            b0 = conv.bias.double() if conv.bias is not None else torch.zeros_like(c)
            new = QuantConv2d(QuantWeight.from_codes(codes, scale, qw.zero_point, qw.spec),
                              (b0 * c + shift).float(), conv.stride, conv.padding, conv.dilation, conv.groups)
        else:
            continue
        gm.add_submodule(src.target, new)
        n.replace_all_uses_with(src)
        gm.graph.erase_node(n)
        folded[n] = src
    return folded


def kernel_sum_preserving_codes(w: torch.Tensor, spec: QuantSpec, scale: torch.Tensor | None = None,
                                qmax: int | None = None) -> torch.Tensor:
    """Per-channel symmetric codes of a conv weight ``(out, in, kh, kw)`` whose per-(out, in) sums over the taps are
    ``round(sum(w) / scale)``: RTN, then the fewest taps nearest a rounding boundary move one code toward it.

    Every code stays within one step of ``w / scale`` (so in range and within one RTN step of the weight); only
    the taps' rounding directions change, chosen so that the kernel's response to a constant input is exact to
    half a code.  A 1x1 kernel (one tap) is returned as plain RTN.  ``scale`` (out, 1) and ``qmax`` default to
    the spec's abs-max scales and code range (pass them for 5..7-bit codes in an 8-bit container).
    """
    if spec.granularity != "per_channel" or not spec.symmetric or w.dim() != 4:
        raise ValueError("kernel_sum_preserving_codes needs a 4-D conv weight and a per-channel symmetric spec")
    if scale is None:
        scale, _ = affine.minmax_params(w, spec)
    qmax = spec.qmax if qmax is None else qmax
    qmin = -qmax - 1
    v = w.detach().double() / scale.double().view(-1, 1, 1, 1)
    codes = torch.round(v).clamp(qmin, qmax)
    taps = v.shape[2] * v.shape[3]
    if taps == 1:
        return codes.to(torch.int32)
    vv, cc = v.flatten(2), codes.flatten(2)
    need = torch.round(vv.sum(-1)) - cc.sum(-1)  # codes to add (> 0) or remove (< 0) per (out, in)
    resid = vv - cc  # in [-0.5, 0.5] where not clamped
    rank = resid.argsort(-1, descending=True).argsort(-1)  # 0: the tap most worth rounding up
    up = (rank < need.unsqueeze(-1)) & (cc < qmax)
    down = (rank >= taps + need.unsqueeze(-1)) & (cc > qmin)
    return (cc + up.to(cc.dtype) - down.to(cc.dtype)).reshape(v.shape).to(torch.int32)


def _quantize_weights(gm: fx.GraphModule, bits: int, report: Report, means=None,
                      preserve_kernel_sums: bool = True, skip: tuple = ()) -> None:
    """Per-channel RTN of every float Conv2d / Linear; with ``means`` (node -> per-channel mean of the layer's
    input, or None), the bias absorbs the expected rounding error: ``b -= (W_q - W) E[x]`` (bias correction)."""
    spec = QuantSpec(bits if bits in (2, 3, 4, 8) else 8, True, "per_channel", None)  # 5..7: 8-bit container
    qmax = 2 ** (bits - 1) - 1
    for n in gm.graph.nodes:
        if n.op != "call_module":
            continue
        m = gm.get_submodule(n.target)
        if _skipped(n.target, skip) and type(m) in (nn.Conv2d, nn.Linear):
            report.append(LayerReport(n.target, "conv2d" if type(m) is nn.Conv2d else "linear", "skipped", None,
                                      None, None, "left float (ActivationConfig.skip)"))
            continue
        if (type(m) is nn.Conv2d and not isinstance(m.padding, str)) or type(m) is nn.Linear:
            w = m.weight.detach()
            scale = (w.float().flatten(1).abs().amax(1, keepdim=True) / qmax).clamp_min(1e-8)
            if preserve_kernel_sums and w.dim() == 4:
                codes = kernel_sum_preserving_codes(w, spec, scale, qmax)
            else:
                codes = torch.round(w.double() / scale.double().view(-1, *[1] * (w.dim() - 1))).clamp(-qmax - 1, qmax)
            qw = QuantWeight.from_codes(codes.to(torch.int32), scale, torch.zeros_like(scale), spec)
            q = QuantConv2d(qw, m.bias, m.stride, m.padding, m.dilation, m.groups) if type(m) is nn.Conv2d else \
                QuantLinear(qw, m.bias)
        else:
            continue
        note = "weights: per-channel " + ("RTN, kernel sums kept" if preserve_kernel_sums and type(m) is nn.Conv2d
                                           and m.weight[0, 0].numel() > 1 else "RTN") + " (BN folded)"
        if means is not None:
            mu = means(n.args[0]) if n.args and isinstance(n.args[0], fx.Node) else None
            if mu is None:
                note += "; no bias correction (no BN statistics for its input)"
            else:
                err = (q.quant_weight.dequantize().double() - m.weight.double())
                groups = getattr(m, "groups", 1)
                err = err.reshape(err.shape[0], err.shape[1], -1).sum(-1)  # (out, in/groups)
                if groups == 1:
                    shift = err @ mu.double()
                else:  # grouped / depthwise: output o reads input channels of its group
                    cin_g, per_g = err.shape[1], err.shape[0] // groups
                    idx = (torch.arange(err.shape[0]) // per_g).unsqueeze(1) * cin_g + torch.arange(cin_g)
                    shift = (err * mu.double()[idx]).sum(1)
                b0 = q.bias.double() if q.bias is not None else torch.zeros_like(shift)
                q.bias = nn.Parameter((b0 - shift).float(), requires_grad=False)
                note += "; bias-corrected from BN statistics"
        gm.add_submodule(n.target, q)
        shape = tuple(m.weight.shape)
        report.append(LayerReport(n.target, "conv2d" if type(m) is nn.Conv2d else "linear", "quantized", bits,
                                  shape, shape, note))


def _skipped(name: str, skip: tuple) -> bool:
    return any(fnmatch.fnmatchcase(name, g) or fnmatch.fnmatchcase(name.rsplit(".", 1)[-1], g) for g in skip)


def _quant_points(gm: fx.GraphModule, skip: tuple = ()) -> dict[fx.Node, list[fx.Node]]:
    """Tensors to quantize -> the users that should read the quantized copy (layers and residual adds)."""
    points: dict[fx.Node, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        m = gm.get_submodule(n.target) if n.op == "call_module" else None
        if isinstance(m, _LAYER_TYPES) and _skipped(n.target, skip):
            continue
        if isinstance(m, _LAYER_TYPES) and n.args and isinstance(n.args[0], fx.Node):
            x = n.args[0]
            if zero_pad_amounts(gm, x) is not None and len(x.users) == 1:
                # quantize before a zero pad (Q(0) = zero point, exact): ORT fuses DequantizeLinear -> Pad -> Conv
                # into one QLinearConv; after it, the conv before the pad would lose its integer output
                points.setdefault(x.args[0], []).append(x)
            else:
                points.setdefault(x, []).append(n)
        elif (n.op == "call_function" and n.target in _ADD_FNS) or (n.op == "call_method" and n.target == "add"):
            for a in n.args[:2]:
                if isinstance(a, fx.Node):
                    points.setdefault(a, []).append(n)
        elif (isinstance(m, nn.AdaptiveAvgPool2d) or (n.op == "call_function" and n.target is F.adaptive_avg_pool2d)) \
                and n.args and isinstance(n.args[0], fx.Node):
            # global pooling reads a quantized tensor: the conv before it gets an integer output (QLinearConv) and
            # ORT runs the pooling as QLinearGlobalAveragePool
            points.setdefault(n.args[0], []).append(n)
    return points


def _describe(n: fx.Node) -> str:
    return str(n.target) if n.op == "call_module" else n.name


@torch.no_grad()
def quantize_activations_pass(gm: fx.GraphModule, config: ActivationConfig = ActivationConfig()) -> PassResult:
    """Insert uint8 per-tensor fake-quant nodes with BN-derived (or calibrated) ranges; ``gm`` is not modified."""
    if not isinstance(config, ActivationConfig):
        raise ValueError(f"quantize_activations_pass needs an ActivationConfig, got {type(config).__name__}")
    if not isinstance(gm, fx.GraphModule):
        raise ValueError("quantize_activations_pass needs a torch.fx.GraphModule (see fxcompress.capture), got "
                         f"{type(gm).__name__}")
    gm = copy.deepcopy(gm)
    lift_functional_layers(gm)  # conv2d / linear calls inside a module's own forward -> modules (capture did it)
    report = Report()
    stats = _Stats(gm, float(config.k_std))  # also validates every BatchNorm's statistics
    points = _quant_points(gm, config.skip)
    ranges: dict[fx.Node, tuple[float, float, str]] = {}
    need_cal = []
    for node in points:
        if node.op == "placeholder" and config.input_range is not None:
            ranges[node] = (float(config.input_range[0]), float(config.input_range[1]), "input_range")
            continue
        r = stats.bn_range(node) if config.ranges == "bn" else None
        if r is None:
            need_cal.append(node)
        else:
            ranges[node] = r
    if need_cal and config.calibration:
        cal = _calibrate(gm, need_cal, config.calibration)
        for node in need_cal:
            if node in cal:
                how = "calibrated" if config.ranges == "calibrate" else \
                    f"calibrated ({stats.why.get(node, 'no BN statistics')})"
                ranges[node] = (*cal[node], how)
    # rewrite: fold BN, quantize weights, then insert the fake-quant nodes
    folded = _fold_bn(gm) if config.fold_bn else {}
    points = {folded.get(k, k): v for k, v in points.items()}
    ranges = {folded.get(k, k): v for k, v in ranges.items()}
    if config.weight_bits is not None:
        unfolded = {conv: bn for bn, conv in folded.items()}  # a folded conv's output is its BN's output
        _quantize_weights(gm, config.weight_bits, report,
                          (lambda x: stats.mean(unfolded.get(x, x))) if config.bias_correction else None,
                          config.preserve_kernel_sums, config.skip)
    for node, users in points.items():
        if node not in ranges:
            why = stats.why.get(node, "no BN statistics") + "; no calibration data"
            report.append(LayerReport(_describe(node), "activation", "skipped", None, None, None,
                                      f"left float: {why}"[:120]))
            continue
        lo, hi, how = ranges[node]
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(f"activation range of {_describe(node)!r} is not finite ([{lo}, {hi}], {how})")
        if hi - min(lo, 0.0) <= 1e-12 and hi <= 0 and lo >= 0:
            raise ValueError(f"activation range of {_describe(node)!r} is empty ([{lo}, {hi}], {how}): every "
                             "channel is dead by its BN statistics; check the BatchNorm parameters")
        scale, zp = qparams(lo, hi)
        with gm.graph.inserting_after(node):
            fq = gm.graph.call_function(torch.fake_quantize_per_tensor_affine, (node, scale, zp, QMIN, QMAX))
        for u in users:
            u.replace_input_with(node, fq)
        report.append(LayerReport(_describe(node), "activation", "quantized", 8, None, None,
                                  f"uint8 [{lo:.3g}, {hi:.3g}] {how}; feeds {len(users)}"[:120]))
    report.extend(function_layer_skips(gm, "quantize_activations"))
    if not any(r.action == "quantized" and r.op == "activation" for r in report):
        raise ValueError("quantize_activations changed nothing: no activation got a range (no BatchNorm statistics "
                         "and no calibration data); pass ActivationConfig(calibration=[batch, ...])")
    gm.graph.lint()
    gm.recompile()
    return record(gm, "activations", report)


def quantize_activations(model: nn.Module, example_inputs=None,
                         config: ActivationConfig = ActivationConfig()) -> fx.GraphModule:
    """Capture ``model`` (a copy; a GraphModule is copied too) and run :func:`quantize_activations_pass`.

    Tensors without BN statistics are calibrated on ``config.calibration``, or on ``example_inputs`` when
    no calibration batches are given.
    """
    from ..capture import capture

    if isinstance(model, nn.Module):  # before capture: NaN statistics would fail its output check obscurely
        for name, m in model.named_modules():
            if isinstance(m, _BN_TYPES):
                _check_bn(name, m)
    gm = capture(model, example_inputs)
    if config.calibration is None and example_inputs is not None:
        ex = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        config = dataclasses.replace(config, calibration=(ex,))
    return quantize_activations_pass(gm, config).gm
