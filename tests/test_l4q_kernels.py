"""The compiled weight kernels of the fused L4Q op: one compile for every weight shape, one generated kernel
per direction, the group length a constant in it, same numbers as eager and as the plain reference."""
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._functorch import config as functorch_config
from torch._inductor import config as inductor_config
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


def _run(kind, w0, a, b, s, off, gwq, lora_scale, qmin, qmax, group, dtype, backend="inductor"):
    """(Wq, masked dL/dW, dL/dα, dL/dβ) (out, in) / (out, groups) through the fused op's weight kernels:
    ``kind`` "eager" (addmm merge) or "compiled" (GEMM for B'·A, the rest in one compiled kernel)."""
    fused = kind == "compiled"
    fwd = l4q_fn.compiled_kernel(l4q_fn._forward_weight, backend) if fused else l4q_fn._forward_weight
    bwd = l4q_fn.compiled_kernel(l4q_fn._backward_weight, backend) if fused else l4q_fn._backward_weight
    w, ba, s2, o2 = l4q_fn._kernel_inputs(w0, a, b, lora_scale, s, off, group, fused)
    wq_f = fwd(w, ba, lora_scale, s2, o2, qmin, qmax, dtype)
    wq, gw, gs, go = bwd(w, ba, lora_scale, s2, o2, gwq.reshape(w.shape), 1.0, qmin, qmax, True, dtype)
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


def _inductor_plan(fn, args):
    """What inductor plans for ``fn``: (result, element counts of the scheduler nodes after fusion — one per
    kernel —, bytes moved per weight element by those kernels), compiled fresh (no cache)."""
    torch._dynamo.reset()
    metrics.reset()
    torch._logging.set_logs(inductor_metrics=True)  # inductor counts bytes only with this log on
    try:
        with inductor_config.patch(fx_graph_cache=False), functorch_config.patch(enable_autograd_cache=False):
            out = l4q_fn.compiled_kernel(fn, "inductor")(*args)
    finally:
        torch._logging.set_logs()
    return out, [n for _, n in metrics.nodes_num_elem], metrics.num_bytes_accessed / args[0].numel()


@pytest.mark.parametrize("need_wq,symmetric", [(True, False), (False, True)])
def test_one_weight_sized_kernel_per_direction(need_wq, symmetric):
    """Inductor plans one weight-sized kernel for each direction — the merge (W0 + s·B·A), quantization,
    masks, both group reductions and both weight-sized outputs in one pass — reading and writing each
    weight-sized tensor once (the earlier kernels: 2 weight-sized kernels forward, 12.3 bytes per weight
    element, and 4 backward, 30.4 bytes, led by a reduction kernel that rebuilt B·A from r loads of B and
    A per element)."""
    torch.manual_seed(0)
    w0, a, b, s, off = _weights(64, 256, group=128)
    off = None if symmetric else off
    gwq = torch.randn(64, 256, dtype=torch.bfloat16)
    w, ba, s2, o2 = l4q_fn._kernel_inputs(w0, a, b, 0.5, s, off, 128, True)
    fwd_args = (w, ba, 0.5, s2, o2, -8, 7, torch.bfloat16)
    bwd_args = (w, ba, 0.5, s2, o2, gwq.view(w.shape), 0.3, -8, 7, need_wq, torch.bfloat16)
    # bytes per weight element: bf16 W0 (2) + fp32 B·A (4) in, bf16 Wq (2) out; backward also bf16 dL/dWq in
    # (2) and bf16 dL/dW out (2), Wq only if asked; plus the per-group step sizes / offsets (< 0.2)
    for fn, args, want_bytes in ((l4q_fn._forward_weight, fwd_args, 8),
                                 (l4q_fn._backward_weight, bwd_args, 10 + 2 * need_wq)):
        out, nodes, per_elem = _inductor_plan(fn, args)
        assert len(nodes) == 1 and nodes[0] >= w.numel(), nodes
        assert want_bytes <= per_elem < want_bytes + 0.2, (fn.__name__, per_elem)
        eager = fn(*args)
        for o, e in zip(out if isinstance(out, tuple) else (out,), eager if isinstance(eager, tuple) else (eager,)):
            assert (o is None) == (e is None) and (o is None or torch.allclose(o.float(), e.float(), atol=1e-5))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_one_triton_kernel_per_direction_on_cuda():
    """On the GPU: one Triton kernel per direction, and one compile serves the bench's weight shapes."""
    from unittest import mock

    from torch._inductor.graph import GraphLowering

    def run_and_get_code(fn, *args):  # the generated code of any compile the call makes (none if cached)
        codes = []
        with mock.patch.object(GraphLowering, "save_output_code", codes.append), \
                inductor_config.patch(fx_graph_cache=False), functorch_config.patch(enable_autograd_cache=False):
            return fn(*args), codes

    torch._dynamo.reset()
    for out_f, in_f in ((2048, 2048), (5632, 2048), (2048, 5632)):
        w0, a, b, s, off = (t.cuda() for t in _weights(out_f, in_f, rank=16, group=128))
        gwq = torch.randn(out_f, in_f, dtype=torch.bfloat16, device="cuda")
        w, ba, s2, o2 = l4q_fn._kernel_inputs(w0, a, b, 0.5, s, off, 128, True)
        fwd = l4q_fn.compiled_kernel(l4q_fn._forward_weight)
        bwd = l4q_fn.compiled_kernel(l4q_fn._backward_weight)
        fargs = (w, ba, 0.5, s2, o2, 0, 15, torch.bfloat16)
        bargs = (w, ba, 0.5, s2, o2, gwq.view(w.shape), 0.3, 0, 15, True, torch.bfloat16)
        _, fcode = run_and_get_code(fwd, *fargs)
        _, bcode = run_and_get_code(bwd, *bargs)
        if out_f == in_f:  # the first call compiles; the other shapes reuse it (no code generated)
            assert sum(c.count("async_compile.triton(") for c in fcode) == 1, fcode
            assert sum(c.count("async_compile.triton(") for c in bcode) == 1, bcode
        else:
            assert not fcode and not bcode, "recompiled for a new weight shape"
        ref = _run("eager", w0, a, b, s, off, gwq, 0.5, 0, 15, 128, torch.bfloat16)
        got = _run("compiled", w0, a, b, s, off, gwq, 0.5, 0, 15, 128, torch.bfloat16)
        assert (got[0].float() - ref[0].float()).abs().max() <= s.max()
        assert torch.allclose(got[1].float(), ref[1].float(), atol=1e-2, rtol=1e-2)


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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fused_op_through_compiled_kernels_matches_naive(dtype, monkeypatch):
    """The whole autograd.Function on the path CUDA takes (B·A by GEMM, compiled weight kernels), run on
    CPU: output and every gradient equal the plain autograd composition, in each activation dtype."""
    monkeypatch.setattr(l4q_fn, "_kernel", lambda fn, device, compiled: (l4q_fn.compiled_kernel(fn), True))
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
