"""Fewer kernels per decode step in the TVM backend: the epilogue / split / RMSNorm passes of
fxcompress/backends/tvm/transforms.py and the kernel epilogues of kernels/epilogue.py.  Which Relax chains are
rewritten and which are left alone (IR level, no compiler needed), the weight reordering of the swiglu epilogue
(numpy emulation of the tensor-core kernel), llvm parity (where the hand-written kernels do not exist and the
epilogue rewrite finds nothing), CUDA builds (nvcc), and on a GPU fused-vs-unfused parity (gpu mark)."""
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

tvm = pytest.importorskip("tvm")

import fxcompress as fxc  # noqa: E402
from fxcompress.backends.tvm import TVMBuildConfig, build_tvm, compile_tvm  # noqa: E402
from fxcompress.backends.tvm.importer import lower_to_relax  # noqa: E402
from fxcompress.backends.tvm.kernels import (Epilogue, packed_gemv_primfunc, packed_mma_primfunc,  # noqa: E402
                                             swiglu_row_order)
from fxcompress.backends.tvm.kernels.epilogue import unpack_mma_words  # noqa: E402
from fxcompress.backends.tvm.packing import pack_mma_words  # noqa: E402
from fxcompress.backends.tvm.transforms import fuse_passes  # noqa: E402
from fxcompress.models.smollm2 import CausalLM, SmolLM2Config  # noqa: E402
from fxcompress.nn import QuantLinear  # noqa: E402
from fxcompress.passes.fusion import fuse_linears  # noqa: E402
from fxcompress.quant import QuantSpec  # noqa: E402
from test_backends_tvm_mma_emulation import emulate  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from profile_decode_gpu import launch_list, per_layer  # noqa: E402

NVCC = shutil.which("nvcc") is not None
SPEC4 = QuantSpec(4, False, "per_group", 128)
TINY = dict(hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4, num_kv_heads=4, vocab_size=1000,
            tie_word_embeddings=False)


def _lm(cfg=TINY, fuse=True):
    """A CausalLM with RTN int4 g128 asymmetric linears (lm_head float), q/k/v and gate/up fused."""
    torch.manual_seed(0)
    model = CausalLM(SmolLM2Config(**cfg)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(0.5)
    ids = torch.randint(0, cfg["vocab_size"], (1, 1))
    dm = fxc.quantize_rtn(fxc.capture(model, (ids,)), fxc.RTNConfig(bits=4, symmetric=False, granularity="per_group",
                                                                      group_size=128, exclude=("lm_head",))).eval()
    return (fuse_linears(dm, (ids,), atol=1e-3, rtol=1e-3).eval() if fuse else dm), ids


def _calls(model, x, epilogues: bool, norm_prologue: bool = False) -> list[str]:
    """Names of the functions ``main`` calls after the fusion passes (CUDA emission: the hand-written kernels)."""
    from tvm import relax

    mod, _ = lower_to_relax(model, (x,), dtype=torch.float16, cuda=True)
    with tvm.target.Target("cuda"):
        mod = tvm.transform.Sequential(fuse_passes(epilogues, norm_prologue))(mod)
    names = []
    for block in mod["main"].body.blocks:
        for b in block.bindings:
            v = b.value
            if isinstance(v, relax.Call) and isinstance(v.op, tvm.ir.Op) and v.op.name == "relax.call_tir":
                names.append(v.args[0].name_hint)
    return names


@pytest.fixture(scope="module")
def lm():
    return _lm()


def test_decode_step_chains_become_epilogues(lm):
    """Per layer: o_proj and down_proj take the residual add, gate/up takes silu(gate) * up, each RMSNorm is one
    function (the RMSNorm prologue is off by default: tests/test_tvm_decode_prologue.py), no split remains; without
    the passes all of them are separate functions."""
    dm, ids = lm
    fused, plain = _calls(dm, ids, True), _calls(dm, ids, False)
    layers = TINY["num_layers"]
    assert len([n for n in fused if n.startswith("fxc_packed_mma") and n.endswith("_res")]) == 2 * layers
    assert len([n for n in fused if n.endswith("_swiglu")]) == layers
    assert not [n for n in fused if "sigmoid" in n or n.startswith("add") or n.startswith("split")]
    norms = [n for n in fused if "rsqrt" in n]
    assert len(norms) == 2 * layers + 1 and all("relax_astype" in n and "relax_mean" in n for n in norms)
    assert not [n for n in fused if "_rms" in n]
    assert [n for n in fused if n.startswith("fused_strided_slice")], fused  # q/k/v parts fused into consumers
    assert not [n for n in plain if n.endswith(("_res", "_swiglu"))]
    assert [n for n in plain if "sigmoid" in n] and [n for n in plain if n.startswith("split")]
    assert len(fused) < len(plain) - 6 * layers


class _Residual(nn.Module):
    def __init__(self, mode, bits=4):
        super().__init__()
        torch.manual_seed(1)
        self.q = QuantLinear.from_linear(nn.Linear(256, 256), QuantSpec(bits, False, "per_group", 128))
        self.vec = nn.Parameter(torch.randn(256))
        self.mode = mode

    def forward(self, x):
        y = self.q(x)
        if self.mode == "residual":
            return x + y
        if self.mode == "residual_left":
            return y + x
        if self.mode == "read_twice":  # y has a second reader: the add cannot take it
            return (x + y) * y
        if self.mode == "broadcast":  # other operand of another shape
            return y + self.vec.to(y.dtype)
        if self.mode == "self":
            return y + y
        if self.mode == "float32":
            return y.float()
        if self.mode == "float32_read_twice":
            return y.float() * 2 + y.float()
        if self.mode == "float32_norm":  # the cast feeds an RMSNorm, whose kernel takes it
            h = y.float()
            return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)
        raise ValueError(self.mode)


