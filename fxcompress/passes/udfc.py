"""UDFC: data-free channel pruning + weight quantization with a closed-form compensation.

After "Unified Data-Free Compression: Pruning and Quantization without Fine-Tuning"
(Bai et al., ICCV 2023, arXiv 2308.07209).  For a chain ``layer l -> BN -> ReLU -> layer l+1``:

* the activations ``a_i = ReLU(y_i)`` are modelled from BatchNorm alone: the BN output
  ``y_i ~ N(beta_i, gamma_i^2 var_i / (var_i + eps))`` (no data);
* compressing layer ``l`` damages its channels: pruned channels vanish, quantized channels
  become ``a~_j = ReLU(y~_j)`` where ``y~_j`` is the BN output of the quantized filter;
* UDFC's assumption: each original channel is (partly) a linear combination of the surviving
  damaged channels, ``a_i ~= sum_j S_ij a~_j + t_i``.  Substituting into
  ``Z = W^{l+1} a`` gives the compensated next layer ``W' = W^{l+1} S`` and bias
  ``b' = b + W^{l+1} t``;
* ``S, t`` minimise the expected reconstruction error ``E||W^{l+1}(a - S a~ - t)||^2``;
  the closed form is the normal equations ``[S t] = E[a d^T] E[d d^T]^{-1}`` with
  ``d = [a~; 1]``, whose entries are the expectations ``E[ReLU(y)]``, ``E[ReLU(y)^2]`` and
  ``E[ReLU(y_i) ReLU(y_j)]`` of (bivariate) Gaussians.

Modelling choices (this implementation, documented in the report notes):
``correlation="independent"`` treats distinct channels as independent given BN (the paper's
BN-only statistics: ``E[a_i a_j] = E[a_i] E[a_j]``); ``"weights"`` correlates pre-activations
by the cosine of their filters (a white-input assumption).  A quantized filter ``q`` of ``w``
is modelled as ``corr(z, z~) = cos(w, q)``, ``std(z~) = std(z) |q|/|w|`` and a mean shift
``(q - w) . E[x]`` when the layer's input is itself a BN+ReLU output (otherwise 0).
``merge="single"`` is a Neuron-Merging-style baseline through the same closed form restricted to one
nonzero per row of ``S``: a kept channel uses only its own damaged copy, a pruned one only the kept
channel whose filter is most correlated with it (sign-corrected cosine), each with a 1-D least squares.
"""
from __future__ import annotations

import fnmatch
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from ..nn import QuantConv2d, QuantLinear
from ..quant import QuantSpec, QuantWeight
from .base import LayerReport, PassResult, Report, check_modified, record
from .channel_groups import Chain, analyze, is_relu
from .program import apply_pass, modularize

NATIVE_BITS = (2, 3, 4, 8)
CRITERIA = ("l1", "l2")
GRANULARITIES = ("per_channel", "per_tensor")
CORRELATIONS = ("independent", "weights")
MERGES = ("all", "single")


