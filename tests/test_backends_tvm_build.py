"""TVM (Relax) backend, fxcompress/backends/tvm/build.py + importer.py + emit.py: packed integer linears with
fused decode, CPU (llvm) parity, artifacts, errors."""
import shutil

import numpy as np
import pytest
import torch
from torch import nn

tvm = pytest.importorskip("tvm")

import fxcompress as fxc  # noqa: E402
from fxcompress.backends.tvm import (TVMBackendError, TVMBuildConfig, build_tvm, compile_tvm,  # noqa: E402
                                     meta_schedule_usable)
from fxcompress.nn import QuantLinear  # noqa: E402
from fxcompress.quant import QuantSpec, QuantWeight  # noqa: E402
from fxcompress.runtime import check_parity  # noqa: E402
from toymodels import DecoderBlock  # noqa: E402

HAS_GPU = bool(tvm.cuda(0).exist)


def _rtn(model, x, **cfg):
    gm = fxc.capture(model, (x,))
    return fxc.quantize_rtn(gm, fxc.RTNConfig(**cfg))


@pytest.fixture(scope="module")
def block4():
    torch.manual_seed(0)
    x = torch.randn(1, 8, 64)
    q = _rtn(DecoderBlock().eval(), x, bits=4, symmetric=False, granularity="per_group", group_size=32)
    return q, x, compile_tvm(q, (x,), target="llvm")


def test_decoder_block_int4_g32_asym_parity_and_fused(block4):
    q, x, r = block4
    rep = check_parity(q, r, (x,))
    assert rep.ok(atol=1e-5, rtol=1e-5), rep
    assert r.backend == "tvm" and r.input_names == ["x"]
    layers = r.info["layers"]
    assert len(layers) == 7 and all(lay["bits"] == 4 and lay["zero_point"] == "integer" for lay in layers)
    assert sum(lay["packed_bytes"] for lay in layers) == (4 * 64 * 64 + 3 * 64 * 128) // 2  # 4 bits a weight
    # every quantized linear is ONE PrimFunc holding the decode and the matmul, reading packed uint32 words
    b = r.build
    fused = [n for n in b.primfunc_names() if "decode_matmul" in n]
    assert fused and not any(n == "dequantize" or n.startswith("decode") for n in b.primfunc_names())
    for name in fused:
        script = b.primfunc_script(name)
        assert 'T.sblock("dequantize")' in script or '"dequantize"' in script
        assert '"matmul"' in script and '"uint32"' in script
    # no float copy of a quantized weight survives as a constant: largest float const is < one weight
    assert "silu" in " ".join(fused) or "sigmoid" in " ".join(fused)  # SwiGLU epilogue fused too


def test_int8_per_channel_symmetric_parity():
    torch.manual_seed(1)
    x = torch.randn(2, 5, 64)
    q = _rtn(DecoderBlock().eval(), x, bits=8, symmetric=True, granularity="per_channel")
    r = compile_tvm(q, (x,), target="llvm")
    rep = check_parity(q, r, (x,))
    assert rep.ok(atol=1e-5, rtol=1e-5), rep
    assert {lay["zero_point"] for lay in r.info["layers"]} == {"none"}


