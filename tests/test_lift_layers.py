"""Functional conv2d / linear calls on a module's own weight lifted into nn.Conv2d / nn.Linear at capture, and
EfficientNet-Lite0 (whose every conv is such a call) through UDFC, integer activations and ONNX Runtime."""
import collections

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import fxcompress as fxc
from fxcompress.passes.lift_layers import LIFT_KEY, lift_functional_layers, zero_pad_amounts


class SamePadConv(nn.Conv2d):
    """TensorFlow "same" padding like EfficientNet-Lite's Conv2dStaticSamePadding: a ZeroPad2d, then F.conv2d."""

    def __init__(self, cin, cout, k, stride=1, groups=1, bias=False, size=16):
        super().__init__(cin, cout, k, stride, groups=groups, bias=bias)
        out = -(-size // stride)
        pad = max((out - 1) * stride + k - size, 0)
        self.static_padding = nn.ZeroPad2d((pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))

    def forward(self, x):
        return F.conv2d(self.static_padding(x), self.weight, self.bias, self.stride, self.padding, self.dilation,
                        self.groups)


class OwnLinear(nn.Linear):
    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = SamePadConv(3, 8, 3, stride=2, size=16)  # pad (0, 1, 0, 1): asymmetric, kept
        self.bn0 = nn.BatchNorm2d(8)
        self.act = nn.ReLU6()
        self.dw = SamePadConv(8, 8, 5, groups=8, size=8)  # pad (2, 2, 2, 2): symmetric, folded
        self.bn1 = nn.BatchNorm2d(8)
        self.head = OwnLinear(8, 5)

    def forward(self, x):
        x = self.act(self.bn0(self.stem(x)))
        x = self.act(self.bn1(self.dw(x)))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _net():
    torch.manual_seed(0)
    m = Net().eval()
    for bn in (m.bn0, m.bn1):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return m


def test_lifting_keeps_the_function_and_the_names_and_leaves_the_model_alone():
    m = _net()
    state = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(2, 3, 16, 16)
    gm = fxc.capture(m, (x,))
    mods = {n.target: type(gm.get_submodule(n.target)) for n in gm.graph.nodes if n.op == "call_module"}
    assert mods["stem"] is nn.Conv2d and mods["dw"] is nn.Conv2d and mods["head"] is nn.Linear
    assert not [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (F.conv2d, F.linear)]
    assert gm.get_submodule("stem").padding == (0, 0) and gm.get_submodule("dw").padding == (2, 2)
    pads = [n for n in gm.graph.nodes if zero_pad_amounts(gm, n) is not None]
    assert len(pads) == 1 and zero_pad_amounts(gm, pads[0]) == (0, 1, 0, 1)  # the asymmetric one, before stem
    assert [u.target for u in pads[0].users] == ["stem"]
    with torch.no_grad():
        torch.testing.assert_close(gm(x), m(x), rtol=0, atol=0)
    rows = gm.meta[LIFT_KEY]
    assert [(r["layer"], r["action"]) for r in rows] == [("stem", "lifted"), ("dw", "lifted"), ("head", "lifted")]
    assert "asymmetric zero pad (0, 1, 0, 1) kept" in rows[0]["note"] and "folded" in rows[1]["note"]
    # the user's model: same classes, same tensors, not the graph's tensors
    assert type(m.stem) is SamePadConv and isinstance(m.stem.static_padding, nn.ZeroPad2d)
    assert all(torch.equal(state[k], v) for k, v in m.state_dict().items())
    assert gm.get_submodule("stem").weight is not m.stem.weight
    assert set(dict(gm.named_parameters())) == {k for k in state if not k.startswith("bn") or "running" not in k
                                                and "num_batches" not in k}
    # lift=False keeps the functional calls
    raw = fxc.capture(m, (x,), lift=False)
    assert sum(n.op == "call_function" and n.target is F.conv2d for n in raw.graph.nodes) == 2
    with pytest.raises(ValueError, match="lift"):
        fxc.capture(m, (x,), lift="yes")


def test_lifting_a_plain_symbolic_trace_and_what_cannot_be_lifted():
    class Tied(nn.Module):  # the conv's weight also feeds another op: no plain nn.Conv2d can hold it
        def __init__(self):
            super().__init__()
            self.conv = SamePadConv(3, 4, 3, size=8)

        def forward(self, x):
            return self.conv(x) * self.conv.weight.abs().mean()

    m = Tied().eval()
    gm = fx.symbolic_trace(m)
    rows = lift_functional_layers(gm)
    assert [(r.layer, r.action) for r in rows] == [("conv", "skipped")] and "also read by" in rows[0].note
    assert sum(n.op == "call_function" and n.target is F.conv2d for n in gm.graph.nodes) == 1
    # a plain trace of the liftable net (not through fxcompress.capture) is lifted by the pass directly
    net = _net()
    gm = fx.symbolic_trace(net)
    rows = lift_functional_layers(gm)
    assert [r.action for r in rows] == ["lifted"] * 3
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), net(x), rtol=0, atol=0)
    assert lift_functional_layers(gm) == []  # nothing left: a second run changes nothing


@pytest.fixture(scope="module")
def effnet():
    from fxcompress.data.images import photo_crops
    from fxcompress.models.vision import pretrained_efficientnet_lite0

    m = pretrained_efficientnet_lite0()
    x = photo_crops(8, seed=5)
    return m, x, fxc.capture(m, (x[:1],))