class _GateUp(nn.Module):
    def __init__(self, mode, bits=4):
        super().__init__()
        torch.manual_seed(2)
        self.gu = QuantLinear.from_linear(nn.Linear(256, 1024), QuantSpec(bits, False, "per_group", 128))
        self.mode = mode

    def forward(self, x):
        g, u = self.gu(x).split(512, dim=-1)
        if self.mode == "swiglu":
            return F.silu(g) * u
        if self.mode == "gate_read_twice":
            return F.silu(g) * u + g
        if self.mode == "swapped":  # silu of the second half: not the kernel's layout
            return F.silu(u) * g
        if self.mode == "gelu":
            return F.gelu(g) * u
        raise ValueError(self.mode)


@pytest.mark.parametrize("mode,fused", [("residual", True), ("residual_left", True), ("read_twice", False),
                                        ("broadcast", False), ("self", False)])
def test_residual_epilogue_only_where_the_pattern_holds(mode, fused):
    names = _calls(_Residual(mode).eval(), torch.randn(1, 1, 256), True)
    assert any(n.endswith("_res") for n in names) == fused, names


@pytest.mark.parametrize("mode,fused", [("float32", True), ("float32_read_twice", False), ("float32_norm", False)])
def test_float32_epilogue_only_where_the_cast_is_returned(mode, fused):
    """The fp32 store replaces a cast only where nothing else would take it (a returned value, e.g. logits)."""
    names = _calls(_Residual(mode).eval(), torch.randn(1, 1, 256), True)
    assert any(n.endswith("_f32") for n in names) == fused, names
    if mode == "float32_norm":
        assert len(names) == 2 and "rsqrt" in names[1] and "astype" in names[1], names  # the norm took the cast


@pytest.mark.parametrize("mode,fused", [("swiglu", True), ("gate_read_twice", False), ("swapped", False),
                                        ("gelu", False)])
def test_swiglu_epilogue_only_where_the_pattern_holds(mode, fused):
    names = _calls(_GateUp(mode).eval(), torch.randn(1, 1, 256), True)
    assert any(n.endswith("_swiglu") for n in names) == fused, names
    if not fused:
        assert any(n.startswith("fxc_packed_mma") and not n.endswith("_swiglu") for n in names)


def test_cuda_core_kernel_takes_the_residual_not_swiglu():
    """int2 layers run on the CUDA-core GEMV, which has the residual epilogue but not swiglu (its warps own
    consecutive rows); the swiglu chain then stays TVM's."""
    res = _calls(_Residual("residual", bits=2).eval(), torch.randn(1, 1, 256), True)
    assert [n for n in res if n.startswith("fxc_packed_gemv") and n.endswith("_res")], res
    gu = _calls(_GateUp("swiglu", bits=2).eval(), torch.randn(1, 1, 256), True)
    assert not [n for n in gu if n.endswith("_swiglu")] and [n for n in gu if "sigmoid" in n], gu


def test_epilogue_arguments_are_checked():
    with pytest.raises(ValueError, match="Epilogue.kind"):
        Epilogue("gelu")
    with pytest.raises(ValueError, match="even number"):
        Epilogue("swiglu").out_features(15)
    with pytest.raises(ValueError, match="fuse_epilogues"):
        TVMBuildConfig(fuse_epilogues="yes")
    with pytest.raises(ValueError, match="fuse_norm_prologue"):
        TVMBuildConfig(fuse_norm_prologue=1)
    with pytest.raises(ValueError, match="epilogue"):
        packed_gemv_primfunc(m=1, k=256, n=256, bits=4, qmin=-8, group_size=128, scale_rows=256,
                             has_zero_point=False, has_bias=False, epilogue=Epilogue("swiglu"))
    with pytest.raises(ValueError, match="epilogue"):
        packed_mma_primfunc(m=1, k=256, n=256, qmin=-8, group_size=128, scale_rows=256, has_zero_point=False,
                            has_bias=False, epilogue="residual")


