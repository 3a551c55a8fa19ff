"""ONNX (QDQ / MatMulNBits) export and the ONNX Runtime runner: parity with torch, exact codes, errors."""

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import fxcompress as fxc
from fxcompress.backends.onnx import ExportError, export_onnx, layer_formats
from fxcompress.nn import QuantConv2d, QuantLinear
from fxcompress.quant import QuantSpec, QuantWeight
from fxcompress.runtime.ort import OrtLoadError, OrtRunner, load_ort
from fxcompress.cli import main
from fxcompress.runtime.runner import Runner, RunnerInputError, check_parity, load_runner

from toymodels import DecoderBlock, same_state, state_copy

TOL = 1e-4
EXACT = {"accuracy_level": 0}  # MatMulNBits in fp32 compute: parity with torch to ~1e-6


def _exact_ort(path, **kw):
    """The runner with ORT's fused QDQ MatMulNBits in fp32 compute too (the defaults quantize activations)."""
    return load_ort(path, matmulnbits_accuracy_level=0, **kw)


@pytest.fixture(scope="module")
def block():
    torch.manual_seed(0)
    m = DecoderBlock().eval()
    x = torch.randn(2, 8, 64)
    return fxc.capture(m, (x,)), x


@pytest.fixture(scope="module")
def digits():
    from fxcompress.models import load_digits_split, pretrained_digits_resnet

    _, _, xte, yte = load_digits_split()
    m = pretrained_digits_resnet()
    return fxc.capture(m, (xte[:4],)), xte, yte


def _codes_of(path, name):
    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    return inits, numpy_helper.to_array(inits[f"{name.replace('.', '_')}.qweight"]).astype(np.int64)


DECODER_CASES = [
    ("int4-asym-g32", dict(bits=4, symmetric=False, granularity="per_group", group_size=32), "qdq"),
    ("int4-asym-g32-mnb", dict(bits=4, symmetric=False, granularity="per_group", group_size=32), "matmulnbits"),
    ("int8-per-channel", dict(bits=8, symmetric=True, granularity="per_channel"), "qdq"),
    ("int3-sym-g16", dict(bits=3, symmetric=True, granularity="per_group", group_size=16), "qdq"),
    ("int3-sym-g16-mnb", dict(bits=3, symmetric=True, granularity="per_group", group_size=16), "matmulnbits"),
    ("int2-asym-per-tensor", dict(bits=2, symmetric=False, granularity="per_tensor"), "qdq"),
]


@pytest.mark.parametrize("case,cfg,fmt", DECODER_CASES, ids=[c[0] for c in DECODER_CASES])
def test_decoder_block_parity(block, tmp_path, case, cfg, fmt):
    gm, x = block
    q = fxc.quantize_rtn(gm, fxc.RTNConfig(**cfg))
    before = state_copy(q)
    path = export_onnx(q, (x,), tmp_path / "m.onnx", opset=21, weight_format=fmt, **EXACT)
    assert same_state(q, before)  # export never changes the source module
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    runner = _exact_ort(path)
    rep = check_parity(q, runner, (x,))
    assert rep.ok(atol=TOL), str(rep)
    # a different batch size runs (dynamic batch) and still matches
    x2 = torch.randn(3, 8, 64)
    assert torch.allclose(runner(x2), q(x2), atol=TOL)
    # integer initializers re-read equal the layer's codes exactly
    inits, codes = _codes_of(path, "q_proj")
    qw = q.get_submodule("q_proj").quant_weight
    if fmt == "qdq":
        assert torch.equal(torch.from_numpy(codes.T), qw.codes().long())
        assert np.array_equal(numpy_helper.to_array(inits["q_proj.scale"]).reshape(-1),
                              (qw.scale.T if cfg["granularity"] == "per_group" else qw.scale).reshape(-1).numpy())
    else:  # MatMulNBits: uint8 [N, groups, g/2], low nibble first, signed codes offset by 8
        n, k = qw.shape
        unpacked = np.stack([codes & 0xF, codes >> 4], axis=-1).reshape(n, k)
        assert np.array_equal(unpacked - (8 if qw.spec.symmetric else 0), qw.codes().numpy())
    formats = {r["format"] for r in layer_formats(path)}
    assert formats == ({"MatMulNBits"} if fmt == "matmulnbits" else {"DequantizeLinear"})


