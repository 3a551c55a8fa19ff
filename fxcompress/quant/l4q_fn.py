"""The L4Q linear as one autograd.Function: y = x · Q(W0 + s·B·A)ᵀ + bias, memory-lean.

Only ``x`` and references to the parameters are saved.  The merged weight, its quantized
value and the clip mask are recomputed in backward, so no extra (out x in) tensor lives
between forward and backward — the memory a naive composition keeps for every layer.

Gradients (L4Q, from LSQ+ and the chain rule through the merged weight W = W0 + s·B·A):

    dL/dWq  = gᵀ x                          (g = dL/dy, flattened over batch dims)
    dL/dW   = dL/dWq ⊙ M                    (M: clip mask, straight-through inside)
    dL/dA   = s · Bᵀ dL/dW,   dL/dB = s · dL/dW Aᵀ
    dL/dα   = Σ_group dL/dWq ⊙ (round(v) - v | Qn | Qp),  dL/dβ = Σ_group dL/dWq ⊙ (1 - M)
    dL/dx   = g · Wq

with v = (W - β)/α, and α / β's gradients multiplied by LSQ's gradient scale.
"""
from __future__ import annotations

import torch

from .lsq import lsq_forward


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    """Quantizer arithmetic runs in float32, or float64 when the weights are float64."""
    return torch.promote_types(t.dtype, torch.float32)


def merged_weight(w0, lora_a, lora_b, lora_scale):
    """A new tensor W0 + s·B·A in the accumulation dtype (callers may modify it in place)."""
    dt = acc_dtype(w0)
    if lora_a is None:
        return w0.to(dt, copy=True)
    return torch.addmm(w0.to(dt), lora_b.to(dt), lora_a.to(dt), alpha=lora_scale)


