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
from .channel_groups import Chain, activation_upper, analyze, is_relu
from .lift_layers import through_zero_pad
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
    ridge: float = 1e-4  # relative ridge on E[d d^T], shrinking [S t] toward no compensation (S = I, t = 0)
    merge: str = "all"  # "all": every channel from all kept ones; "single": from one kept channel (NM-style)
    max_correlated: int = 512  # layers with more channels use correlation="independent" (cost: N^2 integrals)

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
        if isinstance(self.max_correlated, bool) or not isinstance(self.max_correlated, int) \
                or self.max_correlated < 1:
            raise ValueError(f"UDFCConfig.max_correlated must be an int >= 1, got {self.max_correlated!r}")
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


def _t(v):
    return torch.as_tensor(v, dtype=torch.float64)


def clipped_mean(mu, sigma, hi=math.inf):
    """E[clip(y, 0, hi)] for y ~ N(mu, sigma^2) (hi = inf: ReLU, 6: ReLU6).

    With a = -mu/sigma, b = (hi - mu)/sigma: mu (Phi(b) - Phi(a)) + sigma (phi(a) - phi(b)) + hi (1 - Phi(b)).
    """
    mu, sigma = _t(mu), _t(sigma)
    s = sigma.clamp_min(1e-12)
    a = -mu / s
    b = (hi - mu) / s if math.isfinite(hi) else torch.full_like(mu, math.inf)
    out = mu * (_cdf(b) - _cdf(a)) + s * (_pdf(a) - _pdf(b))
    if math.isfinite(hi):
        out = out + hi * (1 - _cdf(b))
    return torch.where(sigma > 1e-12, out, mu.clamp(0, hi))


def clipped_second_moment(mu, sigma, hi=math.inf):
    """E[clip(y, 0, hi)^2] for y ~ N(mu, sigma^2).

    (mu^2 + sigma^2)(Phi(b) - Phi(a)) + 2 mu sigma (phi(a) - phi(b)) + sigma^2 (a phi(a) - b phi(b))
    + hi^2 (1 - Phi(b)), with a, b as in :func:`clipped_mean` (the terms in b vanish for hi = inf).
    """
    mu, sigma = _t(mu), _t(sigma)
    s = sigma.clamp_min(1e-12)
    a = -mu / s
    out = (mu * mu + s * s) * (1 - _cdf(a)) + 2 * mu * s * _pdf(a) + s * s * a * _pdf(a)
    if math.isfinite(hi):
        b = (hi - mu) / s
        out = out - (mu * mu + s * s) * (1 - _cdf(b)) - 2 * mu * s * _pdf(b) - s * s * b * _pdf(b) \
            + hi * hi * (1 - _cdf(b))
    return torch.where(sigma > 1e-12, out, mu.clamp(0, hi) ** 2)


def clipped_cross_moment(mu1, s1, mu2, s2, rho, hi=math.inf):
    """E[clip(y1, 0, hi) clip(y2, 0, hi)] for jointly Gaussian y1, y2 with correlation rho (broadcasting).

    Write y1 = mu1 + s1 u with u ~ N(0, 1); then y2 | u ~ N(mu2 + s2 rho u, s2^2 (1 - rho^2)), so
    E[clip(y2) | u] is :func:`clipped_mean`.  The remaining 1-D integral over u is split where clip(y1)
    has kinks (y1 = 0 and y1 = hi); each smooth piece ([0, hi] where clip(y1) = y1, [hi, inf) where it
    is hi) is done with 32-point Gauss-Legendre.  rho = 0 gives E[a1] E[a2].
    """
    mu1, s1, mu2, s2, rho = torch.broadcast_tensors(*(_t(v) for v in (mu1, s1, mu2, s2, rho)))
    rho = rho.clamp(-1.0, 1.0)
    s1c = s1.clamp_min(1e-12)
    lo = (-mu1 / s1c).clamp(-12.0, 12.0)
    top = torch.full_like(lo, 12.0)
    mid = torch.minimum(torch.maximum((hi - mu1) / s1c, lo), top) if math.isfinite(hi) else top
    csd = (s2 * torch.sqrt((1 - rho * rho).clamp_min(0)))[..., None]

    def piece(u0, u1, linear):
        half = (u1 - u0)[..., None] / 2
        u = u0[..., None] + half * (_GL_X + 1)
        f1 = (mu1[..., None] + s1[..., None] * u).clamp(0, hi) if linear else torch.full_like(u, hi)
        cond = clipped_mean(mu2[..., None] + s2[..., None] * rho[..., None] * u, csd.expand_as(u), hi)
        return (half * _GL_W * f1 * cond * _pdf(u)).sum(-1)

    val = piece(lo, mid, True)
    if math.isfinite(hi):
        val = val + piece(mid, top, False)
    # degenerate first variable (sigma1 = 0): clip(mu1) E[clip(y2)]
    return torch.where(s1 > 1e-12, val, mu1.clamp(0, hi) * clipped_mean(mu2, s2, hi))


