"""ONNX Runtime defaults that are never a trap: the default export of int8 / int4 / 2-3-bit / L4Q-converted
linears runs fused MatMulNBits after ORT's optimizer, never a float zero point (ORT's slow fallback), and
never accuracy level 0 for 8-bit weights (a dequantize-then-GEMM path ~20x slower than fp32 on CPU)."""
import onnx
import pytest
import torch
from toymodels import DecoderBlock

import fxcompress as fxc
from fxcompress.backends.onnx import export_onnx, layer_formats
from fxcompress.backends.onnx.base import default_accuracy_level
from fxcompress.runtime.ort import load_ort
from fxcompress.runtime.runner import check_parity

CASES = {
    "int8-per-channel": dict(bits=8, symmetric=True, granularity="per_channel"),
    "int8-asym-g32": dict(bits=8, symmetric=False, granularity="per_group", group_size=32),
    "int4-asym-g32": dict(bits=4, symmetric=False, granularity="per_group", group_size=32),
    "int3-sym-g16": dict(bits=3, symmetric=True, granularity="per_group", group_size=16),
    "int2-asym-per-tensor": dict(bits=2, symmetric=False, granularity="per_tensor"),
}


def _off_grid(qm):
    """Move each learned zero point by up to +-0.4 code (``offset = -scale * zp``), as L4Q training does."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for mod in qm.modules():
            if getattr(mod, "offset", None) is not None:
                mod.offset.add_(-mod.scale * (torch.rand(mod.offset.shape, generator=g) - 0.5) * 0.8)


@pytest.fixture(scope="module")
def block():
    torch.manual_seed(0)
    m = DecoderBlock().eval()
    x = torch.randn(1, 8, 64)
    return m, fxc.capture(m, (x,)), x


@pytest.fixture(scope="module")
def l4q(block):
    m, _, x = block
    qm = fxc.prepare_l4q(m, (x,), fxc.L4QConfig(bits=4, group_size=32, lora_rank=4, lora_alpha=8.0))
    _off_grid(qm)
    dm = fxc.convert_l4q(qm).eval()
    assert not dm.get_submodule("q_proj").quant_weight.zero_point_is_integer
    return dm


def _nodes(path, op="MatMulNBits"):
    return [n for n in onnx.load(str(path)).graph.node if n.op_type == op]


def _level(node) -> int:
    return next((a.i for a in node.attribute if a.name == "accuracy_level"), 0)


def _check_default(q, x, path):
    r = load_ort(path)
    ops = r.optimized_op_types()
    assert ops["MatMulNBits"] == 7 and ops["DequantizeLinear"] == 0, dict(ops)  # every linear fused, none float
    written = _nodes(path)
    assert len(written) == 7 and all(_level(n) == 4 for n in written)
    inits = {t.name: t for t in onnx.load(str(path)).graph.initializer}
    for n in written:  # a float zero point sends ORT's CPU kernel to a dequantize-then-GEMM fallback
        assert len(n.input) < 4 or inits[n.input[3]].data_type == onnx.TensorProto.UINT8
    ref = q(x)
    err = (r(x) - ref).abs().max() / ref.abs().max()
    assert err < 3e-2, float(err)  # int8 activations inside the kernel: approximate, close
    return r


@pytest.mark.parametrize("case", list(CASES))
def test_default_export_runs_fused_matmulnbits(block, tmp_path, case):
    _, gm, x = block
    q = fxc.quantize_rtn(gm, fxc.RTNConfig(**CASES[case]))
    path = export_onnx(q, (x,), tmp_path / "m.onnx")
    _check_default(q, x, path)
    rec = layer_formats(path)[0]
    assert rec["format"] == "MatMulNBits" and rec["container_bits"] == (8 if CASES[case]["bits"] == 8 else 4)


def test_l4q_default_export_is_fused_and_exact_at_level_0(l4q, block, tmp_path):
    _, _, x = block
    path = export_onnx(l4q, (x,), tmp_path / "l4q.onnx")
    _check_default(l4q, x, path)
    assert {r["zero_point"] for r in layer_formats(path)} == {"fractional_corrected"}
    exact = export_onnx(l4q, (x,), tmp_path / "l4q0.onnx", accuracy_level=0)
    assert all(_level(n) == 0 for n in _nodes(exact))
    assert check_parity(l4q, load_ort(exact), (x,)).ok(atol=1e-4)  # the zero-point split is exact


def test_default_accuracy_level_for_int8_is_not_0(block, tmp_path):
    """Level 0 with 8-bit weights is the trap (ORT dequantizes and runs a float GEMM): neither the written
    MatMulNBits nodes nor the nodes ORT fuses from QDQ in the runner's session may get it by default."""
    _, gm, x = block
    assert default_accuracy_level(8) != 0 and default_accuracy_level(4) != 0
    q8 = fxc.quantize_rtn(gm, fxc.RTNConfig(bits=8, symmetric=True, granularity="per_channel"))
    assert all(_level(n) != 0 for n in _nodes(export_onnx(q8, (x,), tmp_path / "mnb.onnx")))
    qdq = export_onnx(q8, (x,), tmp_path / "qdq.onnx", weight_format="qdq")
    assert not _nodes(qdq)
    fused = [n for n in load_ort(qdq).optimized_model().graph.node if n.op_type == "MatMulNBits"]
    assert len(fused) == 7 and all(_level(n) != 0 for n in fused)
    forced = [n for n in load_ort(qdq, matmulnbits_accuracy_level=0).optimized_model().graph.node
              if n.op_type == "MatMulNBits"]
    assert forced and all(_level(n) == 0 for n in forced)  # the knob reaches ORT: the check above can fail


