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

Work per layer and step, beside the token-sized GEMMs (E = out x in weight elements):

    forward:  B·A (one rank-r GEMM, writes 4E bytes in fp32); one kernel: W0 + s·B·A -> Wq
              (reads W0 and B·A, writes Wq: 8E bytes for bf16 W0)
    backward: dL/dWq = gᵀx (the third token-sized GEMM); B·A again; one kernel: Wq, the masked
              dL/dW, and both group reductions (reads W0, B·A, dL/dWq; writes Wq and dL/dW: 12E);
              two rank-r GEMMs read dL/dW.

On CUDA each of those kernels is one hand-written Triton kernel (``l4q_triton``); elsewhere, and inside a
user's torch.compile trace, the same functions run as eager ops.

Where the time goes (vs plain LoRA): LoRA's backward needs no (out x in) weight gradient, L4Q's
does (dL/dα, dL/dβ and the clip-masked LoRA gradients all need dL/dWq = gᵀx), so every L4Q
layer runs three token-sized GEMMs per step (forward, dL/dx, dL/dWq) where LoRA runs two.  That
GEMM is the algorithm, not overhead; the rest is the few passes over the weights above.
"""
from __future__ import annotations

import torch

from . import l4q_triton
from .lsq import lsq_forward


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    """Quantizer arithmetic runs in float32, or float64 when the weights are float64."""
    return torch.promote_types(t.dtype, torch.float32)


def merged_weight(w0, lora_a, lora_b, lora_scale):
    """A new tensor W0 + s·B·A in the accumulation dtype (callers may modify it in place)."""
    dt = acc_dtype(w0)
    if lora_a is None:
        return w0.to(dt, copy=True)
    return torch.addmm(w0.to(dt), lora_b.to(dt), lora_a.to(dt), alpha=lora_scale)  # as the eager op rounds it


def quantized_weight(w, scale, offset, qmin, qmax, group_size):
    """Fake-quantized W (float32, W's shape); ``scale``/``offset`` are (out, groups)."""
    out_f, in_f = w.shape
    gl = in_f if group_size is None else group_size
    wg = w.reshape(out_f, in_f // gl, gl)
    off = None if offset is None else offset.to(w.dtype).unsqueeze(-1)
    return lsq_forward(wg, scale.to(w.dtype).unsqueeze(-1), off, qmin, qmax).reshape(out_f, in_f)


# The weight kernels below see every weight-shaped tensor as (out·groups, group_len) rows, contiguous,
# and the step sizes / offsets as (out·groups, 1): one quantization group per row, reduced over the last
# dim.  ``w`` is the frozen W0 (any float dtype) and ``ba`` the LoRA product B·A in the accumulation
# dtype, or None when ``w`` is already the merged weight (eager path) or there is no adapter.  These eager
# functions are the reference the Triton kernels (``l4q_triton``) match.


def _v(w, ba, lora_scale, scale, offset):
    """v = (W0 + s·B·A - β) / α in the accumulation dtype, (rows, group_len)."""
    w = w.to(acc_dtype(w)) if ba is None else w.to(ba.dtype) + ba * lora_scale
    if offset is not None:
        w = w - offset
    return w / scale


def _dequant(v, scale, offset, qmin, qmax, dtype):
    """round(clamp(v)) · α + β, cast to the activation dtype."""
    q = torch.round(v).clamp(qmin, qmax) * scale
    if offset is not None:
        q = q + offset
    return q.to(dtype)


def _forward_weight(w, ba, lora_scale, scale, offset, qmin, qmax, dtype):
    """Q(W0 + s·B·A) in ``dtype``, (rows, group_len): the forward's only weight-sized work
    (reads W0 and B·A, writes Wq)."""
    return _dequant(_v(w, ba, lora_scale, scale, offset), scale, offset, qmin, qmax, dtype)


def _backward_weight(w, ba, lora_scale, scale, offset, gwq, grad_scale, qmin, qmax, need_wq: bool, dtype):
    """Everything weight-sized of the backward in one pass over the weights, from dL/dWq (rows, group_len):
    (Wq or None, dL/dW masked, dL/dα (rows, 1), dL/dβ (rows, 1) or None).

    Wq and dL/dW are in the activation ``dtype`` (they only feed GEMMs with activations or the two rank-r
    GEMMs); the group reductions accumulate in the accumulation dtype and carry LSQ's gradient scale."""
    v = _v(w, ba, lora_scale, scale, offset)
    wq = _dequant(v, scale, offset, qmin, qmax, dtype) if need_wq else None
    gw = gwq.to(v.dtype)
    below, above = v < qmin, v > qmax
    r = torch.round(v) - v  # round(v) - v inside the clip range, Qn / Qp outside
    r = torch.where(below, float(qmin), torch.where(above, float(qmax), r))
    g_scale = (gw * r).sum(-1, keepdim=True) * grad_scale
    outside = below | above
    g_off = (gw * outside).sum(-1, keepdim=True) * grad_scale if offset is not None else None
    grad_w = torch.where(outside, 0.0, gw).to(dtype)
    return wq, grad_w, g_scale, g_off


def _kernels(w0: torch.Tensor, group_size: int | None, compiled: bool):
    """(forward_fn, backward_fn, fused): the weight-sized element-wise work as one Triton kernel per direction
    on CUDA (instead of ~20 eager passes over each weight), eager ops elsewhere, when ``compiled`` is False,
    for float64 weights, or inside a user's torch.compile trace (which compiles the eager ops itself)."""
    gl = w0.shape[1] if group_size is None else group_size
    if compiled and not torch.compiler.is_compiling() and l4q_triton.supports(w0.device, acc_dtype(w0), gl):
        return l4q_triton.forward_weight, l4q_triton.backward_weight, True
    return _forward_weight, _backward_weight, False


def _kernel_inputs(w0, lora_a, lora_b, lora_scale, scale, offset, group_size, fused_merge: bool):
    """(w, ba, scale, offset) for the weight kernels, every weight-shaped tensor as (rows, group_len).

    ``fused_merge``: B·A comes from one rank-r GEMM (cuBLAS; (out, in) in the accumulation dtype) and
    W0 + s·B·A is formed inside the weight kernel, which reads W0 in its own dtype; otherwise (eager)
    ``w`` is the merged weight from one addmm.  (A broadcast sum over the rank inside the kernel, the
    earlier variant, became a reduction kernel that loaded r values of B and A for every weight element:
    246 µs a call on an H100 for a write of ~30 MB, ~10 µs of HBM time.)"""
    out_f, in_f = w0.shape
    gl = in_f if group_size is None else group_size
    dt = acc_dtype(w0)
    s2 = scale.to(dt).reshape(-1, 1)
    o2 = None if offset is None else offset.to(dt).reshape(-1, 1)
    if lora_a is None:
        return w0.reshape(-1, gl), None, s2, o2
    if fused_merge:
        return w0.reshape(-1, gl), torch.mm(lora_b.to(dt), lora_a.to(dt)).view(-1, gl), s2, o2
    return torch.addmm(w0.to(dt), lora_b.to(dt), lora_a.to(dt), alpha=lora_scale).view(-1, gl), None, s2, o2


class L4QLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w0, lora_a, lora_b, scale, offset, bias, lora_scale, qmin, qmax, group_size, grad_scale,
                compiled):
        fn, _, fused = _kernels(w0, group_size, compiled)
        w, ba, s2, o2 = _kernel_inputs(w0, lora_a, lora_b, lora_scale, scale, offset, group_size, fused)
        wq = fn(w, ba, lora_scale, s2, o2, qmin, qmax, x.dtype).view(w0.shape)
        del w, ba
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
        _, fn, fused = _kernels(w0, group_size, compiled)
        w, ba, s2, o2 = _kernel_inputs(w0, lora_a, lora_b, lora_scale, scale, offset, group_size, fused)
        wq, grad_w, g_scale, g_off = fn(w, ba, lora_scale, s2, o2, gwq.view(w.shape), grad_scale, qmin, qmax,
                                        need_x, g.dtype)
        del gwq, w, ba
        grad_x = g @ wq.view(w0.shape) if need_x else None
        del wq
        grad_w = grad_w.view(w0.shape)
        grad_a = grad_b = None
        if has_lora:  # rank-r GEMMs in the activation dtype (fp32 accumulation inside the GEMM)
            grad_a = ((lora_b * lora_scale).to(grad_w.dtype).t() @ grad_w).to(lora_a.dtype)
            grad_b = (grad_w @ lora_a.to(grad_w.dtype).t()).to(lora_b.dtype).mul_(lora_scale)
        grad_bias = g2.sum(0) if has_bias and ctx.needs_input_grad[6] else None
        g_scale = g_scale.view(scale.shape).to(scale.dtype)
        g_off = None if g_off is None else g_off.view(offset.shape).to(offset.dtype)
        return (grad_x, None, grad_a, grad_b, g_scale, g_off, grad_bias, None, None, None, None, None, None)


def l4q_linear(x, w0, lora_a, lora_b, scale, offset, bias, lora_scale: float, qmin: int, qmax: int,
               group_size: int | None, grad_scale: float = 1.0, compiled: bool = True):
    """Fused L4Q linear; W0 (and bias) are treated as frozen.  ``compiled=False`` keeps the weight-sized
    work in eager ops on CUDA too instead of the Triton kernels (for debugging; CPU is always eager)."""
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