def relu_mean(mu, sigma):
    """E[ReLU(y)] for y ~ N(mu, sigma^2): mu Phi(mu/sigma) + sigma phi(mu/sigma)."""
    return clipped_mean(mu, sigma)


def relu_second_moment(mu, sigma):
    """E[ReLU(y)^2] for y ~ N(mu, sigma^2): (mu^2 + sigma^2) Phi(mu/sigma) + mu sigma phi(mu/sigma)."""
    return clipped_second_moment(mu, sigma)


def relu_cross_moment(mu1, s1, mu2, s2, rho):
    """E[ReLU(y1) ReLU(y2)] for jointly Gaussian y1, y2 with correlation rho (see :func:`clipped_cross_moment`)."""
    return clipped_cross_moment(mu1, s1, mu2, s2, rho)


def _moments_matrix(m_a, s_a, m_b, s_b, rho, hi=math.inf, tol: float = 1e-6, rows: int = 32):
    """E[clip(A_i) clip(B_j)] for all (i, j): vectors of means/stds and a correlation matrix (na, nb).

    Pairs with |rho| <= tol are independent (E[A_i] E[B_j], exact); the others are integrated in blocks
    of ``rows`` rows (bounded memory).
    """
    rho = _t(rho).expand(len(m_a), len(m_b))
    out = clipped_mean(m_a, s_a, hi)[:, None] * clipped_mean(m_b, s_b, hi)[None, :]
    ii, jj = torch.nonzero(rho.abs() > tol, as_tuple=True)
    step = rows * max(1, len(m_b))
    for k in range(0, len(ii), step):
        i, j = ii[k:k + step], jj[k:k + step]
        out[i, j] = clipped_cross_moment(m_a[i], s_a[i], m_b[j], s_b[j], rho[i, j], hi)
    return out


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
                       bias_correction: bool = True, ridge: float = 1e-4, merge: str = "all",
                       act_hi: float = math.inf) -> Compensation:
    """Closed-form UDFC compensation for one BN+ReLU channel set.

    ``w``: (N, d) original filters of layer l; ``q``: (R, d) damaged (quantized, or equal) filters of the
    kept channels ``keep`` (R indices into N); BN parameters of length N; ``mean_shift``: (R,) shift of the
    pre-BN mean of each kept channel caused by quantization (``(q - w) . E[x]``), or None.
    ``act_hi``: the activation's clip ceiling (inf: ReLU, 6: ReLU6).
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
    hi = act_hi
    Ea = clipped_mean(m_a, s_a, hi)
    Ed = clipped_mean(m_d, s_d, hi)
    Eaa = _moments_matrix(m_a, s_a, m_a, s_a, r_aa, hi)
    Eaa.diagonal().copy_(clipped_second_moment(m_a, s_a, hi))
    Ead = _moments_matrix(m_a, s_a, m_d, s_d, r_ad, hi)
    Edd = _moments_matrix(m_d, s_d, m_d, s_d, r_dd, hi)
    Edd.diagonal().copy_(clipped_second_moment(m_d, s_d, hi))
    R = len(keep)
    if bias_correction:
        G = torch.zeros(R + 1, R + 1, dtype=torch.float64)
        G[:R, :R], G[:R, R], G[R, :R], G[R, R] = Edd, Ed, Ed, 1.0
        C = torch.cat([Ead, Ea[:, None]], 1)
    else:
        G, C = Edd, Ead
    # no compensation: each kept channel read as it is, a pruned one dropped, no constant
    S0 = torch.zeros_like(C)
    S0[keep, torch.arange(R)] = 1.0
    # ridge toward S0, not toward 0: min E||a - [S t] [d; 1]||^2 + lam ||[S t] - S0||^2, so a channel whose
    # moments carry little signal (mostly clipped, tiny variance: their bivariate integrals are the least
    # accurate) keeps its weight instead of being replaced by its mean
    lam = ridge * float(torch.diagonal(G).mean()) if G.numel() else 0.0
    Greg = G + lam * torch.eye(G.shape[0], dtype=torch.float64)
    Creg = C + lam * S0
    if merge == "single":  # one damaged channel j per row (+ the constant): a k x k solve per row
        j = torch.where(same.any(1), same.double().argmax(1), r_wq.argmax(1))
        idx = torch.stack([j, torch.full_like(j, R)], 1) if bias_correction else j[:, None]  # (N, k)
        x = torch.linalg.solve(Greg[idx[:, :, None], idx[:, None, :]], Creg.gather(1, idx))
        St = torch.zeros_like(C).scatter_(1, idx, x)
    else:
        St = torch.linalg.solve(Greg, Creg.T).T  # (N, R[+1])
    M = Eaa - St @ C.T - C @ St.T + St @ G @ St.T
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


def _float_layer_like(old: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None, groups: int = 1) -> nn.Module:
    if type(old) is nn.Conv2d:
        new = nn.Conv2d(weight.shape[1] * groups, weight.shape[0], old.kernel_size, old.stride, old.padding,
                        old.dilation, groups, bias is not None, old.padding_mode)
    else:
        new = nn.Linear(weight.shape[1], weight.shape[0], bias is not None)
    new = new.to(device=weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    new.train(old.training)
    return new


def _quant_layer_like(old: nn.Module, qw: QuantWeight, bias: torch.Tensor | None, groups: int = 1) -> nn.Module:
    if type(old) is nn.Conv2d:
        return QuantConv2d(qw, bias, old.stride, old.padding, old.dilation, groups)
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


def _bn_act_mean(bn: nn.Module, hi: float) -> torch.Tensor | None:
    """E[act(BN(.))] per channel from the BN parameters alone (Gaussian model), or None without affine stats."""
    if not isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d)) or not bn.affine or bn.running_var is None:
        return None
    var = bn.running_var.double()
    std = bn.weight.double().abs() * torch.sqrt(var / (var + bn.eps))
    return clipped_mean(bn.bias.double(), std, hi)


def _filter_input_mean(m: torch.Tensor, w: torch.Tensor, groups: int) -> torch.Tensor | None:
    """Per-filter E[x] for each flattened weight element (N, d), given the per-input-channel mean ``m``."""
    if m.numel() != w.shape[1] * groups:
        return None
    n_out, cpg = w.shape[0], w.shape[1]
    per_filter = m.reshape(groups, cpg)[torch.arange(n_out) // (n_out // groups)]  # (N, cpg)
    return per_filter.reshape(n_out, cpg, *([1] * (w.dim() - 2))).expand(*w.shape).reshape(n_out, -1)


def _input_mean(gm: fx.GraphModule, node: fx.Node, layer: nn.Module) -> torch.Tensor | None:
    """E[x] per filter and weight element (N, d) when the layer reads act(BatchNorm(.)) directly, else None."""
    x = through_zero_pad(gm, node.args[0]) if node.args else None
    if not isinstance(x, fx.Node) or not is_relu(gm, x) or not x.args or not isinstance(x.args[0], fx.Node):
        return None
    bn_node = x.args[0]
    if bn_node.op != "call_module":
        return None
    m = _bn_act_mean(gm.get_submodule(bn_node.target), activation_upper(gm, x))
    if m is None:
        return None
    return _filter_input_mean(m, layer.weight, getattr(layer, "groups", 1))


def _scores(w: torch.Tensor, criterion: str) -> torch.Tensor:
    flat = w.detach().reshape(w.shape[0], -1).float()
    return flat.abs().sum(1) if criterion == "l1" else flat.norm(dim=1)


def _n_keep(n: int, ratio: float) -> int:
    return max(1, n - int(math.floor(ratio * n + 1e-9)))


NOTE_LIMIT = 120


def _clip_note(s: str, limit: int = NOTE_LIMIT) -> str:
    return s if len(s) <= limit else s[: limit - 3].rstrip() + "..."


def _names(names, limit: int = 2) -> str:
    names = list(names)
    return ", ".join(names[:limit]) + (f" +{len(names) - limit} more" if len(names) > limit else "")


def summarize(report: Report) -> str:
    """One line: how many layers were pruned / quantized / compensated, and why the others were not."""
    rows = list(report)
    pruned = sum("pruned" in r.action for r in rows)
    quant = sum("quantized" in r.action for r in rows)
    comp = sum("compensation: yes" in r.note for r in rows)
    reasons: dict[str, int] = {}
    for r in rows:
        why = None
        if r.action == "skipped":
            why = r.note
        elif "not pruned: " in r.note:
            why = r.note.split("not pruned: ", 1)[1].split(";")[0]
        if why:
            key = why.split(" (")[0].split(":")[0].strip()
            reasons[key] = reasons.get(key, 0) + 1
    line = f"udfc: {len(rows)} layers: {pruned} pruned, {quant} quantized, {comp} compensated"
    if reasons:
        line += "; not pruned/skipped: " + "; ".join(f"{n} x {k}" for k, n in
                                                     sorted(reasons.items(), key=lambda kv: -kv[1]))
    return line


def udfc_pass(gm, config: UDFCConfig = UDFCConfig(), *, progress: bool = False, on_noop: str = "raise") -> PassResult:
    """Prune + quantize + compensate every eligible Conv2d / Linear of ``gm`` (not modified: a copy is).

    ``gm``: a GraphModule or a ``torch.export.ExportedProgram`` (then ``PassResult.gm`` is one too; its ATen
    conv / batch_norm / linear nodes are read as modules first). Raises :class:`NothingToCompressError` when
    no layer changes (``on_noop="warn"`` warns).

    Depthwise convs that follow a prunable producer (inverted residuals) are pruned with it and the
    compensation goes into the layer after the depthwise conv; other grouped convs are quantized (and
    compensated when a BN + ReLU/ReLU6 + Conv/Linear follows) but not pruned.  ``gm.meta["udfc_summary"]``
    holds a one-line summary (counts and the reasons layers were not pruned).
    """
    if not isinstance(config, UDFCConfig):
        raise ValueError(f"udfc_pass needs a UDFCConfig, got {type(config).__name__}")
    if not isinstance(gm, (fx.GraphModule, torch.export.ExportedProgram)):
        raise ValueError(f"udfc_pass needs a torch.fx.GraphModule (see fxcompress.capture) or an ExportedProgram, "
                         f"got {type(gm).__name__}")
    res = apply_pass(gm, "udfc", lambda g: _udfc_rewrite(modularize(g), config, progress=progress))
    return check_modified(res, on_noop, "Enable prune/quantize in UDFCConfig, or see the skipped layers' "
                                        "reasons (config.skip, layers without a BatchNorm + activation chain)")


@torch.no_grad()
def _udfc_rewrite(gm: fx.GraphModule, config: UDFCConfig, *, progress: bool = False) -> PassResult:
    t0 = time.perf_counter()
    chains = analyze(gm)
    report = Report()
    if not chains:
        report.append(LayerReport("(graph)", "-", "skipped", note="no call_module Conv2d/Linear layers found "
                                  "(UDFC works on symbolic_trace graphs)"))
    from tqdm import tqdm

    done: set = set()
    for name in tqdm(list(chains), desc="udfc", unit="layer", disable=not progress):
        if name in done:
            continue
        ch: Chain = chains[name]
        layer = gm.get_submodule(name)
        op = "conv2d" if type(layer) is nn.Conv2d else "linear"
        w = layer.weight.detach()
        shape_before = tuple(w.shape)
        groups = getattr(layer, "groups", 1)
        if _matches(name, config.skip):
            report.append(LayerReport(name, op, "skipped", None, shape_before, shape_before, "in config.skip"))
            continue
        if type(layer) is nn.Conv2d and isinstance(layer.padding, str):
            report.append(LayerReport(name, op, "skipped", None, shape_before, shape_before, "string padding"))
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
                    why += f"; tied by a residual add with {_names(ch.tied_with)}"
                notes.append(f"not pruned: {why}")
        qw = None
        wk = w[keep]
        q = wk
        if config.quantize:
            qw, q = quantize_weight(wk, config.weight_bits, config.granularity)
            q = q.to(w.dtype)
            if config.weight_bits not in NATIVE_BITS:
                notes.append(f"{config.weight_bits}-bit codes in an 8-bit container")
        # the channels the consumers read: the producer's, or those of the depthwise conv after it
        dw = gm.get_submodule(ch.dw) if ch.dw else None
        qdw = None
        if dw is not None:
            wdw = dw.weight.detach()
            w_stat, q_stat = wdw, wdw[keep]
            if config.quantize:
                qdw, q_stat = quantize_weight(wdw[keep], config.weight_bits, config.granularity)
                q_stat = q_stat.to(wdw.dtype)
            m1 = _bn_act_mean(gm.get_submodule(ch.bn), ch.act_hi)
            mx = _filter_input_mean(m1, wdw, dw.groups) if (config.quantize and m1 is not None) else None
            grouped_stat = True
        else:
            w_stat, q_stat = w, q
            mx = _input_mean(gm, ch.node, layer) if config.quantize else None
            grouped_stat = groups != 1
        damaged = pruned or config.quantize
        comp_applied = False
        bn = gm.get_submodule(ch.bn) if ch.bn else None
        bn_stat = gm.get_submodule(ch.stat_bn) if ch.stat_bn else None
        if damaged and ch.compensable and bn_stat is not None and bn_stat.affine:
            shift = None
            if mx is not None:
                wk_stat = w_stat[keep].reshape(len(keep), -1).double()
                shift = ((q_stat.reshape(len(keep), -1).double() - wk_stat) * mx[keep]).sum(1)
            # channels of a grouped conv read different inputs: filter cosines say nothing about them
            corr = "independent" if grouped_stat else config.correlation
            if corr == "weights" and n_out > config.max_correlated:
                corr = "independent"
                notes.append(f"independent channels (N={n_out} > max_correlated)")
            comp = solve_compensation(w_stat, q_stat, keep, bn_stat.weight, bn_stat.bias, bn_stat.running_var,
                                      bn_stat.eps, shift, corr, config.bias_correction, config.ridge, config.merge,
                                      act_hi=ch.stat_hi)
            e_sig = e0 = e1 = 0.0
            for cname in ch.consumers:
                cons = gm.get_submodule(cname)
                W = cons.weight.detach()
                e_sig += next_layer_error(W, comp.Eaa)
                e0 += next_layer_error(W, comp.M0)
                e1 += next_layer_error(W, comp.M)
                if config.compensate:
                    S = comp.S.to(W.dtype)
                    Wn = torch.einsum("oi...,ij->oj...", W, S)
                    shift_b = torch.einsum("oi...,i->o", W.double(), comp.t).to(W.dtype)
                    bias = cons.bias.detach() + shift_b if cons.bias is not None else shift_b
                    if not config.bias_correction and cons.bias is None:
                        bias = None
                    _set_module(gm, cname, _float_layer_like(cons, Wn, bias))
                else:
                    _set_module(gm, cname, _float_layer_like(cons, W[:, keep], cons.bias))
            e0, e1 = e0 / max(e_sig, 1e-30), e1 / max(e_sig, 1e-30)
            comp_applied = config.compensate
            where = _names(ch.consumers, 1)
            notes.append(f"into {where}: rel. err {e1:.3g} (uncompensated {e0:.3g})" if comp_applied
                         else f"{where}: rel. err {e0:.3g} (no compensation)")
            if ch.stat_hi != math.inf or ch.dw:
                notes.append("ReLU6 moments" if ch.stat_hi == 6 else f"clip({ch.stat_hi:g}) moments")
            if comp_applied and ch.other_users:
                notes.append("partial: also feeds " + _names(ch.other_users, 1))
        elif damaged:
            rel = float((q - wk).norm() / wk.norm().clamp_min(1e-12)) if config.quantize else 0.0
            why = ("no BatchNorm after the layer" if ch.bn is None else ch.prune_blocker if ch.relu is None else
                   "no Conv2d/Linear consumer after the activation" if not ch.consumers else "BN has no affine")
            notes.append(f"no compensation ({why}); weight rel. err {rel:.3g}")
        # rewrite the layer (and its BatchNorm, and a depthwise conv after it) physically
        bias = layer.bias.detach()[keep] if layer.bias is not None else None
        if qw is not None:
            _set_module(gm, name, _quant_layer_like(layer, qw, bias, groups))
        elif pruned:
            _set_module(gm, name, _float_layer_like(layer, wk, bias, groups))
        if pruned and bn is not None:
            _set_module(gm, ch.bn, _bn_subset(bn, keep))
        if dw is not None:
            done.add(ch.dw)
            dshape = tuple(dw.weight.shape)
            dbias = dw.bias.detach()[keep] if dw.bias is not None else None
            if qdw is not None:
                _set_module(gm, ch.dw, _quant_layer_like(dw, qdw, dbias, len(keep)))
            elif pruned:
                _set_module(gm, ch.dw, _float_layer_like(dw, wdw[keep], dbias, len(keep)))
            if pruned:
                _set_module(gm, ch.dw_bn, _bn_subset(gm.get_submodule(ch.dw_bn), keep))
            daction = "+".join(a for a, on in (("pruned", pruned), ("quantized", qdw is not None)) if on) or "unchanged"
            report.append(LayerReport(ch.dw, "conv2d", daction, config.weight_bits if qdw is not None else None,
                                      dshape, (len(keep),) + dshape[1:],
                                      _clip_note(f"depthwise: channels follow {name}; "
                                                 f"compensation: {'yes' if comp_applied else 'no'} (with {name})")))
        shape_after = (len(keep),) + shape_before[1:]
        # in-channels may have shrunk earlier (as a consumer); report the current input width
        cur = gm.get_submodule(name)
        in_now = cur.weight_shape[1] if hasattr(cur, "weight_shape") else cur.weight.shape[1]
        shape_after = (shape_after[0], in_now) + shape_after[2:]
        action = "+".join(a for a, on in (("pruned", pruned), ("quantized", qw is not None)) if on) or "unchanged"
        if pruned:
            notes.insert(0, f"kept {len(keep)}/{n_out} ({config.criterion})" + (f" with {ch.dw}" if dw else ""))
        notes.insert(0, f"compensation: {'yes' if comp_applied else 'no'}")
        report.append(LayerReport(name, op, action, config.weight_bits if qw is not None else None,
                                  shape_before, shape_after, _clip_note("; ".join(notes))))
    gm.graph.lint()
    gm.recompile()
    gm.meta["udfc_seconds"] = time.perf_counter() - t0
    gm.meta["udfc_summary"] = summarize(report)
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
