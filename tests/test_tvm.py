"""TVM (Relax) backend: packed integer linears with fused decode, CPU (llvm) parity, artifacts, errors."""
import re
import shutil

import numpy as np
import pytest
import torch
from torch import nn

tvm = pytest.importorskip("tvm")

import fxcompress as fxc  # noqa: E402
from fxcompress.backends.tvm import (TVMBackendError, build_tvm, compile_tvm, meta_schedule_usable,  # noqa: E402
                                     pack_words)
from fxcompress.backends.tvm import unpack_words  # noqa: E402
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


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_words_roundtrip_and_layout(bits):
    rng = np.random.default_rng(bits)
    qmin = -(2 ** (bits - 1))
    codes = rng.integers(qmin, 2 ** (bits - 1), size=(5, 37))
    words = pack_words(codes, bits, qmin)
    per = 32 // bits
    assert words.dtype == np.uint32 and words.shape == (5, -(-37 // per))
    np.testing.assert_array_equal(unpack_words(words, bits, 37, qmin), codes)
    # plain reference: code k of a row is bits [(k % per) * bits, ...) of word k // per, offset binary
    k = 13
    assert (int(words[2, k // per]) >> ((k % per) * bits)) & (2**bits - 1) == codes[2, k] - qmin


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


def test_digits_resnet_conv_dequantized_parity():
    from fxcompress.models import load_digits_split, pretrained_digits_resnet

    model = pretrained_digits_resnet()
    _, _, xte, yte = load_digits_split()
    x = xte[:16]
    q = _rtn(model, x, bits=8, symmetric=True, granularity="per_channel")
    r = compile_tvm(q, (x,), target="llvm")
    rep = check_parity(q, r, (x,))
    assert rep.ok(atol=1e-4, rtol=1e-4), rep
    assert torch.equal(r(x).argmax(-1), q(x).argmax(-1))
    assert len(r.info["layers"]) == 1  # the fc head is packed; the convolutions are dequantized float convs


def test_export_library_load_roundtrip(block4, tmp_path):
    q, x, r = block4
    path = r.export_library(tmp_path / "model.so")
    assert path.is_file() and (tmp_path / "model.so.json").is_file()
    r2 = fxc.runtime.load(str(path), backend="tvm", device="cpu")
    assert r2.backend == "tvm" and r2.input_names == r.input_names
    torch.testing.assert_close(r2(x), r(x), atol=0, rtol=0)
    with pytest.raises(fxc.runtime.RunnerInputError, match="shape"):
        r2(torch.randn(1, 9, 64))
    with pytest.raises(ValueError, match="no TVM library"):
        fxc.runtime.load(str(tmp_path / "missing.so"), backend="tvm")


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
    ok, why = meta_schedule_usable()
    m = nn.Sequential(QuantLinear.from_linear(nn.Linear(64, 16), QuantSpec(4, False, "per_group", 32)))
    x = torch.randn(1, 64)
    if not ok:
        with pytest.raises(TVMBackendError, match="meta_schedule"):
            compile_tvm(m, (x,), target="llvm", tune="meta_schedule", trials=2, work_dir=tmp_path)
    else:  # pragma: no cover - TVM builds that can serialize TIR
        r = compile_tvm(m, (x,), target="llvm", tune="meta_schedule", trials=2, work_dir=tmp_path)
        assert check_parity(m, r, (x,)).ok(1e-5, 1e-5)
        r2 = compile_tvm(m, (x,), target="llvm", tune="meta_schedule", trials=2, work_dir=tmp_path)
        assert r2.info["tuning"]["tuned"] == 0 and r2.info["tuning"]["reused"] >= 1


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
    r2 = fxc.runtime.load(str(path), backend="tvm", device="cuda")
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


def _small_batch_lin(k=512, n=256):
    torch.manual_seed(0)
    lin = nn.Linear(k, n, bias=True)
    return nn.Sequential(QuantLinear.from_linear(lin, QuantSpec(4, True, "per_group", 128)), nn.SiLU())


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc to build CUDA code")
@pytest.mark.parametrize("m,kernel", [(4, "dlight"), (16, "dlight"), (17, "fxc")])
def test_cuda_build_small_batch_uses_gemv_schedule(m, kernel, monkeypatch):
    """GEMV_KERNEL='dlight' (or rows the hand-written kernel does not take): dlight's GEMV-style (rfactor)
    schedule, one pass over the packed weight."""
    import fxcompress.backends.tvm as B

    monkeypatch.setattr(B, "GEMV_KERNEL", kernel)
    monkeypatch.setattr(B, "SMALL_BATCH_MAX_M", 17)
    q = _small_batch_lin()
    b = build_tvm(q, (torch.randn(1, m, 512),), target="cuda", dtype=torch.float16)
    src = b.device_source()
    assert "rf_local" in src and "uint*" in src
    assert len([k for k in b.kernel_names() if "decode_matmul" in k]) == 1


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc to build CUDA code")
@pytest.mark.parametrize("m,bits,kernel", [(1, 4, "fxc_mma"), (4, 4, "fxc_mma"), (16, 4, "fxc_mma"),
                                            (1, 8, "fxc_mma"), (16, 8, "fxc_mma"),
                                            (1, 2, "fxc_gemv"), (4, 2, "fxc_gemv")])
def test_cuda_build_fp16_small_batch_uses_fxc_kernels(m, bits, kernel):
    """fp16, 1..16 rows: one hand-scheduled kernel (int4 / int8: tensor cores; int2: CUDA-core GEMV), weights
    packed."""
    torch.manual_seed(0)
    lin = nn.Linear(512, 256, bias=True)
    q = nn.Sequential(QuantLinear.from_linear(lin, QuantSpec(bits, True, "per_group", 128)), nn.SiLU())
    b = build_tvm(q, (torch.randn(1, m, 512),), target="cuda", dtype=torch.float16)
    assert [layer["kernel"] for layer in b.info["layers"]] == [kernel]
    assert f"{kernel.replace('fxc_', 'fxc_packed_')}_kernel" in b.kernel_names()
    assert not [k for k in b.kernel_names() if "decode_matmul" in k or "reshape" in k]
    src = b.device_source()
    if kernel == "fxc_mma":
        assert "mma.sync.aligned.m16n8k16" in src
    else:
        assert "__shfl_down_sync" in src and ("uint4" in src or m > 4)  # 16-byte loads at batch <= 4


def test_fxc_gemv_supports_names_the_reason():
    from fxcompress.backends import tvm_gemv as G

    ok = dict(m=1, k=4096, n=4096, bits=4, group_size=128, dtype="float16")
    assert G.supports(**ok) is None
    assert "3-bit" in G.supports(**{**ok, "bits": 3})
    assert "float32" in G.supports(**{**ok, "dtype": "float32"})
    assert "batch 17" in G.supports(**{**ok, "m": 17})
    assert "K=4100" in G.supports(**{**ok, "k": 4100})
    assert "group size 16" in G.supports(**{**ok, "group_size": 16})
    assert "shared memory" in G.supports(**{**ok, "m": 16}, tile=G.Tile(words=4))
    assert G.supports(**{**ok, "n": 4104}) is None  # the default tile shrinks to divide N
    with pytest.raises(ValueError, match="3-bit"):
        G.packed_gemv_primfunc(m=1, k=4096, n=4096, bits=3, qmin=-4, group_size=128, scale_rows=4096,
                               has_zero_point=False, has_bias=False)


@pytest.mark.gpu
@pytest.mark.parametrize("bits,symmetric,gran,bias,m,k,n,kernel", [
    (4, True, "per_group", False, 1, 4096, 264, "fxc_gemv"),
    (4, False, "per_group", True, 1, 5632, 264, "fxc_gemv"),  # zero point + bias, a partial last step
    (4, True, "per_group", False, 3, 2048, 264, "fxc_gemv"),
    (8, True, "per_channel", True, 2, 1024, 264, "fxc_gemv"),
    (2, False, "per_group", False, 4, 2048, 264, "fxc_gemv"),
    (4, True, "per_tensor", False, 1, 512, 264, "fxc_gemv"),
    (4, False, "per_group", True, 16, 4096, 264, "fxc_gemv"),  # N % 16 != 0: CUDA-core batch tile, K in chunks
    (8, True, "per_group", False, 7, 1152, 264, "fxc_gemv"),
    (4, False, "per_group", True, 16, 4096, 272, "fxc_mma"),  # tensor cores
    (4, True, "per_group", False, 5, 1024, 272, "fxc_mma"),
    (4, False, "per_channel", False, 9, 512, 64, "fxc_mma"),
    (4, True, "per_group", False, 1, 1152, 272, "fxc_mma"),  # K/64 = 18: 2 warps split K
    (8, False, "per_group", True, 4, 2048, 272, "fxc_mma"),
    (8, True, "per_channel", False, 16, 1024, 64, "fxc_mma"),
    (8, True, "per_group", False, 1, 4096, 4096, "fxc_mma"),
    (4, False, "per_group", True, 3, 5632, 272, "fxc_mma"),
])
def test_cuda_fxc_gemv_matches_reference(bits, symmetric, gran, bias, m, k, n, kernel):
    torch.manual_seed(bits + m)
    lin = nn.Linear(k, n, bias=bias)
    gs = 128 if gran == "per_group" else None
    q = nn.Sequential(QuantLinear.from_linear(lin, QuantSpec(bits, symmetric, gran, gs)))
    x = torch.randn(1, m, k)
    r = compile_tvm(q, (x,), target="cuda", dtype=torch.float16)
    assert r.info["layers"][0]["kernel"] == kernel
    y = r(x.half().cuda()).float().cpu()
    ref = q(x)
    assert (y - ref).abs().max().item() <= 5e-3 * ref.abs().max().item()


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_mma_words_matches_the_fragment_layout(bits):
    """Each lane's words hold exactly its mma.m16n8k16 A-fragment codes (PTX ISA layout), low/high halves paired."""
    from fxcompress.backends import tvm_gemv as G

    rng = np.random.default_rng(0)
    qmin = -(2 ** (bits - 1))
    codes = rng.integers(qmin, -qmin, size=(32, 128))
    w = G.pack_mma_words(codes, qmin, bits)
    kpl = G.mma_k_per_load(bits)  # 64 (int4) / 32 (int8) of K per 16-byte load
    assert w.shape == (2, 128 // kpl, 32, 4) and w.dtype == np.uint32
    r = 16 // bits  # A registers per word
    for rb, kq, lane in [(0, 0, 0), (1, 1, 31), (0, 1, 13), (1, 0, 6)]:
        g, t = lane // 4, lane % 4
        for j in range(kpl // 16):  # 16-wide K slice inside the load
            for i, (dr, dc) in enumerate([(0, 0), (8, 0), (0, 8), (8, 8)]):
                word = int(w[rb, kq, lane, j * (4 // r) + i // r])
                for h in range(2):
                    u = (word >> (bits * (i % r) + 16 * h)) & (2**bits - 1)
                    assert u + qmin == codes[rb * 16 + g + dr, kq * kpl + j * 16 + 2 * t + dc + h]
    with pytest.raises(ValueError, match="N % 16"):
        G.pack_mma_words(codes[:8], qmin, bits)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["fxc", "dlight"])
@pytest.mark.parametrize("m", [1, 4, 16])
def test_cuda_small_batch_matches_reference(m, kernel, monkeypatch):
    import fxcompress.backends.tvm as B

    monkeypatch.setattr(B, "GEMV_KERNEL", kernel)
    q = _small_batch_lin()
    x = torch.randn(1, m, 512)
    r = compile_tvm(q, (x,), target="cuda", dtype=torch.float16)
    y = r(x.half().cuda()).float().cpu()
    ref = q(x)
    assert (y - ref).abs().max().item() <= 1e-2 * ref.abs().max().item()


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_magic_decode_matches_convert_decode(bits, monkeypatch):
    """DECODE_MODE 'magic' (integer ops + bit reinterpret) gives the same outputs as 'convert' (I2F)."""
    import fxcompress.backends.tvm as B

    torch.manual_seed(bits)
    m = nn.Sequential(nn.Linear(256, 64)).eval()
    x = torch.randn(1, 3, 256)
    q = _rtn(m, x, bits=bits, symmetric=False, granularity="per_group", group_size=64)
    outs = {}
    for mode in ("magic", "convert"):
        monkeypatch.setattr(B, "DECODE_MODE", mode)
        outs[mode] = compile_tvm(q, (x,), target="llvm")(x)
    torch.testing.assert_close(outs["magic"], outs["convert"], atol=1e-6, rtol=1e-6)


def test_cuda_build_with_gemv_config_override(monkeypatch):
    """GEMV_CUDA_CONFIG overrides dlight's batch-1 tile sizes (here 4 rows per block) and still builds."""
    import fxcompress.backends.tvm as B

    monkeypatch.setattr(B, "GEMV_CUDA_CONFIG", {"TS": 4, "TR": 32})
    monkeypatch.setattr(B, "GEMV_KERNEL", "dlight")
    m = nn.Sequential(nn.Linear(512, 256)).eval()
    x = torch.randn(1, 1, 512)
    q = _rtn(m, x, bits=4, symmetric=True, granularity="per_group", group_size=128)
    b = build_tvm(q, (x,), target="cuda", dtype=torch.float16)
    src = b.device_source()
    assert "__launch_bounds__(128)" in src and "rf_local" in src


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc to build CUDA code")
def test_float_linear_weight_is_transposed_at_build_time():
    """A float linear (e.g. an unquantized lm_head) must not transpose its constant weight on every call (that
    kernel was 63% of the GPU time of a decode step); with a bias in fp16 it imports at all (TVM's own addmm
    converter adds an fp16 bias to an fp32 product and fails)."""
    torch.manual_seed(0)
    m = nn.Sequential(QuantLinear.from_linear(nn.Linear(64, 64), QuantSpec(4, True, "per_group", 32)),
                      nn.Linear(64, 48))
    x = torch.randn(1, 1, 64)
    b = build_tvm(m, (x,), target="cuda", dtype=torch.float16)
    assert not [k for k in b.kernel_names() if re.fullmatch(r"transpose\d*_kernel", k)], b.kernel_names()
    r = compile_tvm(m, (x,), target="llvm")
    assert check_parity(m, r, (x,)).ok(1e-5, 1e-5)
