"""UDFC on torchvision architectures: ReLU6 moments, depthwise convs, residual ties, real-photo agreement."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxcompress as fxc
from fxcompress.data.images import photo_crops
from fxcompress.models.vision import pretrained_mobilenet_v2, resnet18
from fxcompress.passes.channel_groups import analyze
from fxcompress.passes.udfc import (UDFCConfig, clipped_cross_moment, clipped_mean, clipped_second_moment,
                                    udfc_pass)


@pytest.mark.parametrize("mu,sigma", [(0.5, 1.0), (3.0, 2.0), (-1.0, 0.7), (7.0, 1.5), (2.0, 0.0)])
def test_relu6_moments_vs_monte_carlo(mu, sigma):
    g = torch.Generator().manual_seed(0)
    a = (mu + sigma * torch.randn(2_000_000, generator=g, dtype=torch.float64)).clamp(0, 6)
    assert float(clipped_mean(mu, sigma, 6.0)) == pytest.approx(float(a.mean()), abs=4e-3)
    assert float(clipped_second_moment(mu, sigma, 6.0)) == pytest.approx(float((a * a).mean()), abs=2e-2)


@pytest.mark.parametrize("rho", [-0.8, 0.0, 0.5, 0.95])
def test_relu6_cross_moment_vs_monte_carlo(rho):
    g = torch.Generator().manual_seed(1)
    u, v = torch.randn(2, 2_000_000, generator=g, dtype=torch.float64)
    y1 = 2.0 + 2.5 * u
    y2 = 4.0 + 1.5 * (rho * u + math.sqrt(1 - rho * rho) * v)
    mc = float((y1.clamp(0, 6) * y2.clamp(0, 6)).mean())
    assert float(clipped_cross_moment(2.0, 2.5, 4.0, 1.5, rho, 6.0)) == pytest.approx(mc, rel=3e-3)
    # hi = inf is the ReLU case
    mc_relu = float((y1.clamp_min(0) * y2.clamp_min(0)).mean())
    assert float(clipped_cross_moment(2.0, 2.5, 4.0, 1.5, rho)) == pytest.approx(mc_relu, rel=3e-3)


def test_mobilenet_v2_analysis_prunes_depthwise_with_the_expand_conv():
    gm = fxc.capture(pretrained_mobilenet_v2(), (torch.randn(1, 3, 224, 224),))
    chains = analyze(gm)
    dws = [n for n in chains if getattr(gm.get_submodule(n), "groups", 1) > 1]
    assert len(dws) == 17
    with_dw = [c for c in chains.values() if c.dw]
    assert len(with_dw) == 17 and all(c.prunable and c.stat_hi == 6.0 for c in with_dw)
    assert {c.dw for c in with_dw} == set(dws)
    assert chains["features.2.conv.0.0"].consumers == ["features.2.conv.2"]
    assert chains["features.18.0"].consumers == ["classifier.1"]  # through pooling + flatten + dropout
    # project convs feed residual adds (no activation): never pruned
    assert "ReLU" in chains["features.3.conv.2"].prune_blocker


@pytest.fixture(scope="module")
def mnv2_photos():
    model = pretrained_mobilenet_v2()
    x = photo_crops(16)
    with torch.no_grad():
        ref = model(x)
    return model, fxc.capture(model, (x[:1],)), x, ref


def _agree(gm, x, ref):
    with torch.no_grad():
        y = gm.eval()(x)
    return float((y.argmax(1) == ref.argmax(1)).float().mean()), float(F.cosine_similarity(y, ref).mean())


def test_mobilenet_v2_udfc_on_real_photos(mnv2_photos):
    model, gm, x, ref = mnv2_photos
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = udfc_pass(gm, UDFCConfig(prune_ratio=0.1, weight_bits=8))
    rows = {r.layer: r for r in res.report}
    assert all(len(r.note) <= 120 for r in res.report)
    dw_rows = [r for r in res.report if "depthwise" in r.note]
    assert len(dw_rows) == 17 and all(r.action == "pruned+quantized" for r in dw_rows)
    assert rows["features.2.conv.0.0"].action == "pruned+quantized" and "compensation: yes" in \
        rows["features.2.conv.0.0"].note
    assert not any(type(m) is nn.Conv2d for m in res.gm.modules())  # no conv left in float
    summary = res.gm.meta["udfc_summary"]
    assert "35 pruned" in summary and "17 x BatchNorm output is not followed by a ReLU" in summary
    top1, cos = _agree(res.gm, x, ref)
    top1_nc, cos_nc = _agree(udfc_pass(gm, UDFCConfig(prune_ratio=0.1, weight_bits=8, compensate=False)).gm, x, ref)
    assert cos > cos_nc + 0.1 and top1 >= top1_nc  # compensation helps on real photos
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # input model untouched


def test_mobilenet_v2_quantize_only_agrees_with_float(mnv2_photos):
    _, gm, x, ref = mnv2_photos
    res = udfc_pass(gm, UDFCConfig(prune=False, weight_bits=8))
    top1, cos = _agree(res.gm, x, ref)
    assert top1 >= 0.85 and cos > 0.99


def test_resnet18_prunes_block_convs_and_reports_ties():
    torch.manual_seed(0)
    model = resnet18(num_classes=10)
    x = torch.randn(4, 3, 64, 64)
    model.train()
    with torch.no_grad():
        model(x)  # BN statistics that match the input
    model.eval()
    res = udfc_pass(fxc.capture(model, (x,)), UDFCConfig(prune_ratio=0.3, weight_bits=8))
    rows = {r.layer: r for r in res.report}
    pruned = sorted(r.layer for r in res.report if r.action.startswith("pruned"))
    assert pruned == [f"layer{i}.{j}.conv1" for i in range(1, 5) for j in range(2)]
    assert rows["layer1.0.conv2"].shape_after[1] == 45  # 64 - floor(0.3 * 64)
    assert "tied" in rows["layer1.0.conv2"].note
    assert res.gm.eval()(x).shape == (4, 10)


def test_unsupported_activation_is_reported():
    class SiLUNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.bn, self.act, self.b = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.SiLU(), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.b(self.act(self.bn(self.a(x))))

    res = udfc_pass(fxc.capture(SiLUNet().eval(), (torch.randn(1, 3, 8, 8),)), UDFCConfig(skip=()))
    note = {r.layer: r for r in res.report}["a"].note
    assert "SiLU" in note and "no Gaussian moment model" in note and "compensation: no" in note
    assert "1 x activation a" in res.gm.meta["udfc_summary"] or "SiLU" in res.gm.meta["udfc_summary"]


def test_resnet50_analysis_prunes_the_two_inner_convs_of_every_bottleneck():
    """ResNet-50 (torchvision layout): conv1 -> bn -> relu -> conv2 -> bn -> relu -> conv3 per bottleneck; conv1 and
    conv2 are prunable (32 of 53 convs), conv3 and the downsample convs feed residual adds (tied, never pruned).
    The full UDFC pass on it (minutes on 2 cores) is measured by tools/eval_udfc_resnet50.py."""
    from fxcompress.models.vision import resnet50

    gm = fxc.capture(resnet50(num_classes=10).eval(), (torch.randn(1, 3, 64, 64),))
    chains = analyze(gm)
    prunable = sorted(n for n, c in chains.items() if c.prunable)
    blocks = [(i, j) for i, n in zip(range(1, 5), (3, 4, 6, 3)) for j in range(n)]
    assert prunable == sorted(f"layer{i}.{j}.conv{k}" for i, j in blocks for k in (1, 2))
    assert chains["layer1.0.conv1"].consumers == ["layer1.0.conv2"]
    assert chains["layer3.5.conv3"].prune_blocker and chains["layer2.0.downsample.0"].prune_blocker
