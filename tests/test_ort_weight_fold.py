"""ORT runner: a weight-only integer conv model is dequantized once at load (no per-run DequantizeLinear), and only
that case: activation-quantized models and DequantizeLinear + MatMul (fused by ORT into MatMulNBits) keep QDQ."""
import pytest
import torch
from torch import nn

import fxcompress as fxc
from fxcompress.runtime.ort import load_ort, weight_only_conv_dequantize

pytest.importorskip("onnxruntime")


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3),
                         nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)).eval()


def test_weight_only_conv_model_is_folded_at_load(tmp_path):
    m, x = _cnn(), torch.randn(2, 3, 12, 12)
    q = fxc.quantize_rtn(fxc.capture(m, (x,)), fxc.RTNConfig(bits=8, targets=("*0", "*3")))
    p = tmp_path / "w8.onnx"
    fxc.export_onnx(q, (x,), p)
    assert weight_only_conv_dequantize(p)
    auto, off = load_ort(p), load_ort(p, fold_weight_dequantize=False)
    assert auto.fold_weight_dequantize and not off.fold_weight_dequantize
    assert "DequantizeLinear" not in auto.optimized_op_types()
    assert off.optimized_op_types()["DequantizeLinear"] == 2  # the trap: dequantized on every run
    torch.testing.assert_close(auto.run(x)[0], off.run(x)[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(auto.run(x)[0], q(x), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="fold_weight_dequantize"):
        load_ort(p, fold_weight_dequantize="yes")


def test_activation_quantized_and_matmul_models_keep_qdq(tmp_path):
    m, x = _cnn(), torch.randn(2, 3, 12, 12)
    qa = fxc.quantize_activations(m, (x,), fxc.ActivationConfig(bits=8, ranges="bn"))
    pa = tmp_path / "w8a8.onnx"
    fxc.export_onnx(qa, (x,), pa)
    assert not weight_only_conv_dequantize(pa) and not load_ort(pa).fold_weight_dequantize
    assert "QLinearConv" in load_ort(pa).optimized_op_types()
    lin = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    xl = torch.randn(1, 64)
    ql = fxc.quantize_rtn(fxc.capture(lin, (xl,)), fxc.RTNConfig(bits=4, granularity="per_group", group_size=32))
    pl = tmp_path / "lin_qdq.onnx"
    fxc.export_onnx(ql, (xl,), pl, weight_format="qdq")
    assert not weight_only_conv_dequantize(pl)  # DequantizeLinear + MatMul: ORT fuses it into MatMulNBits
    assert "MatMulNBits" in load_ort(pl).optimized_op_types()
