"""fuse_linears: q/k/v and gate/up linears that read one node become one linear + split (float and integer)."""
import pytest
import torch
from torch import nn
from toymodels import DecoderBlock, RMSNorm, same_state, state_copy

import fxcompress as fxc
from fxcompress.models.smollm2 import tiny_causal_lm
from fxcompress.nn import QuantLinear
from fxcompress.passes.fusion import (
    FusionConfig,
    concat_quant_weights,
    fuse_linears,
    fuse_linears_pass,
    fused_name,
)
from fxcompress.quant import QuantSpec, QuantWeight

INT4 = fxc.RTNConfig(bits=4, symmetric=False, granularity="per_group", group_size=32)


def linear_calls(gm) -> list[str]:
    """Targets of the linear call sites (float or integer) of a GraphModule."""
    return [n.target for n in gm.graph.nodes
            if n.op == "call_module" and type(gm.get_submodule(n.target)) in (nn.Linear, QuantLinear)]


def fused_rows(res):
    return {r.layer: r for r in res.report if r.action == "fused"}


@pytest.fixture(scope="module")
def lm():
    model = tiny_causal_lm(seed=1)
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    return model, ids


def test_float_causal_lm_fused_parity_and_call_sites(lm):
    model, ids = lm
    gm = fxc.capture(model, (ids,))
    sd = state_copy(gm)
    res = fuse_linears_pass(gm, FusionConfig())
    assert same_state(gm, sd)  # input untouched
    calls = linear_calls(res.gm)
    n_layers = model.config.num_layers
    assert len(linear_calls(gm)) == 7 * n_layers + 1
    assert len(calls) == 4 * n_layers + 1  # qkv, o, gate_up, down per layer + lm_head
    assert "layers.0.self_attn.qkv_proj" in calls and "layers.0.mlp.gate_up_proj" in calls
    rows = fused_rows(res)
    assert set(rows) == {f"layers.{i}.{p}" for i in range(n_layers)
                         for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj",
                                   "mlp.up_proj")}
    assert "RMSNorm" in rows["layers.0.self_attn.q_proj"].note  # the norm + linear note
    assert rows["layers.0.self_attn.k_proj"].shape_after == (256, 128)  # 128 + 64 + 64 rows
    with torch.no_grad():
        ref, out = model(ids), res.gm(ids)
    assert torch.allclose(out, ref, atol=1e-6, rtol=0)
    assert any(r.pass_name == "fuse_linears" for r in fxc.report(res.gm))