@dataclass(frozen=True)
class UDFCConfig:
    prune_ratio: float = 0.3  # fraction of output channels removed per prunable layer, in [0, 1)
    weight_bits: int = 6  # 2..8; 5/6/7 are stored in an 8-bit container with codes in the b-bit range
    criterion: str = "l2"  # filter norm used to pick the channels to prune: "l1" or "l2"
    granularity: str = "per_channel"  # "per_channel" or "per_tensor" symmetric scales
    skip: tuple = ("fc",)  # globs of layer names (full path or last component) left untouched
    prune: bool = True
    quantize: bool = True
    compensate: bool = True  # False: plain norm pruning / plain RTN through the same code path
    bias_correction: bool = True  # include the constant term t (folded into the next layer's bias)
    correlation: str = "weights"  # cross-channel model: "independent" (BN only) or "weights"
    ridge: float = 1e-4  # relative ridge on E[d d^T] for a stable solve
    merge: str = "all"  # "all": every channel from all kept ones; "single": from one kept channel (NM-style)

    def __post_init__(self):
        r = self.prune_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not (0.0 <= float(r) < 1.0) or math.isnan(r):
            raise ValueError(f"UDFCConfig.prune_ratio must be a number in [0, 1), got {r!r}")
        b = self.weight_bits
        if isinstance(b, bool) or not isinstance(b, int) or not (2 <= b <= 8):
            raise ValueError(f"UDFCConfig.weight_bits must be an int in 2..8, got {b!r}")
        if self.criterion not in CRITERIA:
            raise ValueError(f"UDFCConfig.criterion must be one of {CRITERIA}, got {self.criterion!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"UDFCConfig.granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.correlation not in CORRELATIONS:
            raise ValueError(f"UDFCConfig.correlation must be one of {CORRELATIONS}, got {self.correlation!r}")
        if self.merge not in MERGES:
            raise ValueError(f"UDFCConfig.merge must be one of {MERGES}, got {self.merge!r}")
        if isinstance(self.skip, str) or not all(isinstance(s, str) for s in self.skip):
            raise ValueError(f"UDFCConfig.skip must be a tuple of name globs, got {self.skip!r}")
        for f in ("prune", "quantize", "compensate", "bias_correction"):
            if not isinstance(getattr(self, f), bool):
                raise ValueError(f"UDFCConfig.{f} must be a bool, got {getattr(self, f)!r}")
        if not isinstance(self.ridge, (int, float)) or isinstance(self.ridge, bool) or not self.ridge >= 0:
            raise ValueError(f"UDFCConfig.ridge must be a number >= 0, got {self.ridge!r}")


# ----------------------------------------------------------------------------------------------
# Expectations of ReLU of Gaussians (the data-free statistics)

_SQRT2 = math.sqrt(2.0)
_GL_X, _GL_W = (torch.as_tensor(v, dtype=torch.float64) for v in np.polynomial.legendre.leggauss(32))


def _pdf(x):
    return torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _cdf(x):
    return 0.5 * (1 + torch.erf(x / _SQRT2))


def relu_mean(mu, sigma):
    """E[ReLU(y)] for y ~ N(mu, sigma^2): mu Phi(mu/sigma) + sigma phi(mu/sigma)."""
    mu, sigma = torch.as_tensor(mu, dtype=torch.float64), torch.as_tensor(sigma, dtype=torch.float64)
    s = sigma.clamp_min(1e-12)
    r = mu / s
    out = mu * _cdf(r) + s * _pdf(r)
    return torch.where(sigma > 1e-12, out, mu.clamp_min(0))


def relu_second_moment(mu, sigma):
    """E[ReLU(y)^2] for y ~ N(mu, sigma^2): (mu^2 + sigma^2) Phi(mu/sigma) + mu sigma phi(mu/sigma)."""
    mu, sigma = torch.as_tensor(mu, dtype=torch.float64), torch.as_tensor(sigma, dtype=torch.float64)
    s = sigma.clamp_min(1e-12)
    r = mu / s
    out = (mu * mu + s * s) * _cdf(r) + mu * s * _pdf(r)
    return torch.where(sigma > 1e-12, out, mu.clamp_min(0) ** 2)


def relu_cross_moment(mu1, s1, mu2, s2, rho):
    """E[ReLU(y1) ReLU(y2)] for jointly Gaussian y1, y2 with correlation rho (broadcasting).

    Write y1 = mu1 + s1 u with u ~ N(0, 1); then y2 | u ~ N(mu2 + s2 rho u, s2^2 (1 - rho^2)), so
    E[ReLU(y2) | u] is :func:`relu_mean`, and the remaining 1-D integral over the half-line where
    y1 > 0 is smooth and done with 32-point Gauss-Legendre.  rho = 0 gives E[a1] E[a2].
    """
    mu1, s1, mu2, s2, rho = torch.broadcast_tensors(*(torch.as_tensor(v, dtype=torch.float64)
                                                      for v in (mu1, s1, mu2, s2, rho)))
    rho = rho.clamp(-1.0, 1.0)
    s1c = s1.clamp_min(1e-12)
    lo = (-mu1 / s1c).clamp(-12.0, 12.0)
    hi = torch.full_like(lo, 12.0)
    half = (hi - lo)[..., None] / 2
    u = lo[..., None] + half * (_GL_X + 1)
    w = half * _GL_W
    y1 = mu1[..., None] + s1[..., None] * u
    cond = relu_mean(mu2[..., None] + s2[..., None] * rho[..., None] * u,
                     s2[..., None] * torch.sqrt((1 - rho * rho).clamp_min(0))[..., None])
    val = (w * y1.clamp_min(0) * cond * _pdf(u)).sum(-1)
    # degenerate first variable (sigma1 = 0): ReLU(mu1) E[ReLU(y2)]
    return torch.where(s1 > 1e-12, val, mu1.clamp_min(0) * relu_mean(mu2, s2))


def _moments_matrix(m_a, s_a, m_b, s_b, rho):
    """E[ReLU(A_i) ReLU(B_j)] for all (i, j): vectors of means/stds and a correlation matrix (na, nb)."""
    return relu_cross_moment(m_a[:, None], s_a[:, None], m_b[None, :], s_b[None, :], rho)


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    an = a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)
    bn = b / b.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (an @ bn.T).clamp(-1, 1)


