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
inductor-compiled kernels (dynamic shapes: one compile for all weight shapes); elsewhere, and
inside a user's torch.compile trace, as eager ops.

Where the time goes (vs plain LoRA): LoRA's backward needs no (out x in) weight gradient, L4Q's
does (dL/dα, dL/dβ and the clip-masked LoRA gradients all need dL/dWq = gᵀx), so every L4Q
layer runs three token-sized GEMMs per step (forward, dL/dx, dL/dWq) where LoRA runs two.  That
GEMM is the algorithm, not overhead; the rest (merge + quantize twice, masks, reductions) is a
few passes over the weights.
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
    return torch.addmm(w0.to(dt), (lora_b * lora_scale).to(dt), lora_a.to(dt))  # as the fused op rounds it


def quantized_weight(w, scale, offset, qmin, qmax, group_size):
    """Fake-quantized W (float32, W's shape); ``scale``/``offset`` are (out, groups)."""
    out_f, in_f = w.shape
    gl = in_f if group_size is None else group_size
    wg = w.reshape(out_f, in_f // gl, gl)
    off = None if offset is None else offset.to(w.dtype).unsqueeze(-1)
    return lsq_forward(wg, scale.to(w.dtype).unsqueeze(-1), off, qmin, qmax).reshape(out_f, in_f)


def _grouped_v(w0, lora_a, lora_b, scale, offset, group_size, merge_by_sum: bool):
    """v = (W0 + B'·A - β) / α as a fresh (out, groups, group_len) tensor in the accumulation dtype.

    ``lora_b`` arrives already multiplied by the LoRA scale (B' = s·B).  ``merge_by_sum`` writes B'·A
    as a broadcast sum over the rank: under inductor that becomes one kernel that reads W0 once and
    never materialises an fp32 (out, in) copy of W0 or of B'·A (used only in the compiled path; in
    eager it would allocate (out, r, in))."""
    dt = acc_dtype(w0)
    if lora_a is None:
        w = w0.to(dt, copy=True)
    elif merge_by_sum:
        w = w0.to(dt) + (lora_b.to(dt).unsqueeze(-1) * lora_a.to(dt).unsqueeze(0)).sum(1)
    else:
        w = torch.addmm(w0.to(dt), lora_b.to(dt), lora_a.to(dt))
    out_f, in_f = w.shape
    gl = in_f if group_size is None else group_size
    v = w.reshape(out_f, in_f // gl, gl)
    s3 = scale.to(w.dtype).unsqueeze(-1)
    if offset is not None:
        v = v - offset.to(w.dtype).unsqueeze(-1)
    return v / s3, s3


def _dequant_codes(v, s3, offset, qmin, qmax, dtype):
    """round(clamp(v)) · α + β, cast to the activation dtype, shaped (out, in)."""
    q = torch.round(v).clamp(qmin, qmax) * s3
    if offset is not None:
        q = q + offset.to(q.dtype).unsqueeze(-1)
    return q.reshape(v.shape[0], -1).to(dtype)


def _forward_weight(w0, lora_a, lora_b, scale, offset, qmin, qmax, group_size, dtype, merge_by_sum=False):
    """Q(W0 + B'·A) in ``dtype``, shaped (out, in): the forward's only weight-sized work."""
    v, s3 = _grouped_v(w0, lora_a, lora_b, scale, offset, group_size, merge_by_sum)
    return _dequant_codes(v, s3, offset, qmin, qmax, dtype)


def _backward_weight(w0, lora_a, lora_b, scale, offset, gwq, qmin, qmax, group_size, need_wq: bool, dtype,
                     merge_by_sum=False):
    """From dL/dWq (out, in): (Wq or None, dL/dW masked (out, in) in ``dtype``, Σ_group dL/dWq·r,
    Σ_group dL/dWq·outside or None) with one recompute of W; LSQ's gradient scale is applied by the caller.

    The reductions accumulate in fp32; the masked weight gradient is handed back in the activation
    dtype, since it only feeds the two rank-r GEMMs (bf16 halves that (out, in) write and its reads)."""
    v, s3 = _grouped_v(w0, lora_a, lora_b, scale, offset, group_size, merge_by_sum)
    out_f, ng, gl = v.shape
    wq = _dequant_codes(v, s3, offset, qmin, qmax, dtype) if need_wq else None
    gw = gwq.to(v.dtype).reshape(out_f, ng, gl)
    below, above = v < qmin, v > qmax
    r = torch.round(v) - v  # round(v) - v inside the clip range, Qn / Qp outside
    r = torch.where(below, float(qmin), torch.where(above, float(qmax), r))
    g_scale = (gw * r).sum(-1)
    outside = below | above
    g_off = (gw * outside).sum(-1) if offset is not None else None
    grad_w = torch.where(outside, 0.0, gw).reshape(out_f, ng * gl).to(dtype)
    return wq, grad_w, g_scale, g_off


_COMPILED: dict = {}


def compiled_kernel(fn, backend="inductor"):
    """``fn`` under torch.compile with dynamic shapes: one compiled kernel serves every weight shape
    (with static shapes each new (out, in) recompiled, and after dynamo's recompile_limit (8) — a
    model with many shapes, e.g. SmolLM2's 576/1536 projections — the kernel silently fell back to
    eager).  Python floats (LoRA scale, LSQ gradient scale) stay outside the kernel, since dynamo
    specialises on float values; what remains in the guards is dtype, which optional tensors are
    None, ``need_wq`` and the bit range."""
    key = (fn, backend if isinstance(backend, str) else id(backend))
    if key not in _COMPILED:
        compiled = torch.compile(fn, dynamic=True, backend=backend)

        def call(*args):
            # dynamo keeps nn.Parameter shapes static whatever ``dynamic`` says
            # (torch._dynamo.config.force_parameter_static_shapes): W0, A, the step sizes and offsets
            # arrive here as Parameters, so each weight shape recompiled until the limit and then
            # fell back to eager.  The autograd.Function does its own backward, so plain views do.
            return compiled(*(a.detach() if isinstance(a, torch.nn.Parameter) else a for a in args))

        _COMPILED[key] = call
    return _COMPILED[key]


def _kernel(fn, device: torch.device, compiled: bool):
    """The weight-sized element-wise work: inductor-compiled on CUDA (one fused kernel instead of ~20
    passes over each weight), eager elsewhere, when ``compiled`` is False, or inside a user's
    torch.compile trace (which compiles it anyway)."""
    if device.type != "cuda" or not compiled or torch.compiler.is_compiling():
        return fn, False
    return compiled_kernel(fn), True


class L4QLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w0, lora_a, lora_b, scale, offset, bias, lora_scale, qmin, qmax, group_size, grad_scale,
                compiled):
        fn, by_sum = _kernel(_forward_weight, x.device, compiled)
        lb = None if lora_b is None else lora_b * lora_scale  # (out, r): tiny
        wq = fn(w0, lora_a, lb, scale, offset, qmin, qmax, group_size, x.dtype, by_sum)
        ctx.meta = (lora_scale, qmin, qmax, group_size, grad_scale, lora_a is not None, offset is not None,
                    bias is not None, compiled)
        empty = x.new_empty(0)
        ctx.save_for_backward(x, w0, lora_a if lora_a is not None else empty,
                              lora_b if lora_b is not None else empty, scale,
                              offset if offset is not None else empty)
        return torch.nn.functional.linear(x, wq, bias)

    @staticmethod
    def backward(ctx, g):
        x, w0, lora_a, lora_b, scale, offset = ctx.saved_tensors
        lora_scale, qmin, qmax, group_size, grad_scale, has_lora, has_off, has_bias, compiled = ctx.meta
        lora_a = lora_a if has_lora else None
        lora_b = lora_b if has_lora else None
        offset = offset if has_off else None
        out_f, in_f = w0.shape
        g2 = g.reshape(-1, out_f)
        # dL/dWq = gᵀx in the activation dtype (tensor cores for bf16); the quantizer math runs in fp32
        gwq = g2.t() @ x.reshape(-1, in_f)
        need_x = ctx.needs_input_grad[0]
        fn, by_sum = _kernel(_backward_weight, g.device, compiled)
        lb = None if lora_b is None else lora_b * lora_scale
        wq, grad_w, g_scale, g_off = fn(w0, lora_a, lb, scale, offset, gwq, qmin, qmax, group_size, need_x,
                                        g.dtype, by_sum)
        del gwq
        grad_x = g @ wq if need_x else None
        del wq
        grad_a = grad_b = None
        if has_lora:  # rank-r GEMMs in the activation dtype (fp32 accumulation inside the GEMM)
            grad_a = (lb.to(grad_w.dtype).t() @ grad_w).to(lora_a.dtype)
            grad_b = (grad_w @ lora_a.to(grad_w.dtype).t()).to(lora_b.dtype).mul_(lora_scale)
        grad_bias = g2.sum(0) if has_bias and ctx.needs_input_grad[6] else None
        g_off = None if g_off is None else (g_off * grad_scale).to(offset.dtype)
        return (grad_x, None, grad_a, grad_b, (g_scale * grad_scale).to(scale.dtype), g_off, grad_bias,
                None, None, None, None, None, None)


def l4q_linear(x, w0, lora_a, lora_b, scale, offset, bias, lora_scale: float, qmin: int, qmax: int,
               group_size: int | None, grad_scale: float = 1.0, compiled: bool = True):
    """Fused L4Q linear; W0 (and bias) are treated as frozen.  ``compiled=False`` keeps the weight-sized
    work in eager ops on CUDA too (for debugging; CPU is always eager)."""
    return L4QLinearFunction.apply(x, w0, lora_a, lora_b, scale, offset, bias, float(lora_scale), int(qmin),
                                   int(qmax), group_size, float(grad_scale), bool(compiled))


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
