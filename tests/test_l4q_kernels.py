"""The compiled weight kernels of the fused L4Q op: one compile for every weight shape, same numbers as eager."""
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from fxcompress.quant import l4q_fn


def _weights(out_f, in_f, rank=4, group=32, dtype=torch.float32):
    w0 = (torch.randn(out_f, in_f) * 0.1).to(torch.bfloat16)
    a, b = torch.randn(rank, in_f, dtype=dtype) * 0.3, torch.randn(out_f, rank, dtype=dtype) * 0.05
    s = torch.rand(out_f, in_f // group, dtype=dtype) * 0.02 + 0.03
    off = torch.randn(out_f, in_f // group, dtype=dtype) * 0.05 - 0.2
    return w0, a, b, s, off


def test_backward_kernel_compiles_once_for_many_shapes():
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    fwd = l4q_fn.compiled_kernel(l4q_fn._forward_weight, backend=counter)
    bwd = l4q_fn.compiled_kernel(l4q_fn._backward_weight, backend=counter)
    shapes = [(64, 96), (96, 64), (160, 64), (64, 192), (128, 128), (32, 224), (224, 64), (96, 96), (64, 288),
              (288, 64)]  # 10 shapes > dynamo's recompile_limit of 8 (>= 2 groups: a size-1 dim specialises)
    counts = []
    for out_f, in_f in shapes:
        # as L4QLinear passes them: W0, A, step sizes and offsets are nn.Parameters (dynamo keeps
        # Parameter shapes static unless the kernel hands it plain tensors)
        w0, a, b, s, off = (torch.nn.Parameter(t, requires_grad=t.is_floating_point() and t.dtype != torch.bfloat16)
                            for t in _weights(out_f, in_f))
        gwq = torch.randn(out_f, in_f, dtype=torch.bfloat16)
        for by_sum in (False, True):
            got = bwd(w0, a, b, s, off, gwq, 0, 7, 32, True, torch.bfloat16, by_sum)
            ref = l4q_fn._backward_weight(w0, a, b, s, off, gwq, 0, 7, 32, True, torch.bfloat16, False)
            assert torch.equal(got[0], ref[0]) or (got[0].float() - ref[0].float()).abs().max() <= s.max()
            assert torch.allclose(got[1].float(), ref[1].float(), atol=1e-2, rtol=1e-2)
            assert torch.allclose(got[2], ref[2], atol=1e-2, rtol=1e-3) and torch.allclose(got[3], ref[3], atol=1e-3)
            wq = fwd(w0, a, b, s, off, 0, 7, 32, torch.bfloat16, by_sum)
            assert wq.shape == (out_f, in_f) and wq.dtype == torch.bfloat16
        counts.append(counter.frame_count)
    # one graph per (function, merge variant), after at most one automatic static->dynamic recompile:
    # no per-shape recompiles, so no eager fallback at the limit
    assert counts[0] >= 4 and counts[-1] == counts[2] and counts[-1] <= 8, counts


def test_merge_by_sum_equals_addmm_in_eager_float64():
    w0, a, b, s, off = _weights(24, 64, group=16, dtype=torch.float64)
    w0 = w0.double()
    gwq = torch.randn(24, 64, dtype=torch.float64)
    r1 = l4q_fn._backward_weight(w0, a, b, s, off, gwq, 0, 7, 16, True, torch.float64, False)
    r2 = l4q_fn._backward_weight(w0, a, b, s, off, gwq, 0, 7, 16, True, torch.float64, True)
    for t1, t2 in zip(r1, r2):
        assert torch.allclose(t1, t2, atol=1e-12)
