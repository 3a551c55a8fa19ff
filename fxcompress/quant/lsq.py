"""LSQ / LSQ+ fake quantization with the papers' straight-through gradients.

Forward (LSQ+, Bhalgat et al. 2020; LSQ is the case ``offset is None``)::

    v   = (x - offset) / scale
    x_q = clamp(round(v), qmin, qmax) * scale + offset

Backward (straight-through estimator for round):

    dx_q/dx      = 1 if qmin <= v <= qmax else 0
    dx_q/dscale  = round(v) - v inside, qmin below, qmax above
    dx_q/doffset = 0 inside, 1 outside

The scale and offset gradients are multiplied by ``grad_scale`` (LSQ uses
``1/sqrt(N * qmax)``, N the number of elements sharing one scale: :func:`lsq_grad_scale`).
Only ``x``, ``scale`` and ``offset`` are saved; everything else is recomputed.
"""
from __future__ import annotations

import math

import torch


def lsq_grad_scale(numel_per_scale: int, qmax: int) -> float:
    """LSQ's step-size gradient scale ``g = 1 / sqrt(N * Qp)``."""
    return 1.0 / math.sqrt(max(1, numel_per_scale) * max(1, qmax))


def _lsq_grads(grad_out, x, scale, offset, qmin, qmax, grad_scale):
    """Gradients of LSQ+ for (x, scale, offset), offset may be None. Shared with the L4Q linear."""
    v = (x - offset) / scale if offset is not None else x / scale
    below, above = v < qmin, v > qmax
    inside = ~(below | above)
    grad_x = grad_out * inside
    ds = torch.where(inside, torch.round(v) - v, torch.where(below, float(qmin), float(qmax)))
    grad_scale_t = (grad_out * ds).sum_to_size(scale.shape) * grad_scale
    grad_offset_t = None
    if offset is not None:
        grad_offset_t = (grad_out * (~inside)).sum_to_size(offset.shape) * grad_scale
    return grad_x, grad_scale_t, grad_offset_t


def lsq_forward(x, scale, offset, qmin: int, qmax: int):
    """The LSQ+ fake-quant value (no autograd semantics of its own)."""
    if offset is None:
        return torch.clamp(torch.round(x / scale), qmin, qmax) * scale
    return torch.clamp(torch.round((x - offset) / scale), qmin, qmax) * scale + offset


class LSQFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, offset, qmin, qmax, grad_scale):
        ctx.qrange = (qmin, qmax, grad_scale)
        ctx.has_offset = offset is not None
        ctx.save_for_backward(x, scale, offset if offset is not None else scale.new_empty(0))
        return lsq_forward(x, scale, offset, qmin, qmax)

    @staticmethod
    def backward(ctx, grad_out):
        x, scale, offset = ctx.saved_tensors
        qmin, qmax, gs = ctx.qrange
        gx, gsc, gof = _lsq_grads(grad_out, x, scale, offset if ctx.has_offset else None, qmin, qmax, gs)
        return gx, gsc, gof, None, None, None


def lsq_fake_quant(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, qmin: int, qmax: int,
                   grad_scale: float = 1.0) -> torch.Tensor:
    """LSQ (``offset=None``) or LSQ+ fake quantization; ``scale``/``offset`` broadcast against ``x``."""
    if qmin >= qmax:
        raise ValueError(f"qmin must be < qmax, got qmin={qmin}, qmax={qmax}")
    return LSQFakeQuant.apply(x, scale, offset, int(qmin), int(qmax), float(grad_scale))