def test_file_size_tracks_bits(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(512, 1024, bias=False), nn.ReLU(), nn.Linear(1024, 512, bias=False)).eval()
    x = torch.randn(4, 512)
    gm = fxc.capture(m, (x,))
    n_weights = 2 * 512 * 1024
    sizes = {}
    for bits in (8, 4):
        q = fxc.quantize_rtn(gm, fxc.RTNConfig(bits=bits, symmetric=True, granularity="per_group",
                                                group_size=128))
        p = export_onnx(q, (x,), tmp_path / f"m{bits}.onnx", **EXACT)
        sizes[bits] = p.stat().st_size
        scales = 4 * n_weights // 128
        assert n_weights * bits / 8 + scales <= sizes[bits] <= 1.02 * (n_weights * bits / 8 + scales) + 4096
        assert check_parity(q, load_ort(p), (x,)).ok(atol=TOL)
    assert sizes[4] < 0.6 * sizes[8]


@pytest.mark.parametrize("bits,sym", [(8, True), (4, False)])
def test_digits_resnet_parity(digits, tmp_path, bits, sym):
    gm, xte, yte = digits
    from fxcompress.models import accuracy

    q = fxc.quantize_rtn(gm, fxc.RTNConfig(bits=bits, symmetric=sym, granularity="per_channel"))
    path = export_onnx(q, (xte[:4],), tmp_path / "digits.onnx", **EXACT)
    runner = _exact_ort(path)
    rep = check_parity(q, runner, (xte[:64],))
    assert rep.ok(atol=TOL), str(rep)
    assert accuracy(runner, xte, yte) == accuracy(q, xte, yte)
    # conv codes keep QuantWeight's [O, I, kh, kw] layout: re-read exactly, and for uint4 the raw bytes are
    # QuantWeight's packed bytes themselves
    for name in ("conv1", "layer2.0.shortcut.0", "layer2.1.conv2"):
        qw = q.get_submodule(name).quant_weight
        inits, codes = _codes_of(path, name)
        assert torch.equal(torch.from_numpy(codes), qw.codes().long())
        if bits == 4:
            assert inits[f"{name.replace('.', '_')}.qweight"].raw_data == qw.packed.numpy().tobytes()
            zp = numpy_helper.to_array(inits[f"{name.replace('.', '_')}.zero_point"]).astype(np.int64)
            assert np.array_equal(zp, qw.zero_point[:, 0].long().numpy())


