"""UDFC: the expectation formulas, the closed-form compensation, graph safety, bad input."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxcompress as fxc
from fxcompress.nn import QuantConv2d
from fxcompress.passes.channel_groups import analyze, channel_groups
from fxcompress.passes.udfc import (UDFCConfig, quantize_weight, relu_cross_moment, relu_mean,
                                    relu_second_moment, solve_compensation, udfc, udfc_pass)
from toymodels import ResidualCNN, same_state, state_copy


def _mc_relu(mu, sigma, n=2_000_000, seed=0):
    rng = np.random.default_rng(seed)
    return np.maximum(mu + sigma * rng.standard_normal(n), 0)


@pytest.mark.parametrize("mu,sigma", [(0.0, 1.0), (0.7, 0.3), (-0.5, 1.5), (-2.0, 0.5), (2.5, 0.2)])
def test_relu_moments_vs_monte_carlo(mu, sigma):
    a = _mc_relu(mu, sigma)
    # the formulas, written plainly: E[ReLU] = mu Phi + sigma phi; E[ReLU^2] = (mu^2+sigma^2) Phi + mu sigma phi
    r = mu / sigma
    phi, Phi = math.exp(-r * r / 2) / math.sqrt(2 * math.pi), 0.5 * (1 + math.erf(r / math.sqrt(2)))
    assert float(relu_mean(mu, sigma)) == pytest.approx(mu * Phi + sigma * phi, rel=1e-10, abs=1e-12)
    assert float(relu_second_moment(mu, sigma)) == pytest.approx((mu**2 + sigma**2) * Phi + mu * sigma * phi,
                                                                 rel=1e-10, abs=1e-12)
    tol = 4 * a.std() / math.sqrt(a.size) + 1e-6
    assert abs(float(relu_mean(mu, sigma)) - a.mean()) < tol
    assert abs(float(relu_second_moment(mu, sigma)) - (a**2).mean()) < 4 * (a**2).std() / math.sqrt(a.size) + 1e-6


@pytest.mark.parametrize("rho", [-0.8, 0.0, 0.5, 0.97])
def test_relu_cross_moment_vs_monte_carlo(rho):
    rng = np.random.default_rng(1)
    n = 2_000_000
    m1, s1, m2, s2 = 0.3, 1.2, -0.4, 0.8
    u = rng.standard_normal(n)
    v = rho * u + math.sqrt(1 - rho * rho) * rng.standard_normal(n)
    prod = np.maximum(m1 + s1 * u, 0) * np.maximum(m2 + s2 * v, 0)
    got = float(relu_cross_moment(m1, s1, m2, s2, rho))
    assert abs(got - prod.mean()) < 4 * prod.std() / math.sqrt(n) + 1e-6
    if rho == 0.0:  # independent channels: E[a1 a2] = E[a1] E[a2]
        assert got == pytest.approx(float(relu_mean(m1, s1) * relu_mean(m2, s2)), rel=1e-8)
    # rho = 1 with the same Gaussian is the second moment
    assert float(relu_cross_moment(m1, s1, m1, s1, 1.0)) == pytest.approx(float(relu_second_moment(m1, s1)),
                                                                         rel=1e-6)


def _sample_model(w, q, keep, gamma, beta, var, eps, shift, correlation, n, seed):
    """Draw (a, a~) from the BN Gaussian model that solve_compensation assumes."""
    rng = np.random.default_rng(seed)
    w, q = w.double().numpy(), q.double().numpy()
    g, b, v = gamma.double().numpy(), beta.double().numpy(), var.double().numpy()
    N, R = w.shape[0], len(keep)
    c = np.sqrt(v / (v + eps))
    if correlation == "weights":  # unit pre-activations correlated by filter cosines
        V = np.concatenate([w, q]) / np.linalg.norm(np.concatenate([w, q]), axis=1, keepdims=True)
        u = rng.standard_normal((n, V.shape[1])) @ V.T
        ua, ud = u[:, :N], u[:, N:]
    else:  # distinct channels independent; a kept channel and its damaged copy correlate by cos(w, q)
        ua = rng.standard_normal((n, N))
        cs = np.clip(np.sum(w[keep] * q, 1) / (np.linalg.norm(w[keep], axis=1) * np.linalg.norm(q, axis=1)), -1, 1)
        ud = cs * ua[:, keep] + np.sqrt(1 - cs**2) * rng.standard_normal((n, R))
    ratio = np.linalg.norm(q, axis=1) / np.linalg.norm(w[keep], axis=1)
    a = np.maximum(b + g * c * ua, 0)
    md = b[keep] + (g[keep] * shift.numpy() / np.sqrt(v[keep] + eps) if shift is not None else 0)
    d = np.maximum(md + g[keep] * c[keep] * ratio * ud, 0)
    return a, d


def _case(quantized=True):
    """The small BN chain of the least-squares test: N=6 channels, 4 kept, optionally 3-bit."""
    torch.manual_seed(0)
    w = torch.randn(6, 24)
    keep = torch.tensor([0, 2, 3, 5])
    q = quantize_weight(w[keep], 3, "per_channel")[1] if quantized else w[keep]
    gamma = torch.tensor([1.0, -0.5, 0.8, 1.3, 0.6, 0.9])
    beta = torch.tensor([0.2, 0.5, -0.3, 0.0, 0.4, 0.1])
    var = torch.tensor([1.0, 2.0, 0.5, 1.5, 0.8, 1.0])
    shift = torch.tensor([0.05, -0.1, 0.02, 0.0]) if quantized else None
    return w, q, keep, gamma, beta, var, 1e-5, shift


@pytest.mark.parametrize("correlation", ["independent", "weights"])
@pytest.mark.parametrize("quantized", [False, True])
def test_closed_form_compensation_matches_least_squares(correlation, quantized):
    args = _case(quantized)
    comp = solve_compensation(*args, correlation, True, ridge=0.0)
    a, d = _sample_model(*args, correlation, 400_000, 3)
    D = np.concatenate([d, np.ones((len(d), 1))], 1)
    sol, *_ = np.linalg.lstsq(D, a, rcond=None)  # (R+1, N): a ~= D @ sol
    np.testing.assert_allclose(comp.S.numpy(), sol[:-1].T, atol=0.03)
    np.testing.assert_allclose(comp.t.numpy(), sol[-1], atol=0.03)
    # the predicted residual second moment matches the sampled one
    res = a - D @ sol
    np.testing.assert_allclose(np.diag(comp.M.numpy()), (res**2).mean(0), atol=0.02)
    # and compensation never increases the modelled error
    assert np.trace(comp.M.numpy()) <= np.trace(comp.M0.numpy()) + 1e-9


@pytest.mark.parametrize("correlation", ["independent", "weights"])
@pytest.mark.parametrize("bias_correction", [False, True])
def test_single_merge_is_one_channel_least_squares(correlation, bias_correction):
    args = _case()
    w, q, keep, gamma = args[:4]
    comp = solve_compensation(*args, correlation, bias_correction, ridge=0.0, merge="single")
    S = comp.S.numpy()
    assert ((S != 0).sum(1) <= 1).all()  # at most one source channel per original channel
    # the partner: a kept channel itself, a pruned one the kept channel of largest sign-corrected filter cosine
    wn = F.normalize(w.double(), dim=1)
    qn = F.normalize(q.double(), dim=1)
    cos = (wn @ qn.T * torch.sign(gamma)[:, None] * torch.sign(gamma[keep])[None, :]).numpy()
    partner = [keep.tolist().index(i) if i in keep else int(cos[i].argmax()) for i in range(len(w))]
    # each row is the 1-D least squares of a_i on [d_j*, (1)] over activations sampled from the model
    a, d = _sample_model(*args, correlation, 400_000, 5)
    for i, j in enumerate(partner):
        D = np.stack([d[:, j], np.ones(len(d))], 1) if bias_correction else d[:, [j]]
        sol, *_ = np.linalg.lstsq(D, a[:, i], rcond=None)
        expect = np.zeros(len(keep))
        expect[j] = sol[0]
        np.testing.assert_allclose(S[i], expect, atol=0.03)
        assert float(comp.t[i]) == pytest.approx(sol[1] if bias_correction else 0.0, abs=0.03)
        res = a[:, i] - D @ sol
        assert float(comp.M[i, i]) == pytest.approx((res**2).mean(), abs=0.02)


@pytest.mark.parametrize("correlation", ["independent", "weights"])
@pytest.mark.parametrize("bias_correction", [False, True])
def test_single_merge_error_between_full_and_uncompensated(correlation, bias_correction):
    args = _case()
    full = solve_compensation(*args, correlation, bias_correction, ridge=0.0)
    single = solve_compensation(*args, correlation, bias_correction, ridge=0.0, merge="single")
    torch.testing.assert_close(single.M0, full.M0)
    # per channel (hence in trace): full least squares <= one-channel least squares <= no compensation
    assert (torch.diagonal(full.M) <= torch.diagonal(single.M) + 1e-9).all()
    assert (torch.diagonal(single.M) <= torch.diagonal(single.M0) + 1e-9).all()
    assert float(torch.trace(full.M)) <= float(torch.trace(single.M)) + 1e-9 < float(torch.trace(single.M0))
    # the default is the full solution
    torch.testing.assert_close(solve_compensation(*args, correlation, bias_correction, 0.0, merge="all").S, full.S)


@pytest.mark.parametrize("act_hi", [math.inf, 6.0])
def test_ridge_keeps_a_quiet_channel_instead_of_replacing_it_by_its_mean(act_hi):
    """Quantization only (nothing pruned), with channels that are almost always clipped to 0 (BN beta far below
    zero, small variance: EfficientNet-Lite0 has hundreds): their moments carry little signal, and the ridge pulls
    their row of [S t] toward no compensation (S = I), not toward 0, which would replace the channel by its mean."""
    torch.manual_seed(0)
    n, d = 8, 27
    w = torch.randn(n, d)
    q = w + 1e-3 * torch.randn(n, d)  # an 8-bit-like error
    gamma = torch.full((n,), 0.2)
    beta = torch.tensor([-1.0, -1.2, -1.5, 0.5, 1.0, 0.2, -1.3, 0.8])  # channels 0-2 and 6: quiet
    var = torch.tensor([1e-3, 1e-2, 5e-3, 1.0, 1.0, 1.0, 1e-4, 1.0])
    comp = solve_compensation(w, q, torch.arange(n), gamma, beta, var, 1e-3, None, "independent", True,
                              ridge=1e-4, act_hi=act_hi)
    assert torch.allclose(torch.diagonal(comp.S), torch.ones(n, dtype=comp.S.dtype), atol=0.05), comp.S.diagonal()
    assert float(torch.trace(comp.M)) <= float(torch.trace(comp.M0)) + 1e-12


def test_single_merge_through_the_pass():
    model = ResidualCNN(c=8).eval()
    x = torch.randn(2, 3, 8, 8)
    gm = fxc.capture(model, (x,))
    cfg = {"prune_ratio": 0.5, "quantize": False, "skip": ()}
    w_all = udfc_pass(gm, UDFCConfig(**cfg)).gm.get_submodule("conv2").weight
    w_one = udfc_pass(gm, UDFCConfig(**cfg, merge="single")).gm.get_submodule("conv2").weight
    assert w_one.shape == w_all.shape and not torch.allclose(w_one, w_all)


def _digits():
    from fxcompress.models import load_digits_split, pretrained_digits_resnet

    m = pretrained_digits_resnet()
    xtr, ytr, xte, yte = load_digits_split()
    return m, xte, yte


@pytest.mark.parametrize("bits", [2, 4, 6, 8])
def test_residual_cnn_shapes_and_input_untouched(bits):
    model = ResidualCNN(c=8).eval()
    for m in model.modules():  # non-trivial BN statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    x = torch.randn(2, 3, 8, 8)
    sd = state_copy(model)
    gm = fxc.capture(model, (x,))
    gsd = state_copy(gm)
    res = udfc_pass(gm, UDFCConfig(prune_ratio=0.5, weight_bits=bits, skip=()))
    assert same_state(model, sd) and same_state(gm, gsd)
    out = res.gm.eval()(x)
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    rows = {r.layer: r for r in res.report}
    assert rows["conv1"].action == "pruned+quantized" and rows["conv1"].shape_after[0] == 4
    assert rows["conv2"].shape_after[1] == 4 and "compensation: yes" in rows["conv1"].note
    assert "tied" in rows["stem"].note and rows["stem"].shape_after == rows["stem"].shape_before
    assert rows["head"].bits == bits and "no BatchNorm" in rows["head"].note
    assert isinstance(res.gm.get_submodule("conv1"), QuantConv2d)
    assert res.gm.get_submodule("bn1").num_features == 4


@pytest.mark.parametrize("model_name", ["residual", "digits"])
def test_prune_90_percent_every_layer_still_runs(model_name):
    if model_name == "digits":
        model, x, _ = _digits()
        x = x[:8]
    else:
        model, x = ResidualCNN(c=8).eval(), torch.randn(2, 3, 8, 8)
    for quantize in (False, True):
        res = udfc_pass(fxc.capture(model, (x,)), UDFCConfig(prune_ratio=0.9, weight_bits=3, skip=(),
                                                             quantize=quantize))
        out = res.gm.eval()(x)
        assert torch.isfinite(out).all() and out.shape[0] == x.shape[0]
        pruned = [r for r in res.report if "pruned" in r.action]
        assert pruned and all(r.shape_after[0] == max(1, r.shape_before[0] - int(0.9 * r.shape_before[0]))
                              for r in pruned)


def test_digits_compensation_recovers_accuracy_and_model_untouched():
    from fxcompress.models import accuracy

    model, x, y = _digits()
    sd = state_copy(model)
    gm = fxc.capture(model, (x[:4],))
    plain = udfc_pass(gm, UDFCConfig(prune_ratio=0.3, quantize=False, compensate=False)).gm.eval()
    comp = udfc(model, (x[:4],), UDFCConfig(prune_ratio=0.3, quantize=False)).eval()
    assert same_state(model, sd)
    a_plain, a_comp = accuracy(plain, x, y), accuracy(comp, x, y)
    assert a_comp > a_plain + 20, (a_plain, a_comp)
    assert sum(p.numel() for p in comp.parameters()) < sum(p.numel() for p in model.parameters())


def test_no_compensation_is_plain_pruning_and_plain_rtn():
    model, x, _ = _digits()
    gm = fxc.capture(model, (x[:4],))
    # plain RTN through the same code path == the rtn pass at 4 bits
    a = udfc_pass(gm, UDFCConfig(prune=False, weight_bits=4, compensate=False)).gm.eval()
    b = fxc.quantize_rtn(gm, fxc.RTNConfig(bits=4, symmetric=True, granularity="per_channel",
                                           exclude=("fc",))).eval()
    torch.testing.assert_close(a(x[:16]), b(x[:16]))
    # plain L1 pruning: the next layer is the original one with the pruned input channels removed
    res = udfc_pass(gm, UDFCConfig(prune_ratio=0.5, quantize=False, compensate=False, criterion="l1"))
    w1 = gm.get_submodule("layer1.0.conv1").weight
    keep = torch.sort(torch.topk(w1.abs().sum((1, 2, 3)), 16).indices).values
    torch.testing.assert_close(res.gm.get_submodule("layer1.0.conv2").weight,
                               gm.get_submodule("layer1.0.conv2").weight[:, keep])
    torch.testing.assert_close(res.gm.get_submodule("layer1.0.conv1").weight, w1[keep])


def test_sub_byte_bits_in_8bit_container():
    model, x, _ = _digits()
    res = udfc_pass(fxc.capture(model, (x[:4],)), UDFCConfig(prune=False, weight_bits=6))
    m = res.gm.get_submodule("layer1.0.conv1")
    assert m.spec.bits == 8
    codes = m.quant_weight.codes()
    assert int(codes.min()) >= -32 and int(codes.max()) <= 31
    assert "6-bit codes in an 8-bit container" in {r.layer: r for r in res.report}["layer1.0.conv1"].note


def test_save_load_roundtrip(tmp_path):
    model, x, _ = _digits()
    gm = udfc(model, (x[:4],), UDFCConfig(prune_ratio=0.3, weight_bits=4)).eval()
    fxc.save_artifact(gm, tmp_path / "m")
    back = fxc.load_artifact(tmp_path / "m").eval()
    torch.testing.assert_close(back(x[:8]), gm(x[:8]))
    assert any(r.pass_name == "udfc" for r in fxc.report(back))


class _NoBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)  # depthwise
        self.bn = nn.BatchNorm2d(8)
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c(F.relu(self.bn(self.b(F.relu(self.a(x))))))


def test_skips_are_reported():
    model = _NoBN().eval()
    x = torch.randn(1, 3, 6, 6)
    res = udfc_pass(fxc.capture(model, (x,)), UDFCConfig(prune_ratio=0.5, skip=()))
    rows = {r.layer: r for r in res.report}
    assert "no BatchNorm" in rows["a"].note and rows["a"].shape_after == rows["a"].shape_before
    # a depthwise conv not fed by a prunable producer: quantized and compensated into c, never pruned
    assert rows["b"].action == "quantized" and "depthwise" in rows["b"].note
    assert "compensation: yes" in rows["b"].note and rows["b"].shape_after == rows["b"].shape_before
    assert res.gm.eval()(x).shape == (1, 4, 6, 6)
    groups = channel_groups(fxc.capture(model, (x,)))
    assert ("a",) in groups


def test_channel_groups_digits():
    model, x, _ = _digits()
    gm = fxc.capture(model, (x[:4],))
    groups = channel_groups(gm)
    assert ("conv1", "layer1.0.conv2", "layer1.1.conv2") in groups
    assert ("layer2.0.conv2", "layer2.0.shortcut.0", "layer2.1.conv2") in groups
    chains = analyze(gm)
    assert [n for n, c in chains.items() if c.prunable] == ["layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1",
                                                            "layer2.1.conv1"]


@pytest.mark.parametrize("kw,field", [
    (dict(prune_ratio=1.0), "prune_ratio"), (dict(prune_ratio=-0.1), "prune_ratio"),
    (dict(prune_ratio="0.3"), "prune_ratio"), (dict(weight_bits=1), "weight_bits"),
    (dict(weight_bits=9), "weight_bits"), (dict(weight_bits=6.0), "weight_bits"),
    (dict(weight_bits=True), "weight_bits"), (dict(criterion="l3"), "criterion"),
    (dict(granularity="per_group"), "granularity"), (dict(skip="fc"), "skip"),
    (dict(correlation="full"), "correlation"), (dict(compensate=1), "compensate"),
    (dict(merge="pairs"), "merge"), (dict(merge=None), "merge"),
])
def test_bad_config(kw, field):
    with pytest.raises(ValueError, match=field):
        UDFCConfig(**kw)


def test_bad_pass_input():
    with pytest.raises(ValueError, match="GraphModule"):
        udfc_pass(ResidualCNN(), UDFCConfig())
    with pytest.raises(ValueError, match="UDFCConfig"):
        udfc_pass(fxc.capture(ResidualCNN(), None), {"prune_ratio": 0.3})