def test_efficientnet_lite0_capture_has_only_module_convs(effnet):
    m, x, gm = effnet
    convs = [n for n in gm.graph.nodes if n.op == "call_module" and type(gm.get_submodule(n.target)) is nn.Conv2d]
    assert len(convs) == 49 and {n.target for n in convs} == {
        name for name, mod in m.named_modules() if isinstance(mod, nn.Conv2d)}
    assert not [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (F.conv2d, F.linear)]
    pads = [zero_pad_amounts(gm, n) for n in gm.graph.nodes if zero_pad_amounts(gm, n) is not None]
    assert sorted(pads) == [(0, 1, 0, 1)] * 3 + [(1, 2, 1, 2)] * 2  # the 5 stride-2 convs; the others folded
    with torch.no_grad():
        torch.testing.assert_close(gm(x), m(x), rtol=1e-5, atol=1e-5)


def test_efficientnet_lite0_udfc_covers_every_conv(effnet):
    from fxcompress.passes.udfc import UDFCConfig, udfc_pass

    m, x, gm = effnet
    res = udfc_pass(gm, UDFCConfig(prune_ratio=0.3, weight_bits=8))
    rows = {r.layer: r for r in res.report}
    convs = {name for name, mod in m.named_modules() if isinstance(mod, nn.Conv2d)}
    assert convs | {"_fc"} == set(rows), set(rows) ^ convs
    assert all(r.action != "skipped" for r in rows.values())
    # every expand conv (and the stem, and the head conv) pruned with its depthwise conv, compensated after it
    dw = {n for n in convs if "_depthwise_conv" in n}
    assert all(rows[n].action == "pruned+quantized" and rows[n].note.startswith("depthwise:") for n in dw)
    producers = {n for n in convs if "_expand_conv" in n} | {"_conv_stem", "_conv_head"}
    assert all(rows[n].action == "pruned+quantized" and "compensation: yes" in rows[n].note for n in producers)
    # the project convs feed residual adds / the next block without an activation: quantized, reasons given
    assert all("not pruned: BatchNorm output is not followed by a ReLU/ReLU6" in rows[n].note
               for n in convs if "_project_conv" in n)
    with torch.no_grad():
        y = res.gm(x)
    assert y.shape == (8, 1000) and torch.isfinite(y).all()


def test_efficientnet_lite0_int8_activations_and_onnx_parity(effnet, tmp_path):
    from fxcompress.data.images import IMAGENET_INPUT_RANGE
    from fxcompress.passes.activations import ActivationConfig, quantize_activations
    from fxcompress.runtime.ort import load_ort

    m, x, gm = effnet
    q = quantize_activations(gm, (x[:1],), ActivationConfig(input_range=IMAGENET_INPUT_RANGE))
    rows = fxc.report(q)
    assert not [r for r in rows if r.op in ("conv2d", "linear") and r.action != "quantized"], rows
    assert sum(r.op == "conv2d" and r.action == "quantized" for r in rows) == 49
    # quantized before each asymmetric pad, so that ORT fuses DequantizeLinear -> Pad -> Conv
    for n in q.graph.nodes:
        if zero_pad_amounts(q, n) is not None:
            assert n.args[0].target is torch.fake_quantize_per_tensor_affine
    runner = load_ort(fxc.export_onnx(q, (x[:1],), tmp_path / "effnet_int8.onnx"), intra_op_num_threads=2)
    ops = runner.optimized_op_types()
    assert ops["QLinearConv"] == 49 and ops["QLinearAdd"] == 9, ops
    assert not {k: v for k, v in ops.items() if k in ("Conv", "FusedConv", "Pad", "Add", "Clip", "Gemm")}, ops
    with torch.no_grad():
        yq, y32 = q(x), m(x)
    y8 = torch.as_tensor(runner.run(x)[0])
    assert float(F.cosine_similarity(y8, yq).mean()) > 0.998  # ORT's integer kernels vs the torch fake-quant graph
    assert float(F.cosine_similarity(y8, y32).mean()) > 0.99
    assert float((y8.argmax(1) == y32.argmax(1)).float().mean()) >= 0.6
    assert collections.Counter(r.action for r in rows if r.op == "activation")["skipped"] == 0


@pytest.mark.parametrize("activations", [False, True])
def test_lifted_pad_and_convs_lower_to_tvm(activations):
    """The lifted graph (F.pad before the stride-2 conv, the symmetric pad folded) through TVM's importer (LLVM):
    int8 weights, and int8 weights + activations, equal the torch model they were built from."""
    pytest.importorskip("tvm")
    from fxcompress.backends.tvm import compile_tvm

    m = _net()
    x = torch.randn(2, 3, 16, 16)
    gm = fxc.capture(m, (x,))
    assert F.pad in {n.target for n in gm.graph.nodes if n.op == "call_function"}
    q = fxc.quantize_rtn(gm, fxc.RTNConfig(bits=8, granularity="per_channel"))
    q = getattr(q, "gm", q)
    if activations:
        q = fxc.quantize_activations(q, (x,), fxc.ActivationConfig())
    out = compile_tvm(q, (x,), target="llvm")(x)
    out = torch.as_tensor(out[0] if isinstance(out, (tuple, list)) else out)
    with torch.no_grad():
        ref = q(x)
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