@pytest.mark.parametrize("bits,gran,gs", [(4, "per_group", 16), (3, "per_group", 32), (2, "per_channel", None)])
def test_fractional_zero_point_exact(bits, gran, gs):
    """L4Q-style learned offsets: zero points that are not integers, applied as (q - zp) * scale."""
    torch.manual_seed(2)
    spec = QuantSpec(bits, False, gran, gs)
    w = torch.randn(24, 64)
    qw = QuantWeight.from_float(w, spec)
    zp = qw.zero_point + torch.rand_like(qw.zero_point) - 0.5  # fractional
    q = QuantLinear(QuantWeight.from_codes(qw.codes(), qw.scale, zp, spec), torch.randn(24))
    model = nn.Sequential(q, nn.ReLU())
    x = torch.randn(3, 64)
    r = compile_tvm(model, (x,), target="llvm")
    assert r.info["layers"][0]["zero_point"] == "fractional"
    # reference written plainly: codes, scales and zero points per group, in numpy
    codes = qw.codes().numpy().astype(np.float64)
    g = codes.shape[1] // (gs or codes.shape[1])
    sc = np.repeat(qw.scale.numpy(), codes.shape[1] // g, axis=1).astype(np.float64)
    z = np.repeat(zp.numpy(), codes.shape[1] // g, axis=1).astype(np.float64)
    ref = np.maximum(x.double().numpy() @ ((codes - z) * sc).T + q.bias.double().numpy(), 0)
    np.testing.assert_allclose(r(x).double().numpy(), ref, atol=2e-5, rtol=1e-5)


def test_digits_resnet_int8_conv_parity():
    from fxcompress.models import load_digits_split, pretrained_digits_resnet

    model = pretrained_digits_resnet()
    _, _, xte, yte = load_digits_split()
    x = xte[:16]
    q = _rtn(model, x, bits=8, symmetric=True, granularity="per_channel")
    r = compile_tvm(q, (x,), target="llvm")
    rep = check_parity(q, r, (x,))
    assert rep.ok(atol=1e-4, rtol=1e-4), rep
    assert torch.equal(r(x).argmax(-1), q(x).argmax(-1))
    assert len(r.info["layers"]) == 1  # the fc head is a packed linear
    assert {c["path"] for c in r.info["convs"]} == {"weight_only_int8"}  # the convs read int8 codes (test_tvm_conv.py)


def test_export_library_load_roundtrip(block4, tmp_path):
    q, x, r = block4
    path = r.export_library(tmp_path / "model.so")
    assert path.is_file() and (tmp_path / "model.so.json").is_file()
    r2 = fxc.runtime.load_runner(str(path), backend="tvm", device="cpu")
    assert r2.backend == "tvm" and r2.input_names == r.input_names
    torch.testing.assert_close(r2(x), r(x), atol=0, rtol=0)
    with pytest.raises(fxc.runtime.RunnerInputError, match="shape"):
        r2(torch.randn(1, 9, 64))
    with pytest.raises(ValueError, match="no TVM library"):
        fxc.runtime.load_runner(str(tmp_path / "missing.so"), backend="tvm")


@pytest.mark.skipif(HAS_GPU, reason="checks the no-GPU error")
def test_cuda_without_gpu_is_a_clear_error(block4):
    q, x, _ = block4
    with pytest.raises(TVMBackendError, match="needs a CUDA GPU"):
        compile_tvm(q, (x,), target="cuda")


def test_unsupported_op_is_named():
    class M(nn.Module):
        def forward(self, x):
            return torch.cummax(x, 1)[0]

    with pytest.raises(TVMBackendError, match="cummax"):
        compile_tvm(M(), (torch.randn(2, 8),), target="llvm")


def test_bad_arguments():
    m = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(TVMBackendError, match="tune"):
        compile_tvm(m, (torch.randn(1, 4),), target="llvm", tune="autotvm")
    with pytest.raises(TVMBackendError, match="work_dir"):
        compile_tvm(m, (torch.randn(1, 4),), target="llvm", tune="meta_schedule")
    with pytest.raises(TVMBackendError, match="target"):
        compile_tvm(m, (torch.randn(1, 4),), target="vulkan-ish", device="cpu")


def test_meta_schedule_clear_error_or_runs(tmp_path):
    """Where MetaSchedule cannot run, a clear error that says to pin apache-tvm-ffi; where it can, tuning, reuse and
    the records checks are tests/test_backends_tvm_meta_schedule.py."""
    ok, why = meta_schedule_usable()
    if ok:
        pytest.skip("MetaSchedule works here: see tests/test_backends_tvm_meta_schedule.py")
    m = nn.Sequential(QuantLinear.from_linear(nn.Linear(64, 16), QuantSpec(4, False, "per_group", 32)))
    with pytest.raises(TVMBackendError, match="meta_schedule.*pin apache-tvm-ffi"):
        compile_tvm(m, (torch.randn(1, 64),), target="llvm", tune="meta_schedule", trials=2, work_dir=tmp_path)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc to build CUDA code")
def test_cuda_build_without_gpu_one_kernel_per_quant_linear():
    """dlight inlines the decode into the GEMV: one CUDA kernel per packed linear, no separate decode kernel."""
    torch.manual_seed(0)
    x = torch.randn(1, 1, 64)
    q = _rtn(DecoderBlock().eval(), x, bits=4, symmetric=True, granularity="per_group", group_size=32)
    b = build_tvm(q, (x,), target="cuda")
    kernels = b.kernel_names()
    dec = [k for k in kernels if "decode_matmul" in k]
    assert len(dec) == len(b.info["fused_decode_primfuncs"]) >= 5
    assert not any("dequantize" in k or k.startswith("decode") for k in kernels)
    src = b.device_source()
    assert "uint*" in src  # the kernels read the packed uint32 words


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc to build CUDA code")
def test_cuda_build_many_hand_kernels_of_one_kind_have_unique_symbols():
    """Several fp16 int4 linears all get the tensor-core kernel; each PrimFunc keeps a unique global symbol (a shared
    one broke the build once Relax passes that check symbols, e.g. DispatchSortScan, ran)."""
    from fxcompress.models.smollm2 import tiny_causal_lm

    m = tiny_causal_lm(hidden_size=256, intermediate_size=512, num_heads=4, num_kv_heads=4, vocab_size=256)
    ids = torch.randint(0, 256, (1, 1))
    q = fxc.quantize_rtn(fxc.capture(m, (ids,)), fxc.RTNConfig(bits=4, group_size=128, granularity="per_group",
                                                               exclude=("lm_head",)))
    b = build_tvm(q, (ids,), target="cuda", dtype=torch.float16)
    assert {layer["kernel"] for layer in b.info["layers"]} == {"fxc_mma"}
    symbols = [f.attrs["global_symbol"] for f in b.scheduled.functions.values() if "global_symbol" in (f.attrs or {})]
    assert len(symbols) == len(set(symbols))
    # one kernel per distinct linear (shape, epilogue), shared by every layer: twice the layers, the same kernels
    # (before: each layer after the first compiled its own copy)
    m4 = tiny_causal_lm(hidden_size=256, intermediate_size=512, num_heads=4, num_kv_heads=4, vocab_size=256,
                        num_layers=4)
    q4 = fxc.quantize_rtn(fxc.capture(m4, (ids,)), fxc.RTNConfig(bits=4, group_size=128, granularity="per_group",
                                                                 exclude=("lm_head",)))
    b4 = build_tvm(q4, (ids,), target="cuda", dtype=torch.float16)

    def mma(build):
        return sorted(k for k in build.kernel_names() if k.startswith("fxc_packed_mma"))

    assert len(b4.info["layers"]) == 2 * len(b.info["layers"])
    assert mma(b4) == mma(b), (mma(b4), mma(b))


# ---------------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_cuda_decoder_block_parity_and_roundtrip(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(1, 8, 64)
    q = _rtn(DecoderBlock().eval(), x, bits=4, symmetric=False, granularity="per_group", group_size=32)
    r = compile_tvm(q, (x,), target="cuda")
    rep = check_parity(q, r, (x.cuda(),))
    assert rep.ok(atol=1e-4, rtol=1e-4), rep
    path = r.export_library(tmp_path / "m.so")
    r2 = fxc.runtime.load_runner(str(path), backend="tvm", device="cuda")
    torch.testing.assert_close(r2(x.cuda()), r(x.cuda()))


@pytest.mark.gpu
def test_cuda_fp16_mlp_parity():
    torch.manual_seed(0)
    spec = QuantSpec(4, False, "per_group", 64)
    mlp = nn.Sequential(QuantLinear.from_linear(nn.Linear(256, 512), spec), nn.SiLU(),
                        QuantLinear.from_linear(nn.Linear(512, 256), spec))
    x = torch.randn(4, 256)
    r = compile_tvm(mlp, (x,), target="cuda", dtype=torch.float16)
    y = r(x.half().cuda()).float().cpu()
    ref = mlp(x)
    assert (y - ref).abs().max().item() <= 2e-2 * ref.abs().max().item()


@pytest.mark.gpu
def test_cuda_gemv_int4_g128_matches_reference():
    torch.manual_seed(0)
    lin = nn.Linear(4096, 4096, bias=False)
    q = nn.Sequential(QuantLinear.from_linear(lin, QuantSpec(4, True, "per_group", 128)))
    x = torch.randn(1, 1, 4096)
    r = compile_tvm(q, (x,), target="cuda", dtype=torch.float16)
    assert r.info["layers"][0]["kernel"] == "fxc_mma"  # the int4 tensor-core kernel, weights still packed
    y = r(x.half().cuda()).float().cpu()
    ref = x @ q[0].dequantized_weight().t()
    assert (y - ref).abs().max().item() <= 1e-2 * ref.abs().max().item()


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_magic_decode_matches_convert_decode(bits):
    """decode_mode 'magic' (integer ops + bit reinterpret) gives the same outputs as 'convert' (I2F)."""
    torch.manual_seed(bits)
    m = nn.Sequential(nn.Linear(256, 64)).eval()
    x = torch.randn(1, 3, 256)
    q = _rtn(m, x, bits=bits, symmetric=False, granularity="per_group", group_size=64)
    outs = {}
    for mode in ("magic", "convert"):
        outs[mode] = compile_tvm(q, (x,), target="llvm", config=TVMBuildConfig(decode_mode=mode))(x)
    torch.testing.assert_close(outs["magic"], outs["convert"], atol=1e-6, rtol=1e-6)




def test_hugging_face_llama_int4_builds_with_parity():
    """HF models compute position ids with a cumsum over a bool mask: it must build (TVM keeps cumsum's input
    dtype and its VM cannot run an undispatched scan) and match torch's int64 semantics."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()

    class Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, ids):
            return self.m(input_ids=ids, use_cache=False).logits

    ids = torch.randint(0, 128, (1, 8))
    gm = fxc.capture(Logits(hf), (ids,))
    q = fxc.quantize_rtn(gm, fxc.RTNConfig(bits=4, group_size=32, granularity="per_group"))
    rep = fxc.runtime.check_parity(q, fxc.compile_tvm(q, (ids,), target="llvm"), (ids,))
    assert rep.max_abs < 1e-4, rep
