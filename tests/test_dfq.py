"""DFQ (cross-layer equalization + bias correction): float invariance, equalized ranges, bias correction, bad input."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxcompress as fxc
from fxcompress.passes.dfq import DFQConfig, dfq_pass


class Chain(nn.Module):
    """conv -> BN -> act -> depthwise -> BN -> act -> conv -> BN, pooled linear head (MobileNetV2's block)."""

    def __init__(self, act=nn.ReLU):
        super().__init__()
        self.c1, self.b1, self.a1 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), act()
        self.dw, self.b2, self.a2 = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16), act()
        self.c3, self.b3 = nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = self.a2(self.b2(self.dw(self.a1(self.b1(self.c1(x))))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.b3(self.c3(y)), 1), 1))


def _model(act=nn.ReLU, seed=0):
    torch.manual_seed(seed)
    m = Chain(act)
    with torch.no_grad():  # channels of very different ranges: what equalization is for
        m.b1.weight.copy_(torch.logspace(-2, 1, 16))
        m.b2.weight.copy_(torch.logspace(1, -2, 16)[torch.randperm(16)])
    x = torch.randn(512, 3, 10, 10, generator=torch.Generator().manual_seed(seed))
    for bn in (m.b1, m.b2, m.b3):
        bn.momentum = None  # BN statistics of exactly this data
    m.train()
    with torch.no_grad():
        m(x)
    return m.eval(), x


def test_equalization_keeps_the_float_function_and_equalizes_ranges():
    m, x = _model()
    gm = fxc.capture(m, (x[:1],))
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    res = dfq_pass(gm, DFQConfig(weight_bits=None))
    with torch.no_grad():
        torch.testing.assert_close(res.gm(x), m(x), rtol=1e-4, atol=1e-5)
    assert all(torch.equal(v, gm.state_dict()[k]) for k, v in before.items())  # the input is not modified
    q = res.gm
    # plain reference: after equalization, conv1's BN-folded output range of channel i equals dw's range of channel i
    gain = (q.b1.weight.detach() / torch.sqrt(q.b1.running_var + q.b1.eps)).abs()
    r1 = q.c1.weight.detach().flatten(1).abs().amax(1) * gain
    r2 = q.dw.weight.detach().flatten(1).abs().amax(1)
    torch.testing.assert_close(r1, r2, rtol=1e-3, atol=0)
    r1_before = m.c1.weight.detach().flatten(1).abs().amax(1) * (m.b1.weight.detach() / torch.sqrt(m.b1.running_var + m.b1.eps)).abs()
    assert float(r1_before.max() / r1_before.min()) > 10 * float(r1.max() / r1.min())
    assert {r.layer for r in res.report if r.action == "equalized"} == {"dw", "c3"}


def test_bias_correction_reduces_the_output_mean_error():
    m, x = _model()
    gm = fxc.capture(m, (x[:1],))
    with torch.no_grad():
        ref = m.b3(m.c3(m.a2(m.b2(m.dw(m.a1(m.b1(m.c1(x))))))))
    errs = {}
    for bc in (False, True):
        q = dfq_pass(gm, DFQConfig(equalize=False, weight_bits=3, bias_correction=bc)).gm
        got = {}
        q.get_submodule("c3").register_forward_hook(lambda mod, i, o: got.__setitem__("y", o))
        with torch.no_grad():
            q(x)
        errs[bc] = float((got["y"] - ref).mean((0, 2, 3)).abs().mean())
    assert errs[True] < 0.5 * errs[False], errs


def test_relu6_is_replaced_or_skipped_and_reported():
    m, x = _model(act=nn.ReLU6)
    gm = fxc.capture(m, (x[:1],))
    res = dfq_pass(gm, DFQConfig(weight_bits=None))
    assert type(res.gm.a1) is nn.ReLU and "ReLU6 before it replaced by ReLU" in {r.layer: r for r in res.report}["dw"].note
    res = dfq_pass(gm, DFQConfig(relu6="skip", weight_bits=8))
    rows = {(r.layer, r.action): r for r in res.report}
    assert ("dw", "skipped") in rows and "not positively homogeneous" in rows[("dw", "skipped")].note
    assert type(res.gm.a1) is nn.ReLU6


