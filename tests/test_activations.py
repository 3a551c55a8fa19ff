"""Integer activations from BatchNorm statistics: numerics, ONNX Runtime parity, fused op types, bad input."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxcompress as fxc
from fxcompress.passes.activations import ActivationConfig, qparams, quantize_activations, quantize_activations_pass
from fxcompress.runtime.ort import load_ort


class Block(nn.Module):
    """conv-BN-ReLU6 -> conv-BN, a residual add, ReLU, pooled linear head."""

    def __init__(self, act=None):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(16)
        self.act0 = act or nn.ReLU6()
        self.conv = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        a = self.act0(self.bn0(self.stem(x)))
        y = self.relu(self.bn1(self.conv(a)) + a)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


def _model(act=None, seed=0):
    torch.manual_seed(seed)
    m = Block(act)
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.randn(16, 3, 12, 12))
    return m.eval()


def test_bn_ranges_and_numerics_vs_plain_reference():
    m = _model()
    x = torch.randn(4, 3, 12, 12)
    cfg = ActivationConfig(k_std=3.0, weight_bits=None, fold_bn=False, calibration=(x,))
    qgm = quantize_activations_pass(fxc.capture(m, (x,)), cfg).gm
    # plain reference: the ReLU6 output range from BN alone is [0, min(6, max(beta + 3 |gamma| std))]
    bn = m.bn0
    std = bn.weight.abs() * torch.sqrt(bn.running_var / (bn.running_var + bn.eps))
    hi = float((bn.bias + 3.0 * std).max().clamp(max=6.0).detach())
    s0, z0 = qparams(0.0, hi)
    assert z0 == 0 and s0 == pytest.approx(hi / 255)
    fq = [n for n in qgm.graph.nodes if n.target is torch.fake_quantize_per_tensor_affine]
    stem_fq = [n for n in fq if n.args[0].target == "act0"]
    assert len(stem_fq) == 1 and stem_fq[0].args[1] == pytest.approx(s0) and stem_fq[0].args[2] == 0
    # the whole graph against a hand-written forward with the pass's own scales
    sc = {n.args[0].target if n.args[0].op == "call_module" else n.args[0].name: n.args[1:3] for n in fq}

    def q(t, key):
        s, z = sc[key]
        return torch.fake_quantize_per_tensor_affine(t, s, z, 0, 255)

    with torch.no_grad():
        xin = q(x, "x")
        a = m.act0(m.bn0(m.stem(xin)))
        aq = q(a, "act0")
        b = m.bn1(m.conv(aq))
        y = m.relu(q(b, "bn1") + aq)
        ref = m.fc(q(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1), "flatten"))
        out = qgm(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    rows = {r.layer: r for r in fxc.report(qgm)}
    assert "BN: relu6" in rows["act0"].note and "calibrated" in rows["x"].note


@pytest.mark.parametrize("ranges", ["bn", "calibrate"])
def test_integer_activation_onnx_runs_qlinearconv_in_ort(tmp_path, ranges):
    m = _model()
    x = torch.randn(8, 3, 12, 12)
    cfg = ActivationConfig(ranges=ranges, calibration=(x,) if ranges == "calibrate" else None)
    qgm = quantize_activations(m, (x[:2],), cfg)
    with torch.no_grad():
        y_float, y_q = m(x), qgm(x)
    assert F.cosine_similarity(y_q, y_float).mean() > 0.98
    path = fxc.export_onnx(qgm, (x[:1],), tmp_path / "q.onnx")
    runner = load_ort(path, intra_op_num_threads=1)
    y_ort = torch.as_tensor(runner.run(x)[0])
    # ORT requantizes in integer arithmetic: within a few quantization steps of the fake-quant graph
    assert (y_ort - y_q).abs().max() < 0.05 * y_q.abs().max()
    assert F.cosine_similarity(y_ort, y_q).min() > 0.995
    ops = runner.optimized_op_types()
    assert ops["QLinearConv"] == 2 and ops.get("Conv", 0) == 0, ops


def test_composes_with_rtn():
    m = _model()
    x = torch.randn(2, 3, 12, 12)
    rtn = fxc.quantize_rtn(fxc.capture(m, (x,)), fxc.RTNConfig(bits=8))
    qgm = quantize_activations(rtn, (x,))
    with torch.no_grad():
        assert F.cosine_similarity(qgm(x), m(x)).mean() > 0.98


def test_nan_bn_statistics_is_a_clear_error():
    m = _model()
    m.bn1.running_var[3] = float("nan")
    with pytest.raises(ValueError, match="bn1.*non-finite running_var"):
        quantize_activations(m, (torch.randn(1, 3, 12, 12),))


def test_unsupported_activation_falls_back_to_calibration_or_float():
    m = _model(act=nn.SiLU())
    x = torch.randn(2, 3, 12, 12)
    qgm = quantize_activations(m, (x,))
    rows = {r.layer: r for r in fxc.report(qgm)}
    assert "calibrated (activation SiLU has no moment model)" in rows["act0"].note
    gm = fxc.capture(m, (x,))
    res = quantize_activations_pass(gm, ActivationConfig())  # no data at all: that tensor stays float
    rows = {r.layer: r for r in res.report}
    assert rows["act0"].action == "skipped" and "left float" in rows["act0"].note


@pytest.mark.parametrize("kw,field", [(dict(bits=4), "bits"), (dict(ranges="minmax"), "ranges"),
                                      (dict(ranges="calibrate"), "calibration"), (dict(k_std=0), "k_std"),
                                      (dict(k_std=math.nan), "k_std"), (dict(weight_bits=6), "weight_bits")])
def test_bad_config(kw, field):
    with pytest.raises(ValueError, match=field):
        ActivationConfig(**kw)
