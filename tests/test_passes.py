import pytest
import torch
from torch.fx.passes.infra.pass_manager import PassManager

import fxcompress as fxc
from fxcompress.nn import QuantConv2d, QuantLinear
from fxcompress.quant import QuantSpec, QuantWeight
from toymodels import DecoderBlock, ResidualCNN, ShapeDependent, same_state, state_copy


def test_rtn_pass_replaces_layers_and_reports():
    m = ResidualCNN().eval()
    x = torch.randn(2, 3, 8, 8)
    gm = fxc.capture(m, (x,))
    sd = state_copy(gm)
    res = fxc.rtn_pass(gm, fxc.RTNConfig(bits=8))
    assert same_state(gm, sd)  # the pass did not touch its input
    kinds = {type(mod) for mod in res.gm.modules()}
    assert QuantConv2d in kinds and QuantLinear in kinds
    assert {r.layer for r in res.report} == {"stem", "conv1", "conv2", "head"}
    assert torch.allclose(res.gm(x), gm(x), atol=0.05)
    table = fxc.report(res.gm).table()
    assert "stem" in table and "quantized" in table and "per_channel" in table


def test_rtn_matches_reference_weights():
    gm = fxc.capture(DecoderBlock().eval(), (torch.randn(1, 3, 64),))
    spec = QuantSpec(4, False, "per_group", 32)
    res = fxc.rtn_pass(gm, fxc.RTNConfig(bits=4, symmetric=False, granularity="per_group", group_size=32))
    q = res.gm.get_submodule("q_proj")
    assert isinstance(q, QuantLinear)
    ref = QuantWeight.from_float(gm.get_submodule("q_proj").weight, spec).dequantize()
    assert torch.equal(q.dequantized_weight(), ref)


def test_group_size_not_dividing_is_skipped_and_reported():
    gm = fxc.capture(DecoderBlock(d=64, ffn=96).eval(), (torch.randn(1, 3, 64),))
    res = fxc.rtn_pass(gm, fxc.RTNConfig(bits=4, symmetric=False, granularity="per_group", group_size=64))
    skipped = {r.layer: r.note for r in res.report if r.action == "skipped"}
    assert set(skipped) == {"down_proj"} and "does not divide in_features=96" in skipped["down_proj"]


def test_export_graph_function_linears_are_rewritten():
    m = ShapeDependent()
    x = torch.randn(3, 4)
    gm = fxc.capture(m, (x,))
    assert gm.meta["fxcompress_capture"] == "torch.export"
    res = fxc.rtn_pass(gm, fxc.RTNConfig(bits=8))
    assert [r.layer for r in res.report] == ["fc"]
    assert any(isinstance(mod, QuantLinear) for mod in res.gm.modules())
    assert torch.allclose(res.gm(x), m(x), atol=0.02)


def test_pipeline_and_pass_manager():
    x = torch.randn(2, 3, 8, 8)
    gm = fxc.capture(ResidualCNN().eval(), (x,))
    cfg8 = fxc.RTNConfig(bits=8, targets=("head",))
    cfg4 = fxc.RTNConfig(bits=4, targets=("stem", "conv*"))
    pres = fxc.Pipeline([(fxc.rtn_pass, cfg8), (fxc.rtn_pass, cfg4)])(gm)
    pm = PassManager(passes=[fxc.as_fx_pass(fxc.rtn_pass, cfg8), fxc.as_fx_pass(fxc.rtn_pass, cfg4)])
    mres = pm(gm)
    for out in (pres.gm, mres.graph_module):
        assert out.get_submodule("head").spec.bits == 8 and out.get_submodule("stem").spec.bits == 4
        assert len(fxc.report(out)) == 4
    assert torch.equal(pres.gm(x), mres.graph_module(x))


def test_bad_config():
    with pytest.raises(ValueError, match="bits"):
        fxc.RTNConfig(bits=5)
    with pytest.raises(ValueError, match="group_size"):
        fxc.RTNConfig(bits=4, granularity="per_group", group_size=-1)


def test_report_on_plain_module_errors():
    with pytest.raises(ValueError, match="GraphModule"):
        fxc.report(torch.nn.Linear(2, 2))


def test_user_model_unchanged_through_capture_and_pass():
    m = ResidualCNN().eval()
    sd = state_copy(m)
    fxc.rtn_pass(fxc.capture(m, (torch.randn(1, 3, 8, 8),)), fxc.RTNConfig(bits=2))
    assert same_state(m, sd)