def test_nothing_to_compress_and_bad_config():
    lin = nn.Sequential(nn.Linear(4, 4))
    gm = fxc.capture(lin, (torch.randn(1, 4),))
    with pytest.raises(fxc.NothingToCompressError, match="dfq changed nothing"):
        dfq_pass(gm, DFQConfig(weight_bits=None))
    for kw, field in [(dict(relu6="clip"), "relu6"), (dict(weight_bits=9), "weight_bits"), (dict(sweeps=0), "sweeps")]:
        with pytest.raises(ValueError, match=field):
            DFQConfig(**kw)
    with pytest.raises(ValueError, match="DFQConfig"):
        dfq_pass(gm, {"weight_bits": 8})


def test_public_name_and_composition_with_integer_activations():
    m, x = _model()
    e = fxc.dfq(m, (x[:1],), fxc.DFQConfig(weight_bits=None))
    q = fxc.quantize_activations(e, (x[:1],), fxc.ActivationConfig(input_range=(-5.0, 5.0)))
    with torch.no_grad():
        assert F.cosine_similarity(q(x[:64]), m(x[:64])).mean() > 0.98


class _SamePadConv(torch.nn.Conv2d):
    """A Conv2d subclass with its own forward (EfficientNet-Lite's Conv2dStaticSamePadding): tracing goes through
    it, leaving a conv2d call on the weight attribute, which capture lifts into an nn.Conv2d call site."""

    def forward(self, x):
        return torch.nn.functional.conv2d(torch.nn.functional.pad(x, (0, 1, 0, 1)), self.weight, self.bias,
                                          self.stride, 0, self.dilation, self.groups)


class _NormedConv(torch.nn.Conv2d):
    """A conv whose forward also reads its weight elsewhere (a weight norm): it cannot become a plain nn.Conv2d."""

    def forward(self, x):
        return torch.nn.functional.conv2d(x, self.weight, self.bias, self.stride, self.padding) * self.weight.norm()


def _custom_forward_model(conv):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                            conv, torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                            torch.nn.Conv2d(8, 4, 1), torch.nn.BatchNorm2d(4)).eval()
    for bn in (m[1], m[4], m[7]):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return m


def test_layers_inside_a_custom_forward_are_lifted_and_compressed():
    from fxcompress.passes.activations import ActivationConfig, quantize_activations_pass

    m = _custom_forward_model(_SamePadConv(8, 8, 3, stride=2))
    x = torch.randn(2, 3, 16, 16)
    gm = fxc.capture(m, (x,))
    for res in (fxc.dfq_pass(gm, fxc.DFQConfig(weight_bits=8)), quantize_activations_pass(gm, ActivationConfig())):
        assert not [r for r in res.report if r.action == "skipped" and "lifted" in r.note], res.report
        assert any(r.layer == "3" and r.action == "quantized" for r in res.report), res.report
    eq = fxc.dfq_pass(gm, fxc.DFQConfig(weight_bits=None))  # the pad between ReLU and conv '3' keeps the pair
    assert {r.layer for r in eq.report if r.action == "equalized"} == {"3", "6"}, eq.report
    with torch.no_grad():
        torch.testing.assert_close(eq.gm(x), m(x), rtol=1e-4, atol=1e-5)


def test_layers_that_cannot_be_lifted_are_reported_with_the_reason():
    from fxcompress.passes.activations import ActivationConfig, quantize_activations_pass

    m = _custom_forward_model(_NormedConv(8, 8, 3, padding=1))
    x = torch.randn(2, 3, 16, 16)
    gm = fxc.capture(m, (x,))
    for res in (fxc.dfq_pass(gm, fxc.DFQConfig(weight_bits=8)), quantize_activations_pass(gm, ActivationConfig())):
        rows = [r for r in res.report if r.action == "skipped" and "not lifted" in r.note]
        assert len(rows) == 1 and rows[0].op == "conv2d" and "also read by" in rows[0].note, \
            [(r.layer, r.action, r.note) for r in res.report]
