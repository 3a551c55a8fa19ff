"""The L4Q weight kernels in Triton: one launch per direction, called directly.

Same contract and numbers as ``l4q_fn._forward_weight`` / ``l4q_fn._backward_weight`` (the eager reference):
every weight-shaped tensor is (rows, group_len) contiguous, one quantization group per row; the step sizes /
offsets are (rows, 1) float32; ``ba`` is the LoRA product B·A in float32 or None.  The arithmetic follows the
eager ops one rounding at a time (no FMA contraction, IEEE division, round half to even), so Wq and the masked
dL/dW are bit-equal to eager; the group sums differ only in summation order.

Why Triton by hand and not ``torch.compile``: a compiled call costs the host ~0.3 ms (dynamo guards on dynamic
shapes, argument packing, the generated wrapper), and a training step calls the weight kernels twice per
adapted linear: at 28 linears the GPU idled ~20 ms of a 62 ms step waiting for the host.  A Triton launch costs
tens of µs.
"""
from __future__ import annotations

import torch

# Rounding inside the kernels is half to even by the float32 magic number, (v + 1.5·2^23) - 1.5·2^23, exact
# for |v| < 2^22 (larger |v| are clipped to the bit range anyway); libdevice's rint does not run in Triton's
# CPU interpreter, which the CPU tests use.
_MAX_BLOCK = 32768  # the largest group (per-channel: in_features) one program holds


try:  # Triton ships with CUDA builds of torch; without it (CPU torch) the eager reference runs
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:  # Triton resolves a kernel's callees among the module's globals
    @triton.jit
    def _v(W, BA, S, O, rows, offs, rmask, mask, lora_scale, HAS_BA: tl.constexpr, HAS_OFF: tl.constexpr):
        w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_BA:
            w = w + tl.load(BA + offs, mask=mask, other=0.0) * lora_scale
        s = tl.load(S + rows, mask=rmask, other=1.0)[:, None]
        o = tl.zeros_like(s)
        if HAS_OFF:
            o = tl.load(O + rows, mask=rmask, other=0.0)[:, None]
            w = w - o
        return tl.math.div_rn(w, s), s, o

    @triton.jit
    def _dequant(v, s, o, qmin, qmax, HAS_OFF: tl.constexpr):
        q = (v + 12582912.0) - 12582912.0
        q = tl.minimum(tl.maximum(q, qmin), qmax) * s
        if HAS_OFF:
            q = q + o
        return q

    @triton.jit
    def forward_kernel(W, BA, S, O, WQ, n_rows, lora_scale, qmin, qmax, GL: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_G: tl.constexpr, HAS_BA: tl.constexpr, HAS_OFF: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_G)
        rmask = rows < n_rows
        mask = rmask[:, None] & (cols[None, :] < GL)
        offs = rows.to(tl.int64)[:, None] * GL + cols[None, :]
        v, s, o = _v(W, BA, S, O, rows, offs, rmask, mask, lora_scale, HAS_BA, HAS_OFF)
        q = _dequant(v, s, o, qmin, qmax, HAS_OFF)
        tl.store(WQ + offs, q.to(WQ.dtype.element_ty), mask=mask)

    @triton.jit
    def backward_kernel(W, BA, S, O, GWQ, WQ, GW, GS, GO, n_rows, lora_scale, qmin, qmax, grad_scale,
                        GL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr, HAS_BA: tl.constexpr,
                        HAS_OFF: tl.constexpr, NEED_WQ: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_G)
        rmask = rows < n_rows
        mask = rmask[:, None] & (cols[None, :] < GL)
        offs = rows.to(tl.int64)[:, None] * GL + cols[None, :]
        v, s, o = _v(W, BA, S, O, rows, offs, rmask, mask, lora_scale, HAS_BA, HAS_OFF)
        if NEED_WQ:
            tl.store(WQ + offs, _dequant(v, s, o, qmin, qmax, HAS_OFF).to(WQ.dtype.element_ty), mask=mask)
        gw = tl.load(GWQ + offs, mask=mask, other=0.0).to(tl.float32)
        below = v < qmin
        above = v > qmax
        r = ((v + 12582912.0) - 12582912.0) - v  # round(v) - v inside the clip range, Qn / Qp outside
        r = tl.where(below, qmin, tl.where(above, qmax, r))
        tl.store(GS + rows, tl.sum(gw * r, axis=1) * grad_scale, mask=rmask)
        outside = below | above
        if HAS_OFF:
            tl.store(GO + rows, tl.sum(tl.where(outside, gw, 0.0), axis=1) * grad_scale, mask=rmask)
        tl.store(GW + offs, tl.where(outside, 0.0, gw).to(GW.dtype.element_ty), mask=mask)