def quantized_weight(w, scale, offset, qmin, qmax, group_size):
    """Fake-quantized W (float32, W's shape); ``scale``/``offset`` are (out, groups)."""
    out_f, in_f = w.shape
    gl = in_f if group_size is None else group_size
    wg = w.reshape(out_f, in_f // gl, gl)
    off = None if offset is None else offset.to(w.dtype).unsqueeze(-1)
    return lsq_forward(wg, scale.to(w.dtype).unsqueeze(-1), off, qmin, qmax).reshape(out_f, in_f)


def _grouped_v(w0, lora_a, lora_b, lora_scale, scale, offset, group_size):
    """v = (W0 + s·B·A - β) / α as a fresh (out, groups, group_len) tensor in the accumulation dtype."""
    w = merged_weight(w0, lora_a, lora_b, lora_scale)
    out_f, in_f = w.shape
    gl = in_f if group_size is None else group_size
    v = w.reshape(out_f, in_f // gl, gl)
    s3 = scale.to(w.dtype).unsqueeze(-1)
    if offset is not None:
        v.sub_(offset.to(w.dtype).unsqueeze(-1))
    return v.div_(s3), s3


def _dequant_codes(v, s3, offset, qmin, qmax, dtype):
    """round(clamp(v)) · α + β, cast to the activation dtype, shaped (out, in)."""
    q = torch.round(v).clamp_(qmin, qmax).mul_(s3)
    if offset is not None:
        q.add_(offset.to(q.dtype).unsqueeze(-1))
    return q.reshape(v.shape[0], -1).to(dtype)


class L4QLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w0, lora_a, lora_b, scale, offset, bias, lora_scale, qmin, qmax, group_size, grad_scale):
        v, s3 = _grouped_v(w0, lora_a, lora_b, lora_scale, scale, offset, group_size)
        wq = _dequant_codes(v, s3, offset, qmin, qmax, x.dtype)
        del v
        ctx.meta = (lora_scale, qmin, qmax, group_size, grad_scale, lora_a is not None, offset is not None,
                    bias is not None)
        empty = x.new_empty(0)
        ctx.save_for_backward(x, w0, lora_a if lora_a is not None else empty,
                              lora_b if lora_b is not None else empty, scale,
                              offset if offset is not None else empty)
        return torch.nn.functional.linear(x, wq, bias)

    @staticmethod
    def backward(ctx, g):
        x, w0, lora_a, lora_b, scale, offset = ctx.saved_tensors
        lora_scale, qmin, qmax, group_size, grad_scale, has_lora, has_off, has_bias = ctx.meta
        lora_a = lora_a if has_lora else None
        lora_b = lora_b if has_lora else None
        offset = offset if has_off else None
        v, s3 = _grouped_v(w0, lora_a, lora_b, lora_scale, scale, offset, group_size)
        out_f, ng, gl = v.shape
        in_f = ng * gl
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = g @ _dequant_codes(v, s3, offset, qmin, qmax, g.dtype)
        g2 = g.reshape(-1, out_f)
        # dL/dWq = gᵀx in the activation dtype (tensor cores for bf16), then the quantizer math in fp32
        gw = (g2.t() @ x.reshape(-1, in_f)).to(v.dtype).reshape(out_f, ng, gl)
        outside = (v < qmin) | (v > qmax)
        r = torch.round(v).sub_(v)  # round(v) - v inside the clip range ...
        r = torch.where(v < qmin, float(qmin), r).masked_fill_(v > qmax, float(qmax))  # ... Qn / Qp outside
        del v
        grad_scale_p = torch.bmm(gw.reshape(-1, 1, gl), r.reshape(-1, gl, 1)).reshape(out_f, ng)
        grad_scale_p = (grad_scale_p * grad_scale).to(scale.dtype)
        del r
        grad_off_p = None
        total = gw.sum(-1) if has_off else None
        gw.masked_fill_(outside, 0.0)  # now dL/dW (straight-through inside the clip range)
        if has_off:
            grad_off_p = ((total - gw.sum(-1)) * grad_scale).to(offset.dtype)
        grad_a = grad_b = None
        if has_lora:
            gw = gw.reshape(out_f, in_f)
            grad_a = (lora_scale * (lora_b.to(gw.dtype).t() @ gw)).to(lora_a.dtype)
            grad_b = (lora_scale * (gw @ lora_a.to(gw.dtype).t())).to(lora_b.dtype)
        grad_bias = g2.sum(0) if has_bias and ctx.needs_input_grad[6] else None
        return (grad_x, None, grad_a, grad_b, grad_scale_p, grad_off_p, grad_bias, None, None, None, None, None)


def l4q_linear(x, w0, lora_a, lora_b, scale, offset, bias, lora_scale: float, qmin: int, qmax: int,
               group_size: int | None, grad_scale: float = 1.0):
    """Fused L4Q linear; W0 (and bias) are treated as frozen."""
    return L4QLinearFunction.apply(x, w0, lora_a, lora_b, scale, offset, bias, float(lora_scale), int(qmin),
                                   int(qmax), group_size, float(grad_scale))


def l4q_linear_naive(x, w0, lora_a, lora_b, scale, offset, bias, lora_scale, qmin, qmax, group_size,
                     grad_scale=1.0):
    """The same computation composed of autograd ops (the reference; keeps W, Wq and masks alive)."""
    from .lsq import lsq_fake_quant

    dt = acc_dtype(w0)
    w = w0.to(dt) if lora_a is None else w0.to(dt) + lora_scale * (lora_b.to(dt) @ lora_a.to(dt))
    out_f, in_f = w.shape
    gl = in_f if group_size is None else group_size
    wq = lsq_fake_quant(w.reshape(out_f, in_f // gl, gl), scale.to(dt).unsqueeze(-1),
                        None if offset is None else offset.to(dt).unsqueeze(-1), qmin, qmax, grad_scale)
    return torch.nn.functional.linear(x, wq.reshape(out_f, in_f).to(x.dtype), bias)
