"""The compiled weight kernels of the fused L4Q op: one compile for every weight shape, one generated kernel
per direction, the group length a constant in it, same numbers as eager and as the plain reference."""
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._inductor import metrics

from fxcompress.quant import l4q_fn
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


def _run(kind, w0, a, b, s, off, gwq, lora_scale, qmin, qmax, group, dtype, backend=None):
    """(Wq, masked dL/dW, dL/dα, dL/dβ) (out, in) / (out, groups) through the fused op's weight kernels:
    ``kind`` "eager" (addmm merge) or "compiled" (GEMM for B'·A, the rest in one compiled kernel)."""
    fused = kind == "compiled"
    fwd = l4q_fn.compiled_kernel(l4q_fn._forward_weight, backend) if fused else l4q_fn._forward_weight
    bwd = l4q_fn.compiled_kernel(l4q_fn._backward_weight, backend) if fused else l4q_fn._backward_weight
    w, ba, s2, o2, _ = l4q_fn._kernel_inputs(w0, a, b, lora_scale, s, off, group, fused)
    wq_f = fwd(w, ba, s2, o2, qmin, qmax, dtype)
    wq, gw, gs, go = bwd(w, ba, s2, o2, gwq.reshape(w.shape), qmin, qmax, True, dtype)
    assert torch.equal(wq_f, wq)  # forward and backward recompute the same weight
    return wq.view(w0.shape), gw.view(w0.shape), gs.view(s.shape), go.view(s.shape)


@pytest.mark.parametrize("kind", ["eager", "compiled"])
def test_weight_kernels_match_plain_autograd(kind):
    torch.manual_seed(0)
    out_f, in_f, group, qmin, qmax = 48, 256, 64, 0, 7
    w0, a, b, s, off = _weights(out_f, in_f, group=group)
    gwq = torch.randn(out_f, in_f, dtype=torch.bfloat16)
    ref = _reference(w0, a, b, s, off, gwq, 0.5, qmin, qmax, group)
    got = _run(kind, w0, a, b, s, off, gwq, 0.5, qmin, qmax, group, torch.bfloat16, backend="inductor")
    # Wq: fp32 merge vs fp64 reference; a code may flip where v sits on a rounding boundary (<= one step)
    diff = (got[0].double() - ref[0]).abs()
    assert (diff > 0.01).float().mean() < 1e-3 and diff.max() <= s.max() + 1e-2
    assert torch.allclose(got[1].double(), ref[1], atol=2e-2, rtol=1e-2)  # bf16-rounded masked gradient
    flips = (diff > 0.01).reshape(out_f, in_f // group, group).any(-1)  # groups with a flipped code
    for g_got, g_ref in zip(got[2:], ref[2:]):
        close = torch.isclose(g_got.double(), g_ref, atol=1e-3, rtol=1e-3)
        assert (close | flips).all()
    assert ((ref[1] == 0) & (gwq != 0)).any()  # the clip mask is exercised


def test_compiles_once_for_many_shapes_with_the_group_length_static():
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    shapes = [(64, 96), (96, 64), (160, 64), (64, 192), (128, 128), (32, 224), (224, 64), (96, 96), (64, 288),
              (288, 64)]  # 10 shapes > dynamo's recompile_limit of 8
    for out_f, in_f in shapes:
        # as L4QLinear passes them: W0, A, step sizes and offsets are nn.Parameters (dynamo keeps
        # Parameter shapes static unless the kernel hands it plain tensors)
        w0, a, b, s, off = (torch.nn.Parameter(t, requires_grad=t.dtype != torch.bfloat16)
                            for t in _weights(out_f, in_f))
        gwq = torch.randn(out_f, in_f, dtype=torch.bfloat16)
        got = _run("compiled", w0, a, b, s, off, gwq, 0.5, 0, 7, 32, torch.bfloat16, backend=counter)
        ref = _run("eager", w0, a, b, s, off, gwq, 0.5, 0, 7, 32, torch.bfloat16)
        assert (got[0].float() - ref[0].float()).abs().max() <= s.max()
        assert torch.allclose(got[1].float(), ref[1].float(), atol=1e-2, rtol=1e-2)
        assert torch.allclose(got[2], ref[2], atol=1e-2, rtol=1e-3) and torch.allclose(got[3], ref[3], atol=1e-3)
    # one graph per function for all 10 shapes: no per-shape recompiles, so no eager fallback at the limit
    assert counter.frame_count == 2, counter.frame_count
    for gm in counter.graphs:
        sizes = [n.meta["example_value"].shape for n in gm.graph.nodes
                 if n.op == "placeholder" and isinstance(n.meta.get("example_value"), torch.Tensor)]
        grouped = [sz for sz in sizes if len(sz) == 2 and sz[1] == 32]
        assert grouped and all(isinstance(sz[0], torch.SymInt) and type(sz[1]) is int for sz in grouped), sizes


@pytest.mark.parametrize("need_wq,symmetric", [(True, False), (False, True)])
def test_one_generated_kernel_per_direction(need_wq, symmetric):
    """Inductor emits exactly one kernel for each direction: the merge (W0 + B'·A), quantization, masks,
    both group reductions and both weight-sized outputs in a single pass (it was 2 kernels forward and 4
    backward, led by a reduction kernel that rebuilt B'·A from r loads of B and A per element)."""
    torch.manual_seed(0)
    w0, a, b, s, off = _weights(64, 256, group=128)
    off = None if symmetric else off
    gwq = torch.randn(64, 256, dtype=torch.bfloat16)
    w, ba, s2, o2, _ = l4q_fn._kernel_inputs(w0, a, b, 0.5, s, off, 128, True)
    for fn, args in ((l4q_fn._forward_weight, (w, ba, s2, o2, -8, 7, torch.bfloat16)),
                     (l4q_fn._backward_weight, (w, ba, s2, o2, gwq.view(w.shape), -8, 7, need_wq, torch.bfloat16))):
        torch._dynamo.reset()
        metrics.reset()
        out = l4q_fn.compiled_kernel(fn, "inductor")(*args)
        assert metrics.generated_kernel_count == 1, (fn.__name__, metrics.generated_kernel_count)
        eager = fn(*args)
        for o, e in zip(out if isinstance(out, tuple) else (out,), eager if isinstance(eager, tuple) else (eager,)):
            assert (o is None) == (e is None) and (o is None or torch.allclose(o.float(), e.float(), atol=1e-5))


def test_eager_and_compiled_inputs_agree_in_float64():
    """The two merge routes (addmm into W, or a GEMM for B'·A added inside the kernel) give the same numbers."""
    torch.manual_seed(0)
    w0, a, b, s, off = _weights(24, 64, group=16, dtype=torch.float64)
    w0 = w0.double()
    gwq = torch.randn(24, 64, dtype=torch.float64)
    r1 = _run("eager", w0, a, b, s, off, gwq, 0.5, 0, 7, 16, torch.float64)
    w, ba, s2, o2, _ = l4q_fn._kernel_inputs(w0, a, b, 0.5, s, off, 16, True)
    r2 = l4q_fn._backward_weight(w, ba, s2, o2, gwq.view(w.shape), 0, 7, True, torch.float64)
    for t1, t2 in zip(r1, r2):
        assert torch.allclose(t1.reshape(-1), t2.reshape(-1), atol=1e-12)
