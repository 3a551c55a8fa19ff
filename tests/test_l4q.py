import copy

import pytest
import torch

import fxcompress as fxc
from fxcompress.nn import L4QLinear, QuantLinear
from fxcompress.quant.l4q_fn import l4q_linear, l4q_linear_naive
from toymodels import DecoderBlock, ShapeDependent, same_state, state_copy

CFG = fxc.L4QConfig(bits=4, group_size=32, lora_rank=4, lora_alpha=8.0)


def _params(out_f=24, in_f=64, rank=4, group=16, bits=3, symmetric=False, bias=True, dtype=torch.float64):
    torch.manual_seed(1)
    w0 = torch.randn(out_f, in_f, dtype=dtype) * 0.1
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    ng = in_f // (group or in_f)
    a = (torch.randn(rank, in_f, dtype=dtype) * 0.3).requires_grad_()
    b = (torch.randn(out_f, rank, dtype=dtype) * 0.3).requires_grad_()
    s = (torch.rand(out_f, ng, dtype=dtype) * 0.02 + 0.03).requires_grad_()
    off = None if symmetric else (torch.randn(out_f, ng, dtype=dtype) * 0.05 - 0.2).requires_grad_()
    bi = torch.randn(out_f, dtype=dtype).requires_grad_() if bias else None
    x = torch.randn(3, 5, in_f, dtype=dtype).requires_grad_()
    return x, w0, a, b, s, off, bi, 0.5, qmin, qmax, group


