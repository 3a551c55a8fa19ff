"""CUDA checks of the L4Q path (run on the GPU machine: python -m pytest -m gpu)."""
import pytest
import torch

import fxcompress as fxc
from fxcompress.nn import QuantLinear
from toymodels import DecoderBlock

pytestmark = pytest.mark.gpu


def test_l4q_prepare_train_convert_on_cuda_bf16():
    m = DecoderBlock().cuda().to(torch.bfloat16).eval()
    x = torch.randn(2, 8, 64, device="cuda", dtype=torch.bfloat16)
    qm = fxc.prepare_l4q(m, (x,), fxc.L4QConfig(bits=4, group_size=32, lora_rank=4))
    assert all(p.is_cuda for p in qm.parameters())
    opt = torch.optim.Adam(fxc.l4q_param_groups(qm, 1e-3, 1e-4))
    for _ in range(3):
        loss = (qm(x).float() - m(x).float()).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    dm = fxc.convert_l4q(qm)
    assert isinstance(dm.get_submodule("q_proj"), QuantLinear) and dm.get_submodule("q_proj").qweight.is_cuda
    with torch.no_grad():
        assert torch.allclose(dm(x).float(), qm(x).float(), atol=2e-2)


def test_fused_matches_naive_on_cuda():
    m = DecoderBlock().cuda().eval()
    x = torch.randn(2, 8, 64, device="cuda")
    outs = []
    for fused in (True, False):
        torch.manual_seed(0)  # same LoRA A initialisation for both
        qm = fxc.prepare_l4q(m, (x,), fxc.L4QConfig(bits=3, group_size=32, lora_rank=4, fused=fused))
        with torch.no_grad():
            for n, p in qm.named_parameters():
                if n.endswith("lora_B"):
                    p.fill_(0.01)
        qm(x).pow(2).sum().backward()
        outs.append({n: p.grad.clone() for n, p in qm.named_parameters() if p.requires_grad})
    for k in outs[0]:
        assert torch.allclose(outs[0][k], outs[1][k], rtol=1e-3, atol=1e-4), k


def test_rtn_on_cuda():
    m = DecoderBlock().cuda().eval()
    x = torch.randn(1, 4, 64, device="cuda")
    res = fxc.rtn_pass(fxc.capture(m, (x,)), fxc.RTNConfig(bits=4, symmetric=False, granularity="per_group",
                                                               group_size=32))
    assert torch.allclose(res.gm(x), m(x), atol=0.1)
