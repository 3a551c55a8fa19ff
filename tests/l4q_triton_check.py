"""Run by tests/test_l4q_kernels.py in a subprocess with TRITON_INTERPRET=1 (Triton decides at import whether a
kernel is interpreted): the L4Q Triton kernels on CPU tensors against the eager reference.  Prints "ok"."""
import sys

import torch

from fxcompress.quant import l4q_fn, l4q_triton

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from test_l4q_kernels import _weights  # noqa: E402


def check(out_f, in_f, group, symmetric, lora, dtype, need_wq):
    w0, a, b, s, off = _weights(out_f, in_f, group=in_f if group is None else group)
    off = None if symmetric else off
    a, b = (a, b) if lora else (None, None)
    qmin, qmax = (-8, 7) if symmetric else (0, 15)
    gwq = torch.randn(out_f, in_f, dtype=dtype)
    w, ba, s2, o2 = l4q_fn._kernel_inputs(w0, a, b, 0.5, s, off, group, True)
    fargs = (w, ba, 0.5, s2, o2, qmin, qmax, dtype)
    bargs = (w, ba, 0.5, s2, o2, gwq.view(w.shape), 0.3, qmin, qmax, need_wq, dtype)
    want = (l4q_fn._forward_weight(*fargs),) + l4q_fn._backward_weight(*bargs)
    got = (l4q_triton.forward_weight(*fargs),) + l4q_triton.backward_weight(*bargs)
    case = (out_f, in_f, group, symmetric, lora, dtype, need_wq)
    for name, g, e in zip(("Wq", "Wq (backward)", "dL/dW", "dL/dscale", "dL/doffset"), got, want):
        assert (g is None) == (e is None), (case, name)
        if g is None:
            continue
        assert g.dtype == e.dtype and g.shape == e.shape, (case, name, g.dtype, e.dtype, g.shape, e.shape)
        if name.startswith("dL/ds") or name.startswith("dL/do"):  # group sums: another summation order
            assert torch.allclose(g, e, rtol=1e-5, atol=1e-6), (case, name, (g - e).abs().max())
        elif dtype == torch.bfloat16:  # the interpreter truncates float32 -> bfloat16 (the GPU rounds: exact there)
            ulp = e.float().abs() * 2.0 ** -7 + 1e-30
            assert ((g.float() - e.float()).abs() <= ulp).all(), (case, name)
        else:
            assert torch.equal(g, e), (case, name, (g.float() - e.float()).abs().max())
    assert ((want[2] == 0) & (gwq.view(w.shape) != 0)).any(), case  # the clip mask is exercised


torch.manual_seed(0)
for case in [(48, 256, 64, False, True, torch.float32, True),    # groups, asymmetric, fp32 activations
             (40, 96, None, True, True, torch.float16, True),     # per channel, 96 (not a power of 2), symmetric
             (30, 160, 32, False, True, torch.bfloat16, False),   # rows not a multiple of the block, no Wq
             (24, 576, None, False, False, torch.float32, True),  # per channel 576 (SmolLM2), LSQ only (no LoRA)
             (16, 128, 128, True, False, torch.float16, False)]:
    check(*case)
print("ok")
