"""The hand-scheduled CUDA kernels and schedule rules of the TVM backend (fxcompress/backends/tvm/kernels/,
rules/): which kernel a layer gets, the kernels' limits, CUDA builds (nvcc) and GPU parity (gpu mark)."""
import re
import shutil

import pytest
import torch
from torch import nn

tvm = pytest.importorskip("tvm")

import fxcompress as fxc  # noqa: E402
from fxcompress.backends.tvm import TVMBuildConfig, build_tvm, compile_tvm  # noqa: E402
from fxcompress.backends.tvm import kernels as G  # noqa: E402
from fxcompress.nn import QuantLinear  # noqa: E402
from fxcompress.quant import QuantSpec  # noqa: E402
from fxcompress.runtime import check_parity  # noqa: E402


def _rtn(model, x, **cfg):
    gm = fxc.capture(model, (x,))
    return fxc.quantize_rtn(gm, fxc.RTNConfig(**cfg))


def _small_batch_lin(k=512, n=256):
    torch.manual_seed(0)
    lin = nn.Linear(k, n, bias=True)
    return nn.Sequential(QuantLinear.from_linear(lin, QuantSpec(4, True, "per_group", 128)), nn.SiLU())


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc to build CUDA code")
@pytest.mark.parametrize("m,kernel", [(4, "dlight"), (16, "dlight"), (33, "fxc")])
def test_cuda_build_small_batch_uses_gemv_schedule(m, kernel):
    """gemv_kernel='dlight' (or rows the hand-written kernels do not take): dlight's GEMV-style (rfactor)
    schedule, one pass over the packed weight."""
    q = _small_batch_lin()
    cfg = TVMBuildConfig(gemv_kernel=kernel, small_batch_max_m=33)
    b = build_tvm(q, (torch.randn(1, m, 512),), target="cuda", dtype=torch.float16, config=cfg)
    src = b.device_source()
    assert "rf_local" in src and "uint*" in src
    assert len([k for k in b.kernel_names() if "decode_matmul" in k]) == 1


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc to build CUDA code")
@pytest.mark.parametrize("m,bits,kernel", [(1, 4, "fxc_mma"), (4, 4, "fxc_mma"), (16, 4, "fxc_mma_batch"),
                                            (1, 8, "fxc_mma"), (16, 8, "fxc_mma_batch"),
                                            (1, 2, "fxc_gemv"), (4, 2, "fxc_gemv")])
def test_cuda_build_fp16_small_batch_uses_fxc_kernels(m, bits, kernel):
    """fp16, 1..16 rows: one hand-scheduled kernel (int4 / int8: tensor cores, the batch kernel from 5 rows; int2:
    CUDA-core GEMV), weights packed."""
    torch.manual_seed(0)
    lin = nn.Linear(512, 256, bias=True)
    q = nn.Sequential(QuantLinear.from_linear(lin, QuantSpec(bits, True, "per_group", 128)), nn.SiLU())
    b = build_tvm(q, (torch.randn(1, m, 512),), target="cuda", dtype=torch.float16)
    assert [layer["kernel"] for layer in b.info["layers"]] == [kernel]
    assert f"{kernel.replace('fxc_', 'fxc_packed_')}_kernel" in b.kernel_names()
    assert not [k for k in b.kernel_names() if "decode_matmul" in k or "reshape" in k]
    src = b.device_source()
    if kernel.startswith("fxc_mma"):
        assert "mma.sync.aligned.m16n8k16" in src
    else:
        assert "__shfl_down_sync" in src and ("uint4" in src or m > 4)  # 16-byte loads at batch <= 4


def test_fxc_gemv_supports_names_the_reason():
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
    (4, False, "per_group", True, 16, 4096, 272, "fxc_mma_batch"),  # tensor cores, 5..32 rows: the batch kernel
    (4, True, "per_group", False, 5, 1024, 272, "fxc_mma_batch"),
    (4, False, "per_channel", False, 9, 512, 64, "fxc_mma_batch"),
    (4, True, "per_group", False, 1, 1152, 272, "fxc_mma"),  # K/64 = 18: 2 warps split K
    (8, False, "per_group", True, 4, 2048, 272, "fxc_mma"),
    (8, True, "per_channel", False, 16, 1024, 64, "fxc_mma_batch"),
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


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["fxc", "dlight"])
@pytest.mark.parametrize("m", [1, 4, 16])
def test_cuda_small_batch_matches_reference(m, kernel):
    q = _small_batch_lin()
    x = torch.randn(1, m, 512)
    r = compile_tvm(q, (x,), target="cuda", dtype=torch.float16, config=TVMBuildConfig(gemv_kernel=kernel))
    y = r(x.half().cuda()).float().cpu()
    ref = q(x)
    assert (y - ref).abs().max().item() <= 1e-2 * ref.abs().max().item()


def test_cuda_build_with_gemv_config_override():
    """TVMBuildConfig.gemv_cuda overrides dlight's batch-1 tile sizes (here 4 rows per block) and still builds."""
    cfg = TVMBuildConfig(gemv_cuda={"TS": 4, "TR": 32}, gemv_kernel="dlight")
    m = nn.Sequential(nn.Linear(512, 256)).eval()
    x = torch.randn(1, 1, 512)
    q = _rtn(m, x, bits=4, symmetric=True, granularity="per_group", group_size=128)
    b = build_tvm(q, (x,), target="cuda", dtype=torch.float16, config=cfg)
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


class _Branches(nn.Module):
    """Several quantized linears reading the same input, outputs concatenated: one build covers all variants."""

    def __init__(self, layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        return torch.cat([layer(x) for layer in self.layers], dim=-1)


MMA_VARIANTS = [(bits, gran, zp) for bits in (4, 8) for gran in ("per_group", "per_channel") for zp in (False, True)]


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2, 4, 8, 16, 24, 32])
def test_cuda_mma_1_to_32_rows_matches_reference(m):
    """The tensor-core kernel (kernels/mma_gemv.py; ``mma_batch=False``: the batch kernel has its own test in
    tests/test_backends_tvm_mma_batch_gpu.py) at 1..32 rows (1..4 n8 tiles per decoded weight fragment), int4 /
    int8 x group / channel x zero point off / on, each against the float reference of its QuantLinear."""
    torch.manual_seed(m)
    k, n = 1024, 272
    layers = [QuantLinear.from_linear(nn.Linear(k, n, bias=zp), QuantSpec(bits, not zp, gran,
                                                                          128 if gran == "per_group" else None))
              for bits, gran, zp in MMA_VARIANTS]
    model = _Branches(layers).eval()
    x = torch.randn(1, m, k)
    r = compile_tvm(model, (x,), target="cuda", dtype=torch.float16, config=TVMBuildConfig(mma_batch=False))
    assert [layer["kernel"] for layer in r.info["layers"]] == ["fxc_mma"] * len(layers)
    assert [layer["zero_point"] != "none" for layer in r.info["layers"]] == [zp for *_, zp in MMA_VARIANTS]
    y = r(x.half().cuda()).float().cpu()
    for i, (layer, variant) in enumerate(zip(layers, MMA_VARIANTS)):
        ref = layer(x.half().float())
        got = y[..., i * n:(i + 1) * n]
        err = (got - ref).abs().max().item()
        assert err <= 5e-3 * ref.abs().max().item(), (variant, err)