@pytest.mark.parametrize("group,symmetric,bits", [(16, False, 3), (None, False, 4), (32, True, 2), (16, True, 8)])
def test_fused_equals_naive_autograd(group, symmetric, bits):
    args = _params(group=group, symmetric=symmetric, bits=bits)
    g = torch.randn(3, 5, 24, dtype=torch.float64)
    leaves = [t for t in args if isinstance(t, torch.Tensor) and t.requires_grad]
    y1 = l4q_linear(*args, grad_scale=0.3)
    grads1 = torch.autograd.grad(y1, leaves, g)
    y2 = l4q_linear_naive(*args, grad_scale=0.3)
    grads2 = torch.autograd.grad(y2, leaves, g)
    assert torch.allclose(y1, y2, atol=1e-12)
    for a, b in zip(grads1, grads2):
        assert torch.allclose(a, b, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("rank", [4, 0])
def test_frozen_weight_never_changes(rank):
    x, w0, a, b, s, off, bi, ls, qmin, qmax, group = _params(group=16, bits=3)
    w0_before = w0.clone()
    a, b = (a, b) if rank else (None, None)
    l4q_linear(x, w0, a, b, s, off, bi, ls, qmin, qmax, group).sum().backward()
    assert torch.equal(w0, w0_before)


def test_gradients_match_hand_derivation():
    x, w0, a, b, s, off, bi, ls, qmin, qmax, group = _params(group=16, bits=3)
    g = torch.randn(3, 5, 24, dtype=torch.float64)
    y = l4q_linear(x, w0, a, b, s, off, bi, ls, qmin, qmax, group)
    ga, gb, gs, go = torch.autograd.grad(y, [a, b, s, off], g)
    with torch.no_grad():
        w = w0 + ls * b @ a
        v = (w.reshape(24, 4, 16) - off[..., None]) / s[..., None]
        m = ((v >= qmin) & (v <= qmax)).double()
        gwq = (g.reshape(-1, 24).t() @ x.reshape(-1, 64)).reshape(24, 4, 16)
        gw = (gwq * m).reshape(24, 64)
        assert torch.allclose(ga, ls * b.t() @ gw) and torch.allclose(gb, ls * gw @ a.t())
        ds = torch.where(m.bool(), torch.round(v) - v, torch.where(v < qmin, qmin, qmax).double())
        assert torch.allclose(gs, (gwq * ds).sum(-1)) and torch.allclose(go, (gwq * (1 - m)).sum(-1))
        assert ((v < qmin) | (v > qmax)).any()  # both branches exercised


def test_gradcheck_input():
    """The fused function is linear in x for fixed quantizer state: gradcheck its input Jacobian."""
    x, w0, a, b, s, off, bi, ls, qmin, qmax, group = _params(group=16, bits=4)
    torch.autograd.gradcheck(lambda t: l4q_linear(t, w0, a.detach(), b.detach(), s.detach(), off.detach(),
                                                  bi.detach(), ls, qmin, qmax, group), (x[:1, :2],))


def test_fused_saves_no_weight_sized_tensors():
    """Memory lean: the fused op keeps only x and references to parameters for backward."""
    x, w0, a, b, s, off, bi, ls, qmin, qmax, group = _params(out_f=256, in_f=256, group=16)
    params = {t.data_ptr() for t in (w0, a, b, s, off, bi)}

    def saved_bytes(fn):
        total = []

        def pack(t):
            if t.data_ptr() not in params and t.data_ptr() != x.data_ptr():
                total.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(x, w0, a, b, s, off, bi, ls, qmin, qmax, group)
        return sum(total)

    assert saved_bytes(l4q_linear) == 0
    assert saved_bytes(l4q_linear_naive) >= 256 * 256 * 8  # at least one weight-sized tensor


def test_step0_equals_rtn_and_only_adapters_train():
    m = DecoderBlock().eval()
    x = torch.randn(2, 5, 64)
    sd = state_copy(m)
    qm = fxc.prepare_l4q(m, (x,), CFG)
    assert same_state(m, sd)
    rtn = fxc.rtn_pass(fxc.capture(m, (x,)), fxc.RTNConfig(bits=4, symmetric=False, granularity="per_group",
                                                               group_size=32))
    for name in ("q_proj", "down_proj"):
        layer = qm.get_submodule(name)
        assert isinstance(layer, L4QLinear)
        assert torch.allclose(layer.fake_quant_weight(), rtn.gm.get_submodule(name).dequantized_weight(), atol=1e-6)
    assert torch.allclose(qm(x), rtn.gm(x), atol=1e-5)
    trainable = {n.rsplit(".", 1)[1] for n, p in qm.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B", "scale", "offset"}
    assert len(fxc.l4q_trainable_parameters(qm)) == 7 * 4


def _train(qm, teacher, x, steps, lr=2e-3, opt=None, qlr=1e-4):
    opt = opt or torch.optim.Adam(fxc.l4q_param_groups(qm, lora_lr=lr, quant_lr=qlr))
    losses = []
    for _ in range(steps):
        loss = (qm(x) - teacher(x).detach()).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, opt


def test_training_improves_over_rtn_then_convert_matches():
    torch.manual_seed(0)
    m = DecoderBlock().eval()
    x = torch.randn(4, 8, 64)
    qm = fxc.prepare_l4q(m, (x,), fxc.L4QConfig(bits=3, group_size=32, lora_rank=4, lora_alpha=8.0))
    losses, _ = _train(qm, m, x, 60)
    assert losses[-1] < 0.6 * losses[0]
    assert qm.get_submodule("q_proj").lora_B.detach().abs().max() > 0  # the adapters trained
    dm = fxc.convert_l4q(qm)
    with torch.no_grad():
        assert torch.allclose(dm(x), qm(x), atol=1e-5)
    assert not any(isinstance(mod, L4QLinear) for mod in dm.modules())
    assert not any("lora" in n for n, _ in dm.named_parameters())
    for name in ("q_proj", "gate_proj"):
        ql = dm.get_submodule(name)
        assert isinstance(ql, QuantLinear)
        codes = ql.quant_weight.codes()
        assert codes.min() >= 0 and codes.max() <= 7
        assert torch.allclose(ql.dequantized_weight(), qm.get_submodule(name).fake_quant_weight(), atol=1e-6)
    rows = fxc.report(dm).rows("quantized")
    assert len(rows) == 7 and all(r.bits == 3 for r in rows)


def test_lsq_only_baseline_has_no_adapters():
    m = DecoderBlock().eval()
    x = torch.randn(2, 4, 64)
    qm = fxc.prepare_l4q(m, (x,), fxc.L4QConfig(bits=4, group_size=32, lora=False))
    layer = qm.get_submodule("v_proj")
    assert layer.lora_A is None and {n.rsplit(".", 1)[1] for n, p in qm.named_parameters() if p.requires_grad} \
        == {"scale", "offset"}
    losses, _ = _train(qm, m, x, 20, lr=1e-4)
    assert losses[-1] < losses[0]


def test_per_channel_symmetric_and_export_graph():
    m = ShapeDependent()
    x = torch.randn(3, 4)
    qm = fxc.prepare_l4q(m, (x,), fxc.L4QConfig(bits=8, group_size=None, symmetric=True, lora_rank=2))
    assert isinstance(qm.get_submodule("fc"), L4QLinear) and qm.get_submodule("fc").offset is None
    _train(qm, m, x, 3)
    dm = fxc.convert_l4q(qm)
    assert torch.allclose(dm(x), qm(x), atol=1e-5)


def test_bad_input():
    m = DecoderBlock(d=64, ffn=96).eval()
    x = torch.randn(1, 3, 64)
    with pytest.raises(ValueError, match="bits"):
        fxc.L4QConfig(bits=5)
    with pytest.raises(ValueError, match="lora_rank"):
        fxc.L4QConfig(lora_rank=0)
    with pytest.raises(ValueError, match="lora_rank=65 exceeds"):
        fxc.prepare_l4q(m, (x,), fxc.L4QConfig(bits=4, group_size=32, lora_rank=65))
    with pytest.raises(ValueError, match="match no linear layer; available: q_proj, k_proj"):
        fxc.prepare_l4q(m, (x,), fxc.L4QConfig(targets=("mlp.*",)))
    qm = fxc.prepare_l4q(m, (x,), fxc.L4QConfig(bits=4, group_size=64, lora_rank=4))
    skipped = [r for r in fxc.report(qm) if r.action == "skipped"]
    assert [r.layer for r in skipped] == ["down_proj"] and "does not divide in_features=96" in skipped[0].note
    assert type(qm.get_submodule("down_proj")) is torch.nn.Linear
    with pytest.raises(ValueError, match="was it prepared with prepare_l4q"):
        fxc.convert_l4q(fxc.capture(m, (x,)))
    with pytest.raises(ValueError, match="GraphModule"):
        fxc.convert_l4q(m)
    conv_only = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    with pytest.raises(fxc.NothingToCompressError, match="no linear layers"):
        fxc.prepare_l4q(conv_only, (torch.randn(1, 3, 8, 8),), fxc.L4QConfig(bits=4, group_size=32, lora_rank=4))
    two = torch.nn.Sequential(torch.nn.Linear(48, 24), torch.nn.ReLU(), torch.nn.Linear(24, 8))
    with pytest.raises(fxc.NothingToCompressError, match="group_size=64 does not divide in_features=48.*Try group_size"):
        fxc.prepare_l4q(two, (torch.randn(2, 48),), fxc.L4QConfig(bits=4, group_size=64, lora_rank=4))


def test_torch_compile_trains_without_graph_breaks():
    m = DecoderBlock().eval()
    x = torch.randn(2, 5, 64)
    qm = fxc.prepare_l4q(m, (x,), CFG)
    cm = torch.compile(qm, fullgraph=True)  # fullgraph: any graph break is an error
    losses, _ = _train(cm, m, x, 3, lr=1e-3)
    assert all(torch.isfinite(torch.tensor(losses)))
    dm = fxc.convert_l4q(cm)  # unwraps the compiled module
    assert torch.allclose(dm(x), qm(x), atol=1e-5)


def test_checkpoint_resume_gives_same_loss_curve(tmp_path):
    m = DecoderBlock().eval()
    x = torch.randn(2, 6, 64)
    base = fxc.prepare_l4q(m, (x,), CFG)
    run = copy.deepcopy(base)
    full, _ = _train(run, m, x, 10)

    first = copy.deepcopy(base)
    part1, opt = _train(first, m, x, 5)
    trainable = {n for n, p in first.named_parameters() if p.requires_grad}
    torch.save({"model": {k: v for k, v in first.state_dict().items() if k in trainable},
                "optim": opt.state_dict()}, tmp_path / "ckpt.pt")
    resumed = copy.deepcopy(base)
    ck = torch.load(tmp_path / "ckpt.pt")
    missing = resumed.load_state_dict(ck["model"], strict=False)
    assert not missing.unexpected_keys
    opt2 = torch.optim.Adam(fxc.l4q_param_groups(resumed, lora_lr=2e-3, quant_lr=1e-4))
    opt2.load_state_dict(ck["optim"])
    part2, _ = _train(resumed, m, x, 5, opt=opt2)
    assert part1 + part2 == pytest.approx(full, rel=1e-6, abs=1e-9)


def test_convert_save_load_bit_exact(tmp_path):
    m = DecoderBlock().eval()
    x = torch.randn(2, 4, 64)
    qm = fxc.prepare_l4q(m, (x,), CFG)
    _train(qm, m, x, 5)
    dm = fxc.convert_l4q(qm)
    fxc.save_artifact(dm, tmp_path / "out")
    dm2 = fxc.load_artifact(tmp_path / "out")
    assert torch.equal(dm(x), dm2(x))
    q1, q2 = dm.get_submodule("o_proj").quant_weight, dm2.get_submodule("o_proj").quant_weight
    assert torch.equal(q1.packed, q2.packed) and torch.equal(q1.zero_point, q2.zero_point)
    assert [r.layer for r in fxc.report(dm2)][-7:] == [r.layer for r in fxc.report(dm)][-7:]