@dataclass
class Compensation:
    S: torch.Tensor  # (N, R) channel mixing for the next layer: W' = W S
    t: torch.Tensor  # (N,) constant term: b' = b + W t
    M: torch.Tensor  # (N, N) residual E[(a - S a~ - t)(...)^T] with compensation
    M0: torch.Tensor  # (N, N) residual without compensation (a~ used in place of a, pruned = 0)
    Eaa: torch.Tensor  # (N, N) E[a a^T]


def solve_compensation(w: torch.Tensor, q: torch.Tensor, keep: torch.Tensor, gamma, beta, running_var, eps,
                       mean_shift: torch.Tensor | None = None, correlation: str = "independent",
                       bias_correction: bool = True, ridge: float = 1e-4, merge: str = "all") -> Compensation:
    """Closed-form UDFC compensation for one BN+ReLU channel set.

    ``w``: (N, d) original filters of layer l; ``q``: (R, d) damaged (quantized, or equal) filters of the
    kept channels ``keep`` (R indices into N); BN parameters of length N; ``mean_shift``: (R,) shift of the
    pre-BN mean of each kept channel caused by quantization (``(q - w) . E[x]``), or None.
    ``merge="single"``: each row of ``[S t]`` may use one damaged channel (its own if kept, else the kept
    channel of largest sign-corrected filter cosine) and the constant; the same normal equations, restricted.
    """
    w = w.detach().double().reshape(w.shape[0], -1)
    q = q.detach().double().reshape(q.shape[0], -1)
    keep = torch.as_tensor(keep, dtype=torch.long)
    g, b = gamma.detach().double(), beta.detach().double()
    var = running_var.detach().double()
    rstd = 1.0 / torch.sqrt(var + eps)
    # original BN outputs y_i ~ N(beta_i, (gamma_i std_i / sqrt(var_i + eps))^2)
    m_a = b
    s_a = g.abs() * torch.sqrt(var) * rstd
    # damaged kept channels
    gk, rk = g[keep], rstd[keep]
    ratio = q.norm(dim=1) / w[keep].norm(dim=1).clamp_min(1e-12)
    m_d = b[keep] + (gk * mean_shift.double() * rk if mean_shift is not None else 0.0)
    s_d = s_a[keep] * ratio
    sg = torch.sign(g)
    sg[sg == 0] = 1
    same = keep[None, :] == torch.arange(w.shape[0])[:, None]  # (N, R): original i is kept channel j
    r_wq = _cos(w, q) * sg[:, None] * sg[keep][None, :]  # (N, R) pre-activation correlation from filters
    if correlation == "weights":
        r_aa = _cos(w, w) * sg[:, None] * sg[None, :]
        r_ad = r_wq
        r_dd = _cos(q, q) * sg[keep][:, None] * sg[keep][None, :]
    else:
        n = w.shape[0]
        r_aa = torch.eye(n, dtype=torch.float64)
        r_ad = r_wq * same
        r_dd = torch.eye(len(keep), dtype=torch.float64)
    Ea = relu_mean(m_a, s_a)
    Ed = relu_mean(m_d, s_d)
    Eaa = _moments_matrix(m_a, s_a, m_a, s_a, r_aa)
    Eaa.diagonal().copy_(relu_second_moment(m_a, s_a))
    Ead = _moments_matrix(m_a, s_a, m_d, s_d, r_ad)
    Edd = _moments_matrix(m_d, s_d, m_d, s_d, r_dd)
    Edd.diagonal().copy_(relu_second_moment(m_d, s_d))
    R = len(keep)
    if bias_correction:
        G = torch.zeros(R + 1, R + 1, dtype=torch.float64)
        G[:R, :R], G[:R, R], G[R, :R], G[R, R] = Edd, Ed, Ed, 1.0
        C = torch.cat([Ead, Ea[:, None]], 1)
    else:
        G, C = Edd, Ead
    lam = ridge * float(torch.diagonal(G).mean()) if G.numel() else 0.0
    Greg = G + lam * torch.eye(G.shape[0], dtype=torch.float64)
    if merge == "single":  # one damaged channel j per row (+ the constant): a k x k solve per row
        j = torch.where(same.any(1), same.double().argmax(1), r_wq.argmax(1))
        idx = torch.stack([j, torch.full_like(j, R)], 1) if bias_correction else j[:, None]  # (N, k)
        x = torch.linalg.solve(Greg[idx[:, :, None], idx[:, None, :]], C.gather(1, idx))
        St = torch.zeros_like(C).scatter_(1, idx, x)
    else:
        St = torch.linalg.solve(Greg, C.T).T  # (N, R[+1])
    M = Eaa - St @ C.T - C @ St.T + St @ G @ St.T
    S0 = torch.zeros_like(St)
    S0[keep, torch.arange(R)] = 1.0
    M0 = Eaa - S0 @ C.T - C @ S0.T + S0 @ G @ S0.T
    S = St[:, :R]
    t = St[:, R] if bias_correction else torch.zeros(w.shape[0], dtype=torch.float64)
    return Compensation(S, t, M, M0, Eaa)


