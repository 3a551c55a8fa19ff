"""The weight kernels of the fused L4Q op: the eager functions against plain autograd, the Triton kernels
(CUDA's path; on CPU in Triton's interpreter) against the eager functions, and the whole autograd.Function
through the Triton kernels against the naive composition."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fxcompress.quant import l4q_fn, l4q_triton
from fxcompress.quant.lsq import lsq_forward


def _weights(out_f, in_f, rank=4, group=32, dtype=torch.float32):
    w0 = (torch.randn(out_f, in_f) * 0.1).to(torch.bfloat16)
    a, b = torch.randn(rank, in_f, dtype=dtype) * 0.3, torch.randn(out_f, rank, dtype=dtype) * 0.05
    s = torch.rand(out_f, in_f // group, dtype=dtype) * 0.02 + 0.03
    off = torch.randn(out_f, in_f // group, dtype=dtype) * 0.05 - 0.2
    return w0, a, b, s, off


def _reference(w0, a, b, s, off, gwq, lora_scale, qmin, qmax, group):
    """Plain autograd through the L4Q weight path: Wq and the gradients of W (masked), α and β from dL/dWq."""
    a, b, s, off = (t.detach().double().requires_grad_() for t in (a, b, s, off))
    out_f, in_f = w0.shape
    w = (w0.double() + lora_scale * (b @ a)).detach().requires_grad_()
    wg = w.reshape(out_f, in_f // group, group)
    v = (wg - off.unsqueeze(-1)) / s.unsqueeze(-1)
    # LSQ+ as the papers write it: clamp, then round with a straight-through gradient
    vc = v.clamp(qmin, qmax)
    q = (torch.round(vc) - vc).detach() + vc
    wq = (q * s.unsqueeze(-1) + off.unsqueeze(-1)).reshape(out_f, in_f)
    assert torch.equal(wq.detach(), lsq_forward(wg.detach(), s.detach().unsqueeze(-1), off.detach().unsqueeze(-1),
                                                qmin, qmax).reshape(out_f, in_f))
    gw, gs, go = torch.autograd.grad(wq, (w, s, off), gwq.double())
    return wq.detach(), gw, gs, go


def _run(kind, w0, a, b, s, off, gwq, lora_scale, qmin, qmax, group, dtype):
    """(Wq, masked dL/dW, dL/dα, dL/dβ) (out, in) / (out, groups) through the fused op's weight kernels:
    ``kind`` "eager" (addmm merge), "fused" (GEMM for B·A added inside the eager kernel functions) or "triton"
    (GEMM for B·A, the rest in one Triton kernel per direction)."""
    fused = kind != "eager"
    fwd, bwd = ((l4q_triton.forward_weight, l4q_triton.backward_weight) if kind == "triton"
                else (l4q_fn._forward_weight, l4q_fn._backward_weight))
    w, ba, s2, o2 = l4q_fn._kernel_inputs(w0, a, b, lora_scale, s, off, group, fused)
    wq_f = fwd(w, ba, lora_scale, s2, o2, qmin, qmax, dtype)
    wq, gw, gs, go = bwd(w, ba, lora_scale, s2, o2, gwq.reshape(w.shape), 1.0, qmin, qmax, True, dtype)
    assert torch.equal(wq_f, wq)  # forward and backward recompute the same weight
    return wq.view(w0.shape), gw.view(w0.shape), gs.view(s.shape), go.view(s.shape)


@pytest.mark.parametrize("kind", ["eager", "fused"])
def test_weight_kernels_match_plain_autograd(kind):
    torch.manual_seed(0)
    out_f, in_f, group, qmin, qmax = 48, 256, 64, 0, 7
    w0, a, b, s, off = _weights(out_f, in_f, group=group)
    gwq = torch.randn(out_f, in_f, dtype=torch.bfloat16)
    ref = _reference(w0, a, b, s, off, gwq, 0.5, qmin, qmax, group)
    got = _run(kind, w0, a, b, s, off, gwq, 0.5, qmin, qmax, group, torch.bfloat16)
    # Wq: fp32 merge vs fp64 reference; a code may flip where v sits on a rounding boundary (<= one step)
    diff = (got[0].double() - ref[0]).abs()
    assert (diff > 0.01).float().mean() < 1e-3 and diff.max() <= s.max() + 1e-2
    assert torch.allclose(got[1].double(), ref[1], atol=2e-2, rtol=1e-2)  # bf16-rounded masked gradient
    flips = (diff > 0.01).reshape(out_f, in_f // group, group).any(-1)  # groups with a flipped code
    for g_got, g_ref in zip(got[2:], ref[2:]):
        close = torch.isclose(g_got.double(), g_ref, atol=1e-3, rtol=1e-3)
        assert (close | flips).all()
    assert ((ref[1] == 0) & (gwq != 0)).any()  # the clip mask is exercised


def test_eager_and_compiled_inputs_agree_in_float64():
    """The two merge routes (addmm into W, or a GEMM for B'·A added inside the kernel) give the same numbers."""
    torch.manual_seed(0)
    w0, a, b, s, off = _weights(24, 64, group=16, dtype=torch.float64)
    w0 = w0.double()
    gwq = torch.randn(24, 64, dtype=torch.float64)
    r1 = _run("eager", w0, a, b, s, off, gwq, 0.5, 0, 7, 16, torch.float64)
    w, ba, s2, o2 = l4q_fn._kernel_inputs(w0, a, b, 0.5, s, off, 16, True)
    r2 = l4q_fn._backward_weight(w, ba, 0.5, s2, o2, gwq.view(w.shape), 1.0, 0, 7, True, torch.float64)
    for t1, t2 in zip(r1, r2):
        assert torch.allclose(t1.reshape(-1), t2.reshape(-1), atol=1e-12)


needs_triton = pytest.mark.skipif(l4q_triton.triton is None, reason="Triton is not installed (pip install -e '.[dev]')")


@needs_triton
def test_triton_kernels_equal_the_eager_functions_in_the_interpreter():
    """Wq and the masked dL/dW bit-equal to eager (bf16 within the interpreter's truncating cast), the group
    sums to float32 summation order: groups and per channel (576, 96: not powers of two), symmetric and not,
    with and without LoRA, rows that do not fill the last block, Wq not asked for."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).parents[1])] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    r = subprocess.run([sys.executable, str(Path(__file__).with_name("l4q_triton_check.py"))], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout[-2000:] + r.stderr[-4000:]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fused_op_through_the_cuda_route_matches_naive(dtype, monkeypatch):
    """The whole autograd.Function on CUDA's route (B·A by GEMM, W0 + s·B·A formed in the weight kernel; the
    kernel functions eager here): output and every gradient equal the plain autograd composition."""
    monkeypatch.setattr(l4q_fn, "_kernels",
                        lambda w0, group_size, compiled: (l4q_fn._forward_weight, l4q_fn._backward_weight, True))
    torch.manual_seed(0)
    w0, a, b, s, off = _weights(48, 256, rank=4, group=64)
    w0 = w0.to(dtype)
    x = torch.randn(2, 5, 256, dtype=dtype)
    g = torch.randn(2, 5, 48, dtype=dtype)
    outs = []
    for fn in (l4q_fn.l4q_linear, l4q_fn.l4q_linear_naive):
        leaves = [t.detach().clone().requires_grad_() for t in (x, a, b, s, off)]
        xx, aa, bb, ss, oo = leaves
        y = fn(xx, w0, aa, bb, ss, oo, None, 0.5, 0, 7, 64, 0.3)
        outs.append((y, *torch.autograd.grad(y, leaves, g)))
    tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}[dtype]
    for name, got, ref in zip(("y", "x", "A", "B", "scale", "offset"), *outs):
        assert got.dtype == ref.dtype, name
        err = (got.float() - ref.float()).abs().max() / ref.float().abs().max()
        assert err <= tol, (name, err.item())


def test_cpu_and_float64_take_the_eager_kernels():
    w0 = torch.zeros(8, 64, dtype=torch.bfloat16)
    assert l4q_fn._kernels(w0, 32, True) == (l4q_fn._forward_weight, l4q_fn._backward_weight, False)
    if torch.cuda.is_available():
        assert l4q_fn._kernels(w0.cuda().double(), 32, True)[2] is False
        assert l4q_fn._kernels(w0.cuda(), 32, False)[2] is False


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_kernels_on_cuda_equal_eager_bit_for_bit():
    """On the GPU the L4Q layer takes the Triton kernels; Wq and dL/dW equal eager exactly (bf16 rounded to
    nearest even, no FMA contraction, IEEE division), the group sums to summation order; the whole layer's
    output and gradients match the eager route."""
    torch.manual_seed(0)
    for out_f, in_f, group in ((2048, 2048, 128), (5632, 2048, 128), (2048, 5632, 128), (1536, 576, 64),
                               (576, 1536, None)):
        gl = in_f if group is None else group
        w0, a, b, s, off = (t.cuda() for t in _weights(out_f, in_f, rank=16, group=gl))
        assert l4q_fn._kernels(w0, group, True)[0] is l4q_triton.forward_weight
        gwq = torch.randn(out_f, in_f, dtype=torch.bfloat16, device="cuda")
        ref = _run("fused", w0, a, b, s, off, gwq, 0.5, 0, 15, group, torch.bfloat16)
        got = _run("triton", w0, a, b, s, off, gwq, 0.5, 0, 15, group, torch.bfloat16)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]), (out_f, in_f)
        assert torch.allclose(got[2], ref[2], rtol=1e-4, atol=1e-5) and torch.allclose(got[3], ref[3], rtol=1e-4,
                                                                                         atol=1e-5)
        x = torch.randn(4, 16, in_f, device="cuda", dtype=torch.bfloat16)
        outs = []
        for compiled in (True, False):
            leaves = [t.detach().clone().requires_grad_() for t in (x, a, b, s, off)]
            y = l4q_fn.l4q_linear(leaves[0], w0, *leaves[1:], None, 0.5, 0, 15, group, 0.3, compiled=compiled)
            outs.append((y, *torch.autograd.grad(y.float().pow(2).sum(), leaves)))
        for name, t1, t2 in zip(("y", "x", "A", "B", "scale", "offset"), *outs):  # addmm vs GEMM + add merge
            err = (t1.float() - t2.float()).abs().max() / t2.float().abs().max()
            assert err <= 2e-2, (name, err.item())
