"""Backends on the outputs of the compression passes: an L4Q-converted transformer block and a
UDFC-compressed residual CNN, exported to ONNX (ORT) and built with TVM (LLVM), against torch."""
import pytest
import torch

import fxcompress as fxc
from fxcompress.models import accuracy, load_digits_split, pretrained_digits_resnet
from toymodels import DecoderBlock


@pytest.fixture(scope="module")
def l4q_block():
    torch.manual_seed(0)
    m = DecoderBlock().eval()
    x = torch.randn(1, 8, 64)
    qm = fxc.prepare_l4q(m, (x,), fxc.L4QConfig(bits=4, group_size=32, lora_rank=4, lora_alpha=8.0))
    opt = torch.optim.Adam(fxc.l4q_param_groups(qm, 2e-3, 1e-4))
    for _ in range(10):  # train so B != 0 and the offsets (zero points) become fractional
        loss = (qm(x) - m(x).detach()).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    dm = fxc.convert_l4q(qm).eval()
    assert not dm.get_submodule("q_proj").quant_weight.zero_point_is_integer
    return dm, x


@pytest.fixture(scope="module")
def udfc_cnn():
    _, _, xte, yte = load_digits_split()
    cm = fxc.udfc(pretrained_digits_resnet(), (xte[:4],), fxc.UDFCConfig(prune_ratio=0.3, weight_bits=6)).eval()
    return cm, xte, yte


@pytest.mark.parametrize("fmt", ["qdq", "matmulnbits"])
def test_l4q_converted_block_onnx_parity(l4q_block, tmp_path, fmt):
    dm, x = l4q_block
    runner = fxc.runtime.load_runner(str(fxc.export_onnx(dm, (x,), tmp_path / "l4q.onnx", weight_format=fmt,
                                                         accuracy_level=0)),  # fp32 compute: exact parity
                                     backend="ort", device="cpu", matmulnbits_accuracy_level=0)
    rep = fxc.runtime.check_parity(dm, runner, (x,))
    assert rep.ok(atol=1e-4, rtol=1e-4), rep


def test_l4q_converted_block_tvm_parity(l4q_block):
    dm, x = l4q_block
    runner = fxc.compile_tvm(dm, (x,), target="llvm")
    rep = fxc.runtime.check_parity(dm, runner, (x,))
    assert rep.ok(atol=1e-4, rtol=1e-4), rep


def test_udfc_cnn_onnx_parity_and_accuracy(udfc_cnn, tmp_path):
    cm, xte, yte = udfc_cnn
    x = xte[:64]
    runner = fxc.runtime.load_runner(str(fxc.export_onnx(cm, (x,), tmp_path / "udfc.onnx")), backend="ort", device="cpu")
    rep = fxc.runtime.check_parity(cm, runner, (x,))
    assert rep.ok(atol=1e-4, rtol=1e-4), rep
    assert accuracy(lambda b: runner(b), xte[:448], yte[:448]) == accuracy(cm, xte[:448], yte[:448])


def test_udfc_cnn_tvm_parity(udfc_cnn):
    cm, xte, _ = udfc_cnn
    x = xte[:8]
    runner = fxc.compile_tvm(cm, (x,), target="llvm")
    assert fxc.runtime.check_parity(cm, runner, (x,)).ok(atol=1e-4, rtol=1e-4)