def test_int4_causal_lm_fused_bit_equal_dequant(lm):
    model, ids = lm
    q = fxc.quantize_rtn(fxc.capture(model, (ids,)), INT4)
    res = fuse_linears_pass(q, FusionConfig())
    assert len(linear_calls(res.gm)) == 4 * model.config.num_layers + 1
    for i in range(model.config.num_layers):
        pre = f"layers.{i}."
        for fused, parts in ((f"{pre}self_attn.qkv_proj", ("q_proj", "k_proj", "v_proj")),
                             (f"{pre}mlp.gate_up_proj", ("gate_proj", "up_proj"))):
            fm = res.gm.get_submodule(fused)
            assert isinstance(fm, QuantLinear) and fm.spec == INT4.spec
            parent = fused.rpartition(".")[0]
            ref = torch.cat([q.get_submodule(f"{parent}.{p}").dequantized_weight() for p in parts])
            assert torch.equal(fm.dequantized_weight(), ref)  # codes, scales and zero points exact
    with torch.no_grad():
        assert torch.allclose(res.gm(ids), q(ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("rtn", [None, fxc.RTNConfig(bits=4, symmetric=True, granularity="per_channel")])
def test_toy_decoder_block_fused(rtn):
    x = torch.randn(2, 5, 64)
    gm = fxc.capture(DecoderBlock().eval(), (x,))
    if rtn is not None:
        gm = fxc.quantize_rtn(gm, rtn)
    fused = fuse_linears(gm, (x,))
    assert linear_calls(fused) == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    with torch.no_grad():
        assert torch.allclose(fused(x), gm(x), atol=1e-6 if rtn is None else 1e-5, rtol=0)


def test_torch_export_graph_function_linears_fused():
    x = torch.randn(1, 4, 64)
    gm = fxc.capture(DecoderBlock().eval(), (x,), method="export")
    res = fuse_linears_pass(gm, FusionConfig())
    assert {r.layer for r in fused_rows(res).values()} == {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}
    assert "qkv_proj" in linear_calls(res.gm) and "gate_up_proj" in linear_calls(res.gm)
    with torch.no_grad():
        assert torch.allclose(res.gm(x), gm(x), atol=1e-6, rtol=0)


class LookAlike(nn.Module):
    """k reads a second call of the same norm module, v a clone: equal values, different graph nodes."""

    def __init__(self, d=32, all_distinct=False):
        super().__init__()
        self.all_distinct = all_distinct
        self.norm = RMSNorm(d)
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        h = self.norm(x)
        q = self.q_proj(h)
        k = self.k_proj(self.norm(x) if self.all_distinct else h)
        v = self.v_proj(h.clone())
        return q + 2 * k + 3 * v


def test_inputs_that_only_look_alike_are_not_fused():
    x = torch.randn(3, 32)
    gm = fxc.capture(LookAlike(all_distinct=True).eval(), (x,))
    with pytest.raises(ValueError, match="nothing to fuse.*never fused"):
        fuse_linears_pass(gm, FusionConfig())
    gm = fxc.capture(LookAlike().eval(), (x,))  # q and k read one node, v a look-alike copy
    res = fuse_linears_pass(gm, FusionConfig())
    assert set(fused_rows(res)) == {"q_proj", "k_proj"}
    assert linear_calls(res.gm) == ["qk_proj", "v_proj"]
    with torch.no_grad():
        assert torch.allclose(res.gm(x), gm(x), atol=1e-6, rtol=0)


def test_different_formats_are_not_fused_and_reported():
    x = torch.randn(1, 3, 64)
    gm = fxc.capture(DecoderBlock().eval(), (x,))
    q = fxc.quantize_rtn(gm, fxc.RTNConfig(bits=4, symmetric=True, granularity="per_group", group_size=32,
                                           targets=("q_proj", "k_proj", "gate_proj", "up_proj")))
    q = fxc.quantize_rtn(q, fxc.RTNConfig(bits=8, targets=("v_proj",)))
    res = fuse_linears_pass(q, FusionConfig())
    skipped = {r.layer: r.note for r in res.report if r.action == "skipped"}
    assert set(skipped) == {"v_proj"} and "formats differ" in skipped["v_proj"] and "int8" in skipped["v_proj"]
    assert linear_calls(res.gm) == ["qk_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]
    # float next to integer: the float ones are not folded into the integer layer
    mixed = fxc.quantize_rtn(gm, fxc.RTNConfig(bits=4, symmetric=True, targets=("q_proj",)))
    with pytest.raises(ValueError, match="k_proj: reads .* but is float.*formats differ"):
        fuse_linears_pass(mixed, FusionConfig(targets=("q_proj", "k_proj")))


def test_per_tensor_scales_must_match():
    a = QuantWeight.from_float(torch.randn(4, 8), QuantSpec(8, True, "per_tensor", None))
    b = QuantWeight.from_float(torch.randn(4, 8) * 3, QuantSpec(8, True, "per_tensor", None))
    with pytest.raises(ValueError, match="per_tensor"):
        concat_quant_weights([a, b])


def test_concat_repacks_unaligned_3bit_codes():
    spec = QuantSpec(3, False, "per_group", 3)
    a, b = QuantWeight.from_float(torch.randn(3, 9), spec), QuantWeight.from_float(torch.randn(5, 9), spec)
    assert a.packed.numel() * 8 != 27 * 3  # 81 bits: not byte-aligned, so the bytes cannot just be joined
    c = concat_quant_weights([a, b])
    assert c.shape == (8, 9) and torch.equal(c.dequantize(), torch.cat([a.dequantize(), b.dequantize()]))
    d = concat_quant_weights([QuantWeight.from_float(torch.randn(3, 16), QuantSpec(4, True, "per_group", 8))] * 2)
    assert d.packed.numel() == 2 * 3 * 16 // 2


def test_chunk_view_fallback_makes_contiguous_chunks():
    class ViewsFlat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 4), nn.Linear(8, 6)

        def forward(self, x):
            return self.a(x).view(-1).sum() + self.b(x).view(-1).sum()

    x = torch.randn(3, 8)
    gm = fxc.capture(ViewsFlat(), (x,))
    with pytest.raises(RuntimeError, match="view"):
        fuse_linears_pass(gm, FusionConfig()).gm(x)
    fused = fuse_linears(gm, (x,))
    assert "contiguous chunks" in fxc.report(fused)[0].note
    assert torch.allclose(fused(x), gm(x), atol=1e-6)


def test_config_and_input_errors():
    with pytest.raises(ValueError, match="FusionConfig.targets"):
        FusionConfig(targets="q_proj")
    with pytest.raises(ValueError, match="FusionConfig.min_group"):
        FusionConfig(min_group=1)
    with pytest.raises(ValueError, match="GraphModule"):
        fuse_linears_pass(DecoderBlock(), FusionConfig())
    assert fused_name(["a.q_proj", "a.k_proj", "a.v_proj"]) == "a.qkv_proj"
    assert fused_name(["gate_proj", "up_proj"]) == "gate_up_proj"
    assert fused_name(["m.fc1", "m.fc2"]) == "m.fc1_fc2"


def test_int8_lm_head_with_rtn_targets(lm):
    model, ids = lm
    gm = fxc.capture(model, (ids,))
    body = fxc.RTNConfig(bits=4, symmetric=False, granularity="per_group", group_size=32, exclude=("lm_head",))
    head = fxc.RTNConfig(bits=8, symmetric=True, granularity="per_channel", targets=("lm_head",))
    q4 = fxc.quantize_rtn(gm, body)
    q = fxc.quantize_rtn(q4, head)
    h = q.get_submodule("lm_head")
    assert isinstance(h, QuantLinear) and h.spec.bits == 8 and h.spec.granularity == "per_channel"
    assert h.quant_weight.nbytes < 0.3 * gm.get_submodule("lm_head").weight.numel() * 4
    fused = fuse_linears(q, (ids,))
    with torch.no_grad():
        ref, out = q4(ids), fused(ids)
    assert (out - ref).abs().max() / ref.abs().max() < 0.02  # what the int8 head alone changes


@pytest.mark.parametrize("fmt", ["qdq", "matmulnbits"])
def test_fused_int_model_exports_to_onnx_with_parity(lm, tmp_path, fmt):
    model, ids = lm
    q = fxc.quantize_rtn(fxc.capture(model, (ids,)), INT4)
    fused = fuse_linears(q, (ids,))
    path = fxc.export_onnx(fused, (ids,), tmp_path / "fused.onnx", weight_format=fmt, accuracy_level=0)  # fp32 compute
    from fxcompress.backends.onnx import layer_formats

    names = {d.get("layer", d.get("name")) for d in layer_formats(path)}
    assert "layers.0.self_attn.qkv_proj" in names and "layers.0.self_attn.q_proj" not in names
    load = fxc.runtime.load_runner
    runner = load(str(path), backend="ort", device="cpu", matmulnbits_accuracy_level=0)
    out = runner(ids)
    out = out[0] if isinstance(out, (list, tuple)) else out
    with torch.no_grad():
        ref = q(ids)
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4), (out - ref).abs().max()


def test_fused_int_block_builds_with_tvm_llvm():
    x = torch.randn(1, 4, 64)
    q = fxc.quantize_rtn(fxc.capture(DecoderBlock().eval(), (x,)), INT4)
    fused = fuse_linears(q, (x,))
    runner = fxc.compile_tvm(fused, (x,), target="llvm")
    out = runner(x)
    out = out[0] if isinstance(out, (list, tuple)) else out
    with torch.no_grad():
        assert torch.allclose(out, q(x), atol=1e-4, rtol=1e-4)


def test_fused_model_round_trips_through_an_artifact(lm, tmp_path):
    model, ids = lm
    q = fxc.quantize_rtn(fxc.capture(model, (ids,)), INT4)
    fused = fuse_linears(q, (ids,))
    save = getattr(fxc, "save_artifact", None) or fxc.save  # renamed save_artifact by the contract
    load = getattr(fxc, "load_artifact", None) or fxc.load
    save(fused, tmp_path / "art")
    back = load(tmp_path / "art")
    assert "layers.0.mlp.gate_up_proj" in linear_calls(back)
    with torch.no_grad():
        assert torch.equal(back(ids), fused(ids))


def test_one_layer_called_twice_on_one_input_is_not_stacked():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 4), nn.Linear(8, 4)

        def forward(self, x):
            return self.a(x) + self.a(x) * self.b(x)

    x = torch.randn(2, 8)
    gm = fxc.capture(Twice(), (x,))
    res = fuse_linears_pass(gm, FusionConfig())
    assert linear_calls(res.gm) == ["a_b", "a"] and any("second call of a" in r.note for r in res.report)
    assert torch.allclose(res.gm(x), gm(x), atol=1e-6)


def test_parity_failure_is_a_clear_error(lm, monkeypatch):
    model, ids = lm
    import fxcompress.passes.fusion as fusion

    real = fusion._fused_module

    def off_by_a_little(sites):
        m = real(sites)
        with torch.no_grad():
            m.weight.add_(1e-2)  # a wrong fused weight must not pass the parity check
        return m

    monkeypatch.setattr(fusion, "_fused_module", off_by_a_little)
    with pytest.raises(ValueError, match="fused graph differs from the model"):
        fuse_linears(model, (ids,))