def next_layer_error(W: torch.Tensor, M: torch.Tensor) -> float:
    """E||W e||^2 summed over kernel positions, for an error e with second moment M (N, N)."""
    Wd = W.detach().double()
    Wp = Wd.reshape(Wd.shape[0], Wd.shape[1], -1).permute(2, 0, 1)  # (pos, O, N)
    return float(torch.einsum("poi,ij,poj->", Wp, M, Wp))


# ----------------------------------------------------------------------------------------------
# Quantization (symmetric, per channel or per tensor; 5-7 bits in an 8-bit container)

def quantize_weight(w: torch.Tensor, bits: int, granularity: str) -> tuple[QuantWeight, torch.Tensor]:
    """RTN with abs-max scales; returns the packed weight and its dequantized float tensor."""
    if bits in NATIVE_BITS:
        spec = QuantSpec(bits, True, granularity, None)
        qw = QuantWeight.from_float(w, spec)
        return qw, qw.dequantize()
    spec = QuantSpec(8, True, granularity, None)
    qmax = 2 ** (bits - 1) - 1
    wf = w.detach().float()
    rows = wf.reshape(wf.shape[0], -1) if granularity == "per_channel" else wf.reshape(1, -1)
    scale = (rows.abs().amax(dim=1, keepdim=True) / qmax).clamp_min(1e-8)
    codes = torch.round(rows / scale).clamp(-qmax - 1, qmax).to(torch.int32).reshape(w.shape)
    qw = QuantWeight.from_codes(codes, scale, torch.zeros_like(scale), spec)
    return qw, qw.dequantize()


# ----------------------------------------------------------------------------------------------
# Graph rewriting helpers

def _matches(name: str, globs) -> bool:
    return any(fnmatch.fnmatchcase(name, g) or fnmatch.fnmatchcase(name.split(".")[-1], g) for g in globs)


