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

On CUDA the weight-sized element-wise work (merge, quantize, masks, reductions) runs as
inductor-compiled kernels; elsewhere, and inside a user's torch.compile trace, as eager ops.
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


def _forward_weight(w0, lora_a, lora_b, lora_scale, scale, offset, qmin, qmax, group_size, dtype):
    """Q(W0 + s·B·A) in ``dtype``, shaped (out, in): the forward's only weight-sized work."""
    v, s3 = _grouped_v(w0, lora_a, lora_b, lora_scale, scale, offset, group_size)
    return _dequant_codes(v, s3, offset, qmin, qmax, dtype)


def _backward_weight(w0, lora_a, lora_b, lora_scale, scale, offset, gwq, qmin, qmax, group_size, grad_scale,
                     need_wq: bool, dtype):
    """From dL/dWq (out, in): (Wq or None, dL/dW masked (out, in), dL/dα, dL/dβ or None), one recompute of W."""
    v, s3 = _grouped_v(w0, lora_a, lora_b, lora_scale, scale, offset, group_size)
    out_f, ng, gl = v.shape
    wq = _dequant_codes(v, s3, offset, qmin, qmax, dtype) if need_wq else None
    gw = gwq.to(v.dtype).reshape(out_f, ng, gl)
    below, above = v < qmin, v > qmax
    r = torch.round(v) - v  # round(v) - v inside the clip range, Qn / Qp outside
    r = torch.where(below, float(qmin), torch.where(above, float(qmax), r))
    g_scale = (gw * r).sum(-1) * grad_scale
    outside = below | above
    g_off = (gw * outside).sum(-1) * grad_scale if offset is not None else None
    grad_w = torch.where(outside, 0.0, gw).reshape(out_f, ng * gl)
    return wq, grad_w, g_scale, g_off


_COMPILED: dict = {}


def _kernel(fn, device: torch.device):
    """``fn`` compiled with inductor on CUDA (one fused kernel instead of ~20 element-wise passes over
    each weight), plain eager elsewhere or when already inside a torch.compile trace."""
    if device.type != "cuda" or not USE_COMPILED_KERNELS or torch.compiler.is_compiling():
        return fn
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn]


USE_COMPILED_KERNELS = True  # set False to debug with eager kernels on CUDA


class L4QLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w0, lora_a, lora_b, scale, offset, bias, lora_scale, qmin, qmax, group_size, grad_scale):
        wq = _kernel(_forward_weight, x.device)(w0, lora_a, lora_b, lora_scale, scale, offset, qmin, qmax,
                                                  group_size, x.dtype)
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
        out_f, in_f = w0.shape
        g2 = g.reshape(-1, out_f)
        # dL/dWq = gᵀx in the activation dtype (tensor cores for bf16); the quantizer math runs in fp32
        gwq = g2.t() @ x.reshape(-1, in_f)
        need_x = ctx.needs_input_grad[0]
        wq, grad_w, g_scale, g_off = _kernel(_backward_weight, g.device)(
            w0, lora_a, lora_b, lora_scale, scale, offset, gwq, qmin, qmax, group_size, grad_scale, need_x, g.dtype)
        del gwq
        grad_x = g @ wq if need_x else None
        del wq
        grad_a = grad_b = None
        if has_lora:
            grad_a = (lora_scale * (lora_b.to(grad_w.dtype).t() @ grad_w)).to(lora_a.dtype)
            grad_b = (lora_scale * (grad_w @ lora_a.to(grad_w.dtype).t())).to(lora_b.dtype)
        grad_bias = g2.sum(0) if has_bias and ctx.needs_input_grad[6] else None
        return (grad_x, None, grad_a, grad_b, g_scale.to(scale.dtype),
                g_off.to(offset.dtype) if g_off is not None else None, grad_bias, None, None, None, None, None)


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