@pytest.mark.parametrize("bits", [4, 8])
def test_mma_words_unpack_and_swiglu_row_order(bits):
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 2**bits, size=(64, 512))
    assert (unpack_mma_words(pack_mma_words(codes, 0, bits), bits) == codes).all()
    order = swiglu_row_order(64)
    assert sorted(order) == list(range(64))
    assert list(order[:16]) == [*range(8), *range(32, 40)]  # tile 0: gate 0-7, up 0-7
    with pytest.raises(ValueError):
        swiglu_row_order(24)


@pytest.mark.parametrize("m", [1, 9, 32])
@pytest.mark.parametrize("zero_point", [True, False])
def test_emulated_swiglu_epilogue_matches_reference(m, zero_point):
    """The tensor-core kernel on the reordered weight (numpy emulation), then the swiglu store as the kernel indexes
    it (output feature 8 bx + r from tile rows r and r + 8), against silu(gate) * up of the original weight."""
    rng = np.random.default_rng(m)
    k, n, gs, bits, qmin = 256, 64, 64, 4, -8
    codes = rng.integers(qmin, 8, size=(n, k))
    scale = rng.uniform(0.005, 0.02, size=(n, k // gs)).astype(np.float16)
    zp = rng.integers(-2, 3, size=(n, k // gs)).astype(np.float16) if zero_point else None
    bias = rng.standard_normal(n).astype(np.float16) if zero_point else None
    x = rng.standard_normal((m, k)).astype(np.float16)
    order = swiglu_row_order(n)
    words = pack_mma_words(codes[order], qmin, bits)
    y = emulate(x, words, scale[order], None if zp is None else zp[order], None if bias is None else bias[order],
                m=m, k=k, n=n, bits=bits, qmin=qmin, group_size=gs, tiles={"small": (2, 2), "batch": (2, 2)})
    out = np.zeros((m, n // 2), np.float16)
    for bx in range(n // 16):
        for r in range(8):
            g = y[:, bx * 16 + r].astype(np.float32)
            s = (g * (1 / (1 + np.exp(-g)))).astype(np.float16)
            out[:, bx * 8 + r] = s * y[:, bx * 16 + 8 + r]
    w = (codes - (0 if zp is None else np.repeat(zp.astype(np.float32), gs, 1))) * \
        np.repeat(scale.astype(np.float32), gs, 1)
    lin = x.astype(np.float32) @ w.T + (0 if bias is None else bias.astype(np.float32))
    ref = F.silu(torch.from_numpy(lin[:, :n // 2])) * torch.from_numpy(lin[:, n // 2:])
    assert np.abs(out.astype(np.float32) - ref.numpy()).max() <= 5e-3 * np.abs(ref.numpy()).max() + 1e-3


def test_llvm_build_skips_the_epilogue_rewrite_and_keeps_parity(lm):
    """On llvm the linears are te kernels (no hand-written kernel to take an epilogue): the epilogue rewrite finds
    nothing; the RMSNorm / split passes still apply and the outputs equal the build without them."""
    dm, ids = lm
    on = build_tvm(dm, (ids,), target="llvm", config=TVMBuildConfig(fuse_epilogues=True))
    off = compile_tvm(dm, (ids,), target="llvm", config=TVMBuildConfig(fuse_epilogues=False))
    assert {layer["kernel"] for layer in on.info["layers"]} == {"te"}
    names = on.primfunc_names()
    assert not [n for n in names if n.endswith(("_res", "_swiglu"))]
    assert [n for n in names if "relax_mean" in n and "rsqrt" in n]
    from fxcompress.runtime.tvm_runner import TVMRunner

    y_on = TVMRunner(on.executable, "cpu", on.info, build=on)(ids)
    y_off = off(ids)
    torch.testing.assert_close(y_on, y_off, atol=0, rtol=0)
    ref = dm(ids)
    assert (y_on - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()


@pytest.mark.skipif(not NVCC, reason="needs nvcc to build CUDA code")
def test_cuda_build_compiles_the_fused_kernels_and_cuts_launches(lm):
    dm, ids = lm
    counts = {}
    for fuse in (False, True):
        b = build_tvm(dm, (ids,), target="cuda", dtype=torch.float16, config=TVMBuildConfig(fuse_epilogues=fuse))
        groups = per_layer(launch_list(b), [layer["name"] for layer in b.info["layers"]])
        counts[fuse] = [sum(k for *_, k in g) for lab, g in groups if lab.startswith("layer")]
        if fuse:
            kn = b.kernel_names()
            assert [k for k in kn if k.endswith("_res_kernel")] and [k for k in kn if k.endswith("_swiglu_kernel")]
            assert not [k for k in kn if k.startswith(("add", "split", "cast", "multiply"))], kn
            assert "mma.sync.aligned.m16n8k16" in b.device_source()
    # a middle layer: 27 launches unfused -> 17 (2 RMSNorms 3 -> 1 each, 3 split parts, 2 residual adds and the
    # silu * up kernel gone; tools/results/decode_launches.md lists them)
    assert counts[True][1] <= counts[False][1] - 10, counts
    assert counts[True][1] <= 17, counts


@pytest.mark.skipif(not NVCC, reason="needs nvcc to build CUDA code")
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("mode,suffix", [("residual", "_res"), ("float32", "_f32")])
def test_cuda_build_residual_and_float32_epilogues_for_both_kernels(bits, mode, suffix):
    b = build_tvm(_Residual(mode, bits=bits).eval(), (torch.randn(1, 3, 256),), target="cuda",
                  dtype=torch.float16, config=TVMBuildConfig(fuse_epilogues=True))
    assert [k for k in b.kernel_names() if k.endswith(f"{suffix}_kernel")], b.kernel_names()
    assert not [k for k in b.kernel_names() if k.startswith(("add", "cast"))]


# ---- GPU (the lead runs these on an H100) ----

def _gpu_pair(model, x):
    outs = {}
    for fuse in (False, True):
        r = compile_tvm(model, (x,), target="cuda", dtype=torch.float16, config=TVMBuildConfig(fuse_epilogues=fuse))
        y = r(x.half().cuda() if x.is_floating_point() else x.cuda())
        outs[fuse] = (y[0] if isinstance(y, (list, tuple)) else y).float().cpu()
    return outs


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 5, 16, 32])
@pytest.mark.parametrize("mode", ["residual", "float32", "swiglu"])
@pytest.mark.parametrize("bits", [2, 4])
def test_gpu_epilogue_kernels_match_unfused(m, mode, bits):
    if bits == 2 and (mode == "swiglu" or m > 16):
        pytest.skip("int2: CUDA-core kernel (1..16 rows, no swiglu epilogue)")
    model = (_GateUp(mode, bits) if mode == "swiglu" else _Residual(mode, bits)).eval()
    x = torch.randn(1, m, 256)
    outs = _gpu_pair(model, x)
    ref = model(x)
    scale = ref.abs().max().item()
    assert (outs[True] - outs[False]).abs().max().item() <= 1e-3 * scale, (outs[True] - outs[False]).abs().max()
    assert (outs[True] - ref).abs().max().item() <= 2e-2 * scale


@pytest.mark.gpu
def test_gpu_decode_step_fused_matches_unfused_and_launches_per_layer():
    """The 2048-wide 4-layer decode step of tools/bench_decode_gpu.py: fused-epilogue logits equal the unfused
    build's within fp16 tolerance; launches per layer printed (issue 13 target <= 8)."""
    full = dict(hidden_size=2048, intermediate_size=5632, num_layers=4, num_heads=16, num_kv_heads=16,
                vocab_size=32000, tie_word_embeddings=False)
    dm, ids = _lm(full)
    outs, counts = {}, {}
    for fuse in (False, True):
        b = build_tvm(dm, (ids,), target="cuda", dtype=torch.float16, config=TVMBuildConfig(fuse_epilogues=fuse))
        groups = per_layer(launch_list(b), [layer["name"] for layer in b.info["layers"]])
        counts[fuse] = [sum(k for *_, k in g) for lab, g in groups if lab.startswith("layer")]
        from fxcompress.runtime.tvm_runner import TVMRunner

        y = TVMRunner(b.executable, "cuda", b.info, build=b)(ids.cuda())
        outs[fuse] = (y[0] if isinstance(y, (list, tuple)) else y).float().cpu()
    print(f"launches per layer: unfused {counts[False]}, fused epilogues {counts[True]}")
    ref = dm(ids)
    scale = ref.abs().max().item()
    assert (outs[True] - outs[False]).abs().max().item() <= 1e-3 * scale
    assert (outs[True] - ref).abs().max().item() <= 2e-2 * scale
    assert counts[True][1] < counts[False][1]