def _set_module(gm: fx.GraphModule, path: str, m: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    setattr(gm.get_submodule(parent_path) if parent_path else gm, attr, m)


def _float_layer_like(old: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    if type(old) is nn.Conv2d:
        new = nn.Conv2d(weight.shape[1], weight.shape[0], old.kernel_size, old.stride, old.padding, old.dilation,
                        1, bias is not None, old.padding_mode)
    else:
        new = nn.Linear(weight.shape[1], weight.shape[0], bias is not None)
    new = new.to(device=weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    new.train(old.training)
    return new


def _quant_layer_like(old: nn.Module, qw: QuantWeight, bias: torch.Tensor | None) -> nn.Module:
    if type(old) is nn.Conv2d:
        return QuantConv2d(qw, bias, old.stride, old.padding, old.dilation, old.groups)
    return QuantLinear(qw, bias)


def _bn_subset(bn: nn.Module, keep: torch.Tensor) -> nn.Module:
    new = type(bn)(len(keep), bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    new = new.to(device=bn.running_mean.device, dtype=bn.running_mean.dtype)
    with torch.no_grad():
        if bn.affine:
            new.weight.copy_(bn.weight[keep])
            new.bias.copy_(bn.bias[keep])
        new.running_mean.copy_(bn.running_mean[keep])
        new.running_var.copy_(bn.running_var[keep])
        new.num_batches_tracked.copy_(bn.num_batches_tracked)
    new.train(bn.training)
    return new


def _input_mean(gm: fx.GraphModule, node: fx.Node, layer: nn.Module) -> torch.Tensor | None:
    """E[x] per flattened weight element when the layer reads ReLU(BatchNorm(.)) directly, else None."""
    x = node.args[0] if node.args else None
    if not isinstance(x, fx.Node) or not is_relu(gm, x) or not x.args or not isinstance(x.args[0], fx.Node):
        return None
    bn_node = x.args[0]
    if bn_node.op != "call_module":
        return None
    bn = gm.get_submodule(bn_node.target)
    if not isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d)) or not bn.affine or bn.running_var is None:
        return None
    var = bn.running_var.double()
    std = bn.weight.double().abs() * torch.sqrt(var / (var + bn.eps))
    m = relu_mean(bn.bias.double(), std)
    w = layer.weight
    if m.numel() != w.shape[1]:
        return None
    return m.reshape(-1, *([1] * (w.dim() - 2))).expand(*w.shape[1:]).reshape(-1)


def _scores(w: torch.Tensor, criterion: str) -> torch.Tensor:
    flat = w.detach().reshape(w.shape[0], -1).float()
    return flat.abs().sum(1) if criterion == "l1" else flat.norm(dim=1)


def _n_keep(n: int, ratio: float) -> int:
    return max(1, n - int(math.floor(ratio * n + 1e-9)))


def udfc_pass(gm, config: UDFCConfig = UDFCConfig(), *, progress: bool = False, on_noop: str = "raise") -> PassResult:
    """Prune + quantize + compensate every eligible Conv2d / Linear of ``gm`` (not modified: a copy is).

    ``gm``: a GraphModule or a ``torch.export.ExportedProgram`` (then ``PassResult.gm`` is one too; its ATen
    conv / batch_norm / linear nodes are read as modules first). Raises :class:`NothingToCompressError` when
    no layer changes (``on_noop="warn"`` warns).
    """
    if not isinstance(config, UDFCConfig):
        raise ValueError(f"udfc_pass needs a UDFCConfig, got {type(config).__name__}")
    if not isinstance(gm, (fx.GraphModule, torch.export.ExportedProgram)):
        raise ValueError(f"udfc_pass needs a torch.fx.GraphModule (see fxcompress.capture) or an ExportedProgram, "
                         f"got {type(gm).__name__}")
    res = apply_pass(gm, "udfc", lambda g: _udfc_rewrite(modularize(g), config, progress=progress))
    return check_modified(res, on_noop, "see the notes: skipped layers (config.skip, depthwise convs) and "
                                        "layers without BatchNorm+ReLU chains cannot be pruned")


@torch.no_grad()
def _udfc_rewrite(gm: fx.GraphModule, config: UDFCConfig, *, progress: bool = False) -> PassResult:
    t0 = time.perf_counter()
    chains = analyze(gm)
    report = Report()
    if not chains:
        report.append(LayerReport("(graph)", "-", "skipped", note="no call_module Conv2d/Linear layers found "
                                  "(UDFC works on symbolic_trace graphs)"))
    from tqdm import tqdm

    for name in tqdm(list(chains), desc="udfc", unit="layer", disable=not progress):
        ch: Chain = chains[name]
        layer = gm.get_submodule(name)
        op = "conv2d" if type(layer) is nn.Conv2d else "linear"
        w = layer.weight.detach()
        shape_before = tuple(w.shape)
        if _matches(name, config.skip):
            report.append(LayerReport(name, op, "skipped", None, shape_before, shape_before, "in config.skip"))
            continue
        if type(layer) is nn.Conv2d and (layer.groups != 1 or isinstance(layer.padding, str)):
            why = f"grouped/depthwise conv (groups={layer.groups})" if layer.groups != 1 else "string padding"
            report.append(LayerReport(name, op, "skipped", None, shape_before, shape_before, why))
            continue
        notes = []
        n_out = w.shape[0]
        keep = torch.arange(n_out)
        pruned = False
        if config.prune and config.prune_ratio > 0:
            if ch.prunable:
                k = _n_keep(n_out, config.prune_ratio)
                if k < n_out:
                    keep = torch.sort(torch.topk(_scores(w, config.criterion), k).indices).values
                    pruned = True
            else:
                why = ch.prune_blocker
                if ch.tied_with:
                    why += f"; channel group tied by a residual add with {', '.join(ch.tied_with)}"
                notes.append(f"not pruned: {why}")
        qw = None
        wk = w[keep]
        q = wk
        if config.quantize:
            qw, q = quantize_weight(wk, config.weight_bits, config.granularity)
            q = q.to(w.dtype)
            if config.weight_bits not in NATIVE_BITS:
                notes.append(f"{config.weight_bits}-bit codes in an 8-bit container")
        damaged = pruned or config.quantize
        comp_applied = False
        bn = gm.get_submodule(ch.bn) if ch.bn else None
        if damaged and ch.compensable and bn is not None and bn.affine:
            shift = None
            mx = _input_mean(gm, ch.node, layer) if config.quantize else None
            if mx is not None:
                shift = (q.reshape(len(keep), -1).double() - wk.reshape(len(keep), -1).double()) @ mx
            comp = solve_compensation(w, q, keep, bn.weight, bn.bias, bn.running_var, bn.eps, shift,
                                      config.correlation, config.bias_correction, config.ridge, config.merge)
            errs = []
            for cname in ch.consumers:
                cons = gm.get_submodule(cname)
                W = cons.weight.detach()
                e_sig = next_layer_error(W, comp.Eaa)
                e0 = next_layer_error(W, comp.M0) / max(e_sig, 1e-30)
                e1 = next_layer_error(W, comp.M) / max(e_sig, 1e-30)
                if config.compensate:
                    S = comp.S.to(W.dtype)
                    Wn = torch.einsum("oi...,ij->oj...", W, S)
                    shift_b = torch.einsum("oi...,i->o", W.double(), comp.t).to(W.dtype)
                    bias = cons.bias.detach() + shift_b if cons.bias is not None else shift_b
                    if not config.bias_correction and cons.bias is None:
                        bias = None
                    _set_module(gm, cname, _float_layer_like(cons, Wn, bias))
                    errs.append(f"{cname}: est. rel. err {e1:.3g} (uncompensated {e0:.3g})")
                else:
                    _set_module(gm, cname, _float_layer_like(cons, W[:, keep], cons.bias))
                    errs.append(f"{cname}: est. rel. err {e0:.3g} (no compensation)")
            comp_applied = config.compensate
            notes.append(("compensated into " if comp_applied else "") + "; ".join(errs))
            if comp_applied and ch.other_users:
                notes.append("partial: the activation also feeds " + ", ".join(ch.other_users) +
                             " (not compensated)")
        elif damaged:
            rel = float((q - wk).norm() / wk.norm().clamp_min(1e-12)) if config.quantize else 0.0
            why = ("no BatchNorm after the layer" if ch.bn is None else
                   "no ReLU + Conv2d/Linear consumer after BatchNorm" if not ch.compensable else "BN has no affine")
            notes.append(f"no compensation ({why}); weight rel. err {rel:.3g}")
        # rewrite the layer (and its BatchNorm) physically
        bias = layer.bias.detach()[keep] if layer.bias is not None else None
        if qw is not None:
            _set_module(gm, name, _quant_layer_like(layer, qw, bias))
        elif pruned:
            _set_module(gm, name, _float_layer_like(layer, wk, bias))
        if pruned and bn is not None:
            _set_module(gm, ch.bn, _bn_subset(bn, keep))
        shape_after = (len(keep),) + shape_before[1:]
        # in-channels may have shrunk earlier (as a consumer); report the current input width
        cur = gm.get_submodule(name)
        in_now = cur.weight_shape[1] if hasattr(cur, "weight_shape") else cur.weight.shape[1]
        shape_after = (shape_after[0], in_now) + shape_after[2:]
        action = "+".join(a for a, on in (("pruned", pruned), ("quantized", qw is not None)) if on) or "unchanged"
        if pruned:
            notes.insert(0, f"kept {len(keep)}/{n_out} channels ({config.criterion})")
        notes.insert(0, f"compensation: {'yes' if comp_applied else 'no'}")
        report.append(LayerReport(name, op, action, config.weight_bits if qw is not None else None,
                                  shape_before, shape_after, "; ".join(notes)))
    gm.graph.lint()
    gm.recompile()
    gm.meta["udfc_seconds"] = time.perf_counter() - t0
    return record(gm, "udfc", report)


def udfc(model, example_inputs=None, config: UDFCConfig = UDFCConfig(), *, progress: bool = False,
         on_noop: str = "raise"):
    """Capture ``model`` (a copy) and run :func:`udfc_pass`; returns the compressed model
    (an ExportedProgram for an ExportedProgram, else a GraphModule)."""
    from ..capture import capture

    if isinstance(model, nn.Module) and not isinstance(model, fx.GraphModule):
        model = capture(model, example_inputs)
    return udfc_pass(model, config, progress=progress, on_noop=on_noop).gm


# ----------------------------------------------------------------------------------------------
# Command line: ``fxcompress udfc --model digits --prune 0.3 --bits 6 --out DIR``