def test_accuracy_level_validated(block, tmp_path):
    _, gm, x = block
    q = fxc.quantize_rtn(gm, fxc.RTNConfig(bits=4, granularity="per_group", group_size=32))
    for bad in (5, -1, True, "4"):
        with pytest.raises(ValueError, match="accuracy_level"):
            export_onnx(q, (x,), tmp_path / "m.onnx", accuracy_level=bad)
    with pytest.raises(ValueError, match="container_bits"):
        default_accuracy_level(2)


def test_compile_lm_ort_default_is_fused_at_level_4(tmp_path):
    from fxcompress.lm import compile_lm
    from fxcompress.models.smollm2 import tiny_causal_lm

    m = tiny_causal_lm(seed=0, vocab_size=128, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2)
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    qm = fxc.prepare_l4q(m, (ids,), fxc.L4QConfig(bits=4, group_size=32, exclude=("lm_head",)))
    _off_grid(qm)
    dm = fxc.convert_l4q(qm)
    lm = compile_lm(dm, "ort", max_seq_len=32, prefill_chunk=8)
    lm.save(tmp_path / "lm")
    decode = tmp_path / "lm" / "decode.onnx"
    written = _nodes(decode)
    assert written and all(_level(n) == 4 for n in written)
    ops = load_ort(decode).optimized_op_types()
    assert ops["MatMulNBits"] == len(written) and ops["DequantizeLinear"] == 0
    out = lm.generate(ids, max_new_tokens=4)
    assert out.shape == (1, 12)


class _SharedFractional(torch.nn.Module):
    """One layer with fractional zero points applied twice: the correction's intermediate names stay unique."""

    def __init__(self):
        super().__init__()
        from fxcompress.nn import QuantLinear
        from fxcompress.quant import QuantSpec, QuantWeight

        g = torch.Generator().manual_seed(0)
        spec = QuantSpec(4, False, "per_group", 16)
        codes = torch.randint(0, 16, (32, 32), generator=g)
        self.fc = QuantLinear(QuantWeight.from_codes(codes, torch.rand(32, 2, generator=g) * 0.05 + 0.01,
                                                     torch.rand(32, 2, generator=g) * 15, spec), None)

    def forward(self, x):
        return self.fc(torch.relu(self.fc(x)))


def test_fractional_layer_called_twice(tmp_path):
    m = _SharedFractional().eval()
    x = torch.randn(3, 32)
    path = export_onnx(m, (x,), tmp_path / "s.onnx", accuracy_level=0)
    assert len(_nodes(path)) == 2 and len(layer_formats(path)) == 1
    inits = [t.name for t in onnx.load(str(path)).graph.initializer]
    assert inits.count("fc.qweight") == 1 and inits.count("fc.zp_correction") == 1
    assert check_parity(m, load_ort(path), (x,)).ok(atol=1e-4)