def supports(device: torch.device, acc: torch.dtype, group_len: int) -> bool:
    """Whether these kernels run here: CUDA, Triton installed, float32 quantizer arithmetic, a group that fits
    one program."""
    return device.type == "cuda" and acc == torch.float32 and group_len <= _MAX_BLOCK and triton is not None


def _launch(rows: int, gl: int):
    """(grid, BLOCK_R, BLOCK_G, num_warps): ~4096 elements a program, whole groups in a program."""
    block_g = triton.next_power_of_2(gl)
    block_r = max(1, min(64, 4096 // block_g))
    num_warps = min(16, max(4, block_r * block_g // 1024))
    return (triton.cdiv(rows, block_r),), block_r, block_g, num_warps


def forward_weight(w, ba, lora_scale, scale, offset, qmin, qmax, dtype):
    """Q(W0 + s·B·A) in ``dtype``, (rows, group_len); ``l4q_fn._forward_weight``'s contract."""
    w, ba, scale, offset = (t if t is None else t.contiguous() for t in (w, ba, scale, offset))
    rows, gl = w.shape
    wq = torch.empty(rows, gl, dtype=dtype, device=w.device)
    grid, br, bg, nw = _launch(rows, gl)
    forward_kernel[grid](w, ba if ba is not None else w, scale, offset if offset is not None else scale, wq, rows,
              float(lora_scale), float(qmin), float(qmax), GL=gl, BLOCK_R=br, BLOCK_G=bg, HAS_BA=ba is not None,
              HAS_OFF=offset is not None, num_warps=nw, enable_fp_fusion=False)
    return wq


def backward_weight(w, ba, lora_scale, scale, offset, gwq, grad_scale, qmin, qmax, need_wq: bool, dtype):
    """(Wq or None, dL/dW masked, dL/dα (rows, 1), dL/dβ (rows, 1) or None); ``l4q_fn._backward_weight``'s
    contract."""
    w, ba, scale, offset, gwq = (t if t is None else t.contiguous() for t in (w, ba, scale, offset, gwq))
    rows, gl = w.shape
    dev = w.device
    wq = torch.empty(rows, gl, dtype=dtype, device=dev) if need_wq else None
    grad_w = torch.empty(rows, gl, dtype=dtype, device=dev)
    g_scale = torch.empty(rows, 1, dtype=torch.float32, device=dev)
    g_off = torch.empty(rows, 1, dtype=torch.float32, device=dev) if offset is not None else None
    grid, br, bg, nw = _launch(rows, gl)
    backward_kernel[grid](w, ba if ba is not None else w, scale, offset if offset is not None else scale, gwq,
              wq if wq is not None else grad_w, grad_w, g_scale, g_off if g_off is not None else g_scale, rows,
              float(lora_scale), float(qmin), float(qmax), float(grad_scale), GL=gl, BLOCK_R=br, BLOCK_G=bg,
              HAS_BA=ba is not None, HAS_OFF=offset is not None, NEED_WQ=need_wq, num_warps=nw,
              enable_fp_fusion=False)
    return wq, grad_w, g_scale, g_off