def _fractional_linear(k, n, spec, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(spec.qmin, spec.qmax + 1, (n, k), generator=g)
    rows, groups = (1, 1) if spec.granularity == "per_tensor" else (n, 1 if spec.granularity == "per_channel"
                                                                      else k // spec.group_size)
    scale = torch.rand(rows, groups, generator=g) * 0.05 + 0.01
    zp = torch.rand(rows, groups, generator=g) * spec.qmax  # fractional, as L4Q's LSQ+ offset gives
    return QuantLinear(QuantWeight.from_codes(codes, scale, zp, spec), torch.randn(n, generator=g))


@pytest.mark.parametrize("fmt", ["qdq", "matmulnbits"])
def test_fractional_zero_point(tmp_path, fmt):
    specs = [QuantSpec(4, False, "per_group", 16), QuantSpec(3, False, "per_channel", None),
             QuantSpec(4, False, "per_tensor", None)]
    m = nn.Sequential(_fractional_linear(64, 48, specs[0], 1), nn.ReLU(), _fractional_linear(48, 32, specs[1], 2),
                      nn.ReLU(), _fractional_linear(32, 16, specs[2], 3)).eval()
    assert not m[0].quant_weight.zero_point_is_integer
    x = torch.randn(5, 64)
    path = export_onnx(m, (x,), tmp_path / "frac.onnx", weight_format=fmt, **EXACT)
    rep = check_parity(m, _exact_ort(path), (x,))
    assert rep.ok(atol=TOL), str(rep)
    zps = [r["zero_point"] for r in layer_formats(path)]
    assert zps == ["fractional_corrected" if fmt == "matmulnbits" else "float_offset"] * 3


def test_fractional_zero_point_conv(tmp_path):
    spec = QuantSpec(4, False, "per_channel", None)
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (8, 3, 3, 3), generator=g)
    qw = QuantWeight.from_codes(codes, torch.rand(8, 1, generator=g) * 0.1 + 0.01, torch.rand(8, 1, generator=g) * 15,
                                spec)
    m = nn.Sequential(QuantConv2d(qw, None, padding=1), nn.ReLU()).eval()
    x = torch.randn(2, 3, 10, 10)
    path = export_onnx(m, (x,), tmp_path / "conv.onnx")
    assert check_parity(m, load_ort(path), (x,)).ok(atol=TOL)


def test_matmulnbits_fusion_detected(block, tmp_path):
    gm, x = block
    q = fxc.quantize_rtn(gm, fxc.RTNConfig(bits=4, symmetric=True, granularity="per_group", group_size=32))
    path = export_onnx(q, (x,), tmp_path / "m.onnx", weight_format="qdq")
    runner = _exact_ort(path)
    written, optimized = runner.op_types(), runner.optimized_op_types()
    assert written["DequantizeLinear"] == 7 and written["MatMulNBits"] == 0
    assert optimized["MatMulNBits"] == 7 and optimized["DequantizeLinear"] == 0
    # with ORT's default int8-activation accuracy level the kernel is approximate but close
    fast = load_ort(path, matmulnbits_accuracy_level=None)
    assert check_parity(q, fast, (x,)).max_rel < 2e-2


def test_opset_below_21(block, tmp_path):
    gm, x = block
    q4 = fxc.quantize_rtn(gm, fxc.RTNConfig(bits=4, symmetric=True, granularity="per_channel"))
    with pytest.raises(ExportError, match=r"'q_proj'.*opset >= 21"):
        export_onnx(q4, (x,), tmp_path / "a.onnx", opset=20)
    # the documented opt-in: int8 containers for 4-bit codes work at opset 20
    p = export_onnx(q4, (x,), tmp_path / "b.onnx", opset=20, low_bit_container="int8", weight_format="qdq")
    assert onnx.load(str(p)).opset_import[0].version == 20
    assert check_parity(q4, _exact_ort(p), (x,)).ok(atol=TOL)
    qg = fxc.quantize_rtn(gm, fxc.RTNConfig(bits=8, symmetric=True, granularity="per_group", group_size=32))
    with pytest.raises(ExportError, match="blocked DequantizeLinear"):
        export_onnx(qg, (x,), tmp_path / "c.onnx", opset=17)
    with pytest.raises(ValueError, match="opset"):
        export_onnx(q4, (x,), tmp_path / "d.onnx", opset=9)
    with pytest.raises(ValueError, match="weight_format"):
        export_onnx(q4, (x,), tmp_path / "d.onnx", weight_format="int4")


class _Unsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return torch.cummax(self.fc(x), 1)[0]


def test_unlowerable_op_names_the_node(tmp_path):
    x = torch.randn(2, 4)
    gm = fxc.quantize_rtn(fxc.capture(_Unsupported(), (x,)), fxc.RTNConfig(bits=8))
    with pytest.raises(ExportError, match=r"graph node 'cummax'.*aten::cummax"):
        export_onnx(gm, (x,), tmp_path / "u.onnx")


def test_corrupt_and_truncated_files(block, tmp_path):
    gm, x = block
    q = fxc.quantize_rtn(gm, fxc.RTNConfig(bits=8))
    good = export_onnx(q, (x,), tmp_path / "good.onnx").read_bytes()
    (tmp_path / "trunc.onnx").write_bytes(good[: len(good) // 2])
    (tmp_path / "junk.onnx").write_bytes(b"\x00\xffnot an onnx model" * 10)
    for name in ("trunc.onnx", "junk.onnx"):
        with pytest.raises(OrtLoadError, match=name):
            load_ort(tmp_path / name)
    with pytest.raises(OrtLoadError, match="no ONNX model"):
        load_ort(tmp_path / "missing.onnx")


def test_bad_inputs_rejected_before_ort(block, tmp_path):
    gm, x = block
    q = fxc.quantize_rtn(gm, fxc.RTNConfig(bits=8))
    r = load_ort(export_onnx(q, (x,), tmp_path / "m.onnx"))
    assert r.input_names == ["x"] and r.backend == "ort" and r.device == "cpu" and isinstance(r, Runner)
    with pytest.raises(RunnerInputError, match=r"'x' must have shape \(batch, 8, 64\).*dim 2"):
        r(torch.randn(2, 8, 32))
    with pytest.raises(RunnerInputError, match="3 dims"):
        r(torch.randn(8, 64))
    with pytest.raises(RunnerInputError, match="dtype torch.float32"):
        r(x.double())
    with pytest.raises(RunnerInputError, match="1 input"):
        r(x, x)
    with pytest.raises(RunnerInputError, match="torch.Tensor"):
        r([1.0])


def test_load_dispatch_and_devices(block, tmp_path):
    gm, x = block
    q = fxc.quantize_rtn(gm, fxc.RTNConfig(bits=8))
    p = export_onnx(q, (x,), tmp_path / "m.onnx", **EXACT)
    r = load_runner(p, backend="ort", device="cpu")
    assert isinstance(r, OrtRunner) and torch.allclose(r(x), q(x), atol=TOL)
    with pytest.raises(ValueError, match="backend must be one of"):
        load_runner(p, backend="nope")
    with pytest.raises(ValueError, match="device"):
        load_ort(p, device="tpu")
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(OrtLoadError, match="onnxruntime-gpu"):
            load_ort(p, device="cuda")


@pytest.mark.gpu
def test_cuda_parity(block, tmp_path):
    gm, x = block
    q = fxc.quantize_rtn(gm, fxc.RTNConfig(bits=4, symmetric=False, granularity="per_group", group_size=32))
    r = load_ort(export_onnx(q, (x,), tmp_path / "m.onnx"), device="cuda")
    assert check_parity(q, r, (x,)).ok(atol=1e-3)


def test_cli_export_and_bench(digits, tmp_path, capsys):
    gm, xte, _ = digits
    q = fxc.quantize_rtn(gm, fxc.RTNConfig(bits=8))
    fxc.save_artifact(q, tmp_path / "art")
    assert main(["export", str(tmp_path / "art"), "--format", "onnx", "--out", str(tmp_path / "m.onnx"),
                 "--input-shape", "1,1,8,8"]) == 0
    assert main(["bench", str(tmp_path / "m.onnx"), "--backend", "ort", "--device", "cpu",
                 "--iters", "5", "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    assert "DequantizeLinear" in out and "median" in out and "max abs" in out


class _Shared(nn.Module):
    """One quantized layer applied twice (weight tying): its integer weight is stored once."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(32, 32, bias=False)

    def forward(self, x):
        return self.fc(torch.relu(self.fc(x)))


@pytest.mark.parametrize("fmt", ["qdq", "matmulnbits"])
def test_layer_used_twice(tmp_path, fmt):
    x = torch.randn(3, 32)
    q = fxc.quantize_rtn(fxc.capture(_Shared(), (x,)), fxc.RTNConfig(bits=4, symmetric=True, granularity="per_group",
                                                                      group_size=16))
    path = export_onnx(q, (x,), tmp_path / "s.onnx", weight_format=fmt, **EXACT)
    inits = [t.name for t in onnx.load(str(path)).graph.initializer]
    assert inits.count("fc.qweight") == 1 and len(layer_formats(path)) == 1
    assert check_parity(q, _exact_ort(path), (x,)).ok(atol=TOL)


def _nbits_fp16(tmp_path, x):
    from fxcompress.backends.onnx import to_float16

    q = fxc.quantize_rtn(fxc.capture(DecoderBlock().eval(), (x,)),
                         fxc.RTNConfig(bits=4, symmetric=False, granularity="per_group", group_size=32))
    p32 = export_onnx(q, (x,), tmp_path / "b32.onnx", weight_format="matmulnbits")
    m16 = to_float16(onnx.load(str(p32)))
    p16 = tmp_path / "b16.onnx"
    onnx.save(m16, str(p16))
    return q, m16, p16


def test_to_float16_matmulnbits_structure(tmp_path):
    """fp16 path for GPU benchmarks: float tensors become fp16 (MatMulNBits scales too), codes stay uint8."""
    x = torch.randn(1, 4, 64)
    q, m16, p16 = _nbits_fp16(tmp_path, x)
    onnx.checker.check_model(str(p16))
    g = m16.graph
    assert g.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert g.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert not any(t.data_type == onnx.TensorProto.FLOAT for t in g.initializer)
    inits = {t.name: t for t in g.initializer}
    nb = [n for n in g.node if n.op_type == "MatMulNBits"]
    assert len(nb) == 7
    for n in nb:
        assert inits[n.input[1]].data_type == onnx.TensorProto.UINT8
        assert inits[n.input[2]].data_type == onnx.TensorProto.FLOAT16
    range_in = {i for n in g.node if n.op_type == "Range" for i in n.input}  # Range has no fp16 type
    assert not any(a.name == "to" and a.i == onnx.TensorProto.FLOAT for n in g.node if n.op_type == "Cast"
                   and n.output[0] not in range_in for a in n.attribute)
    # the graph type-checks (ONNX Runtime validates types at load; Range stays fp32 and is cast after)
    import onnxruntime as ort

    s = ort.InferenceSession(str(p16), providers=["CPUExecutionProvider"])
    y = s.run(None, {s.get_inputs()[0].name: x.half().numpy()})[0].astype(np.float32)
    ref = q(x).detach().numpy()
    assert np.abs(y - ref).max() <= 2e-2 * np.abs(ref).max()


@pytest.mark.gpu
def test_to_float16_matmulnbits_cuda_ep(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu")
    x = torch.randn(1, 4, 64)
    q, _, p16 = _nbits_fp16(tmp_path, x)
    s = ort.InferenceSession(str(p16), providers=["CUDAExecutionProvider"])
    y = s.run(None, {s.get_inputs()[0].name: x.half().numpy()})[0].astype(np.float32)
    ref = q(x).detach().numpy()
    assert np.abs(y - ref).max() <= 1e-2 * np.abs(ref).max()
