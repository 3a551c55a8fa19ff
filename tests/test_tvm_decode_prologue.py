"""RMSNorm as a prologue of the tensor-core quantized-linear kernel (fxcompress/backends/tvm/kernels/prologue.py,
the ``rms_norm_prologue_pass`` of fxcompress/backends/tvm/transforms.py): the kernel's sum of squares and B-fragment
normalization emulated in numpy (extending tests/test_backends_tvm_mma_emulation.py) against torch's fp16 RMSNorm
and a float linear; which Relax chains become prologues and which look-alikes stay (IR level, no compiler); CUDA
builds (nvcc) without the norm kernels; on a GPU, fused-vs-unfused and torch parity (gpu mark)."""
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

tvm = pytest.importorskip("tvm")

import fxcompress as fxc  # noqa: E402
from fxcompress.backends.tvm import TVMBuildConfig, build_tvm, compile_tvm  # noqa: E402
from fxcompress.backends.tvm.kernels import Epilogue, packed_mma_primfunc  # noqa: E402
from fxcompress.backends.tvm.kernels.mma_gemv import mma_tile  # noqa: E402
from fxcompress.backends.tvm.kernels.prologue import MAX_PROLOGUE_M, Prologue  # noqa: E402
from fxcompress.backends.tvm.packing import mma_k_per_load, pack_mma_words  # noqa: E402
from fxcompress.models.smollm2 import RMSNorm  # noqa: E402
from fxcompress.nn import QuantLinear  # noqa: E402
from fxcompress.quant import QuantSpec  # noqa: E402
from test_backends_tvm_mma_emulation import LANES, emulate  # noqa: E402
from test_tvm_decode_epilogue import _calls, _lm  # noqa: E402

PROLOGUE = TVMBuildConfig(fuse_epilogues=True, fuse_norm_prologue=True)  # the prologue is off by default
UNFUSED = TVMBuildConfig(fuse_epilogues=False)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from profile_decode_gpu import launch_list, per_layer  # noqa: E402

NVCC = shutil.which("nvcc") is not None
_L = np.arange(LANES)


# ---- numpy emulation of the prologue (follows rms_rstd / kuse of kernels/mma_gemv.py) ----

def emulate_rstd(x, *, m, k, warps, eps):
    """1 / rms of each lane's row (``min(lane // 4, m - 1)``), as ``rms_rstd`` computes it: per thread the squares
    of 8 consecutive elements per 16-byte load (loads ``jx * threads + tid``), an xor butterfly over the warp, the
    warps' sums added in order from shared memory, ``rsqrt(sum / K + eps)`` in fp32."""
    threads, x8 = warps * LANES, k // 8
    x16 = x.astype(np.float16)
    part = np.zeros(m * warps, np.float32)
    for i in range(m):
        ss = np.zeros((warps, LANES), np.float32)
        for jx in range(-(-x8 // threads)):
            for ty in range(warps):
                idx = jx * threads + ty * LANES + _L
                ok = idx < x8
                xs = x16[i, np.minimum(idx, x8 - 1)[:, None] * 8 + np.arange(8)].astype(np.float32)  # (lanes, 8)
                for e in range(8):
                    ss[ty] = np.where(ok, ss[ty] + xs[:, e] * xs[:, e], ss[ty])
        for sh in (16, 8, 4, 2, 1):
            ss = ss + ss[:, _L ^ sh]
        assert (ss == ss[:, :1]).all()  # the butterfly leaves every lane with the same sum
        part[i * warps:(i + 1) * warps] = ss[:, 0]
    tot = np.zeros(LANES, np.float32)
    for wi in range(warps):
        tot = tot + part[np.minimum(_L // 4, m - 1) * warps + wi]
    return (np.float32(1) / np.sqrt(tot / np.float32(k) + np.float32(eps))).astype(np.float32)


def prologue_b_transform(g, rs, kpl, seen=None):
    """What ``kuse`` does to a B fragment: element ``e`` of lane ``l`` (K index ``q kpl + 16 j + 2 (l % 4) + 8 (e //
    2) + e % 2``, the norm weight read as ``g32`` pairs at that index) becomes ``fp16(g * fp16(x * rs[l]))``.
    ``seen``: a dict filled with ``(row, K) -> normalized value`` of the valid rows."""
    g16 = g.astype(np.float16)

    def transform(b, *, q, j, t2):
        out = b.copy()
        for e in range(4):
            kk = q * kpl + j * 16 + (_L % 4) * 2 + (e // 2) * 8 + e % 2
            h = (b[e].astype(np.float32) * rs).astype(np.float16)
            out[e] = (g16[kk].astype(np.float32) * h.astype(np.float32)).astype(np.float16)
            if seen is not None:
                for lane in range(LANES):
                    seen[(t2 * 8 + lane // 4, int(kk[lane]))] = out[e, lane]
        return out

    return transform


def _torch_rms_norm(x16, g16, eps):
    norm = RMSNorm(x16.shape[-1], eps)
    with torch.no_grad():
        norm.weight.copy_(torch.from_numpy(g16.astype(np.float32)))
    norm = norm.half()
    with torch.no_grad():
        return norm(torch.from_numpy(x16)).numpy()


def _case(m, k, n, bits, zero_point, seed):
    rng = np.random.default_rng(seed)
    qmin = -(1 << (bits - 1))
    gs = 64
    codes = rng.integers(qmin, 1 << (bits - 1), size=(n, k))
    scale = rng.uniform(0.005, 0.02, size=(n, k // gs)).astype(np.float16)
    zp = rng.integers(-2, 3, size=(n, k // gs)).astype(np.float16) if zero_point else None
    x = (rng.standard_normal((m, k)) * rng.uniform(0.2, 8, size=(m, 1))).astype(np.float16)  # rows of other scales
    g = rng.uniform(0.5, 1.5, size=k).astype(np.float16)
    return qmin, gs, codes, scale, zp, x, g


@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("k,tiles", [(256, (2, 2)), (704, (1, 4)), (1280, (2, 2)), (2048, (8, 8))])
@pytest.mark.parametrize("bits,zero_point", [(4, True), (8, False)])
def test_emulated_prologue_matches_torch_rms_norm_then_linear(m, k, tiles, bits, zero_point):
    """The kernel with the rms_norm prologue (emulated) on the norm's input = torch's fp16 RMSNorm, then the float
    linear.  K = 704 on 1 warp (int4): 11 weight loads in groups of 4, 4, 3 (the prologue's first group, a plain
    one, the tail); K = 1280 over 2 warps: 160 loads of 8 elements per row over 64 threads, a last partial round;
    K = 2048 over 8 warps (the 2048-wide model's q/k/v and gate/up): one load per thread."""
    eps = 1e-5
    n = 32
    qmin, gs, codes, scale, zp, x, g = _case(m, k, n, bits, zero_point, seed=m * 7 + k + bits)
    tl = {"small": tiles, "batch": tiles}
    warps, _ = mma_tile(m, k, bits, tl)
    rs = emulate_rstd(x, m=m, k=k, warps=warps, eps=eps)
    seen = {}
    y = emulate(x, pack_mma_words(codes, qmin, bits), scale, zp, None, m=m, k=k, n=n, bits=bits, qmin=qmin,
                group_size=gs, tiles=tl, b_transform=prologue_b_transform(g, rs, mma_k_per_load(bits), seen))
    h = _torch_rms_norm(x, g, eps)
    # the normalized activations the mma saw: torch's fp16 RMSNorm output, to one fp16 ulp (the fp32 sum of squares
    # is added in another order), almost all exactly
    got = np.zeros((m, k), np.float16)
    for (row, kk), v in seen.items():
        if row < m:
            got[row, kk] = v
    assert len([1 for (row, _) in seen if row < m]) == m * k  # every element of every row, once per block
    diff = np.abs(got.astype(np.float32) - h.astype(np.float32))
    ulp = np.spacing(np.abs(h).astype(np.float16)).astype(np.float32)
    assert (diff <= ulp).all(), diff.max()
    assert (diff == 0).mean() >= 0.99, (diff == 0).mean()
    w = (codes - (0 if zp is None else np.repeat(zp.astype(np.float32), gs, 1))) * \
        np.repeat(scale.astype(np.float32), gs, 1)
    ref = h.astype(np.float32) @ w.T
    assert np.abs(y.astype(np.float32) - ref).max() <= 2e-3 * np.abs(ref).max() + 1e-3


def test_emulated_rstd_equals_the_float64_norm():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 1280)).astype(np.float16)
    rs = emulate_rstd(x, m=3, k=1280, warps=2, eps=1e-6)
    want = 1 / np.sqrt((x.astype(np.float64) ** 2).mean(1) + 1e-6)
    np.testing.assert_allclose(rs, want[np.minimum(_L // 4, 2)], rtol=1e-6)


def test_prologue_arguments_are_checked():
    with pytest.raises(ValueError, match="Prologue.kind"):
        Prologue("layer_norm")
    with pytest.raises(ValueError, match="Prologue.eps"):
        Prologue("rms_norm", -1e-5)
    with pytest.raises(ValueError, match="Prologue.eps"):
        Prologue("rms_norm", math.nan)
    with pytest.raises(ValueError, match="Prologue.eps"):
        Prologue("none", 1e-5)
    kw = dict(k=256, n=256, qmin=-8, group_size=128, scale_rows=256, has_zero_point=False, has_bias=False)
    with pytest.raises(ValueError, match="prologue must be a Prologue"):
        packed_mma_primfunc(m=1, **kw, prologue="rms_norm")
    with pytest.raises(ValueError, match=f"at most {MAX_PROLOGUE_M} rows"):
        packed_mma_primfunc(m=MAX_PROLOGUE_M + 1, **kw, prologue=Prologue("rms_norm", 1e-5))
    f = packed_mma_primfunc(m=MAX_PROLOGUE_M, **kw, prologue=Prologue("rms_norm", 1e-5), epilogue=Epilogue("swiglu"))
    assert [str(p.name) for p in f.params] == ["x", "w", "s", "g", "y"]


# ---- Relax pass: which chains become prologues ----

class _NormLinear(nn.Module):
    """An RMSNorm (the LLaMA / fxcompress one unless ``mode`` says otherwise) feeding an int4 linear."""

    def __init__(self, mode="norm", bits=4, k=256, n=256, eps=1e-5):
        super().__init__()
        torch.manual_seed(3)
        self.norm = RMSNorm(k, eps)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)
        self.q = QuantLinear.from_linear(nn.Linear(k, n, bias=False), QuantSpec(bits, False, "per_group", 128))
        self.f = nn.Linear(k, n, bias=False)
        if mode == "three_linears":
            spec = QuantSpec(bits, False, "per_group", 128)
            self.q2, self.q3 = (QuantLinear.from_linear(nn.Linear(k, n, bias=False), spec) for _ in range(2))
        self.mode, self.eps = mode, eps

    def _manual(self, x, fp32=True, axis=-1, eps_after=False, weight=None):
        xf = x.float() if fp32 else x
        ms = xf.pow(2).mean(axis, keepdim=True)
        r = torch.rsqrt(ms) + self.eps if eps_after else torch.rsqrt(ms + self.eps)
        return r, (self.norm.weight if weight is None else weight) * (xf * r).to(x.dtype)

    def forward(self, x):
        mode = self.mode
        if mode in ("norm", "rows5", "int2", "int8"):
            return self.q(self.norm(x))
        if mode == "residual":  # the decoder block: the residual is the norm's *input*
            return x + self.q(self.norm(x))
        if mode == "three_linears":  # unfused q / k / v: each kernel takes the prologue
            h = self.norm(x)
            return self.q(h), self.q2(h), self.q3(h)
        if mode == "float_reader":  # a float linear also reads the norm's output
            h = self.norm(x)
            return self.q(h) + self.f(h)
        if mode == "returned":  # the norm's output is also returned
            h = self.norm(x)
            return self.q(h), h
        if mode == "norm_as_residual":  # the norm's output is also the kernel's residual operand
            h = self.norm(x)
            return h + self.q(h)
        if mode == "rstd_read":  # an intermediate (the 1 / rms) read elsewhere
            r, h = self._manual(x)
            return self.q(h) * r.to(x.dtype)
        if mode == "fp16_norm":  # computed in fp16 (no fp32 cast): other rounding points
            return self.q(self._manual(x, fp32=False)[1])
        if mode == "other_axis":  # the mean over another axis
            return self.q(self._manual(x, axis=-2)[1])
        if mode == "eps_after":  # eps added after the rsqrt
            return self.q(self._manual(x, eps_after=True)[1])
        if mode == "weight_2d":  # a weight of shape (1, K)
            return self.q(self._manual(x, weight=self.norm.weight.view(1, -1))[1])
        raise ValueError(mode)


def _norm_calls(mode, rows=1):
    bits = {"int2": 2, "int8": 8}.get(mode, 4)
    return _calls(_NormLinear(mode, bits=bits).eval(), torch.randn(1, 5 if mode == "rows5" else rows, 256), True,
                  norm_prologue=True)


@pytest.mark.parametrize("mode,fused", [("norm", True), ("residual", True), ("int8", True), ("three_linears", True),
                                        ("float_reader", False),
                                        ("returned", False), ("norm_as_residual", False), ("rstd_read", False),
                                        ("fp16_norm", False), ("other_axis", False), ("eps_after", False),
                                        ("weight_2d", False), ("rows5", False), ("int2", False)])
def test_prologue_only_where_the_pattern_holds(mode, fused):
    names = _norm_calls(mode)
    pro = [n for n in names if n.startswith("fxc_packed") and "_rms" in n]
    norms = [n for n in names if "rsqrt" in n]
    assert bool(pro) == fused, names
    assert bool(norms) != fused, names  # the norm kernel is gone exactly when the kernel took it
    if mode == "residual":
        assert pro == ["fxc_packed_mma_rms_res"], names  # the prologue beside the residual epilogue
    if mode == "three_linears":
        assert len(pro) == 3, names


@pytest.mark.parametrize("rows", [1, 2, 4])
def test_prologue_up_to_four_rows(rows):
    assert [n for n in _norm_calls("norm", rows) if n.endswith("_rms")], rows


def _hf_llama_int4():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    h = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, max_position_embeddings=256, tie_word_embeddings=False, rms_norm_eps=1e-6)).eval()
    from fxcompress.lm import with_quant_layers

    from lm.conftest import _Logits

    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(2))
    # group 64: the tensor-core kernel's K per load (group 32 layers run on the CUDA-core kernel, no prologue)
    q = fxc.quantize_rtn(fxc.capture(_Logits(h), (ids,)), fxc.RTNConfig(
        bits=4, granularity="per_group", group_size=64, symmetric=False, exclude=("*lm_head*",)))
    return with_quant_layers(h, q)


def test_hf_llama_decode_step_norms_become_prologues():
    """The Hugging Face LlamaRMSNorm (eps 1e-6) as torch.export and the importer emit it, in the cached decode step
    compile_lm builds (q/k/v and gate/up fused, fused decode attention): both norms of each layer are prologues."""
    from fxcompress.backends.tvm.importer import lower_to_relax
    from fxcompress.backends.tvm.transforms import fuse_passes
    from fxcompress.lm.attention import with_fused_decode_attention
    from fxcompress.lm.compiled import _fuse_linears
    from fxcompress.lm.steps import build_steps, example_inputs

    from tvm import relax

    m = _hf_llama_int4()
    _, dec, spec = build_steps(m, batch=1, max_seq_len=32, prefill_chunk=8, dtype=torch.float16)
    dec = _fuse_linears({"decode": dec}, spec)["decode"]
    dec, _ = with_fused_decode_attention(dec, spec.input_names[2:])
    mod, _ = lower_to_relax(dec, example_inputs(spec, 1), dtype=torch.float16, cuda=True, donate=spec.input_names[2:])
    with tvm.target.Target("cuda"):
        mod = tvm.transform.Sequential(fuse_passes(True, norm_prologue=True))(mod)
    names = [b.value.args[0].name_hint for blk in mod["main"].body.blocks for b in blk.bindings
             if isinstance(b.value, relax.Call) and isinstance(b.value.op, tvm.ir.Op)
             and b.value.op.name in ("relax.call_tir", "relax.call_tir_inplace")]
    assert len([n for n in names if n.startswith("fxc_packed") and "_rms" in n]) == 4, names
    assert len([n for n in names if "rsqrt" in n]) == 1, names
    protos = [f for gv, f in mod.functions.items() if gv.name_hint.startswith("fxc_packed") and "_rms" in gv.name_hint]
    # the model's eps (1e-6, an fp32 constant in the graph) in each kernel
    assert protos and all(json.loads(str(f.attrs["fxc_kernel_parts"]))["prologue"] == {
        "kind": "rms_norm", "eps": float(np.float32(1e-6))} for f in protos)


# ---- CUDA builds (nvcc, no GPU needed) ----

@pytest.mark.skipif(not NVCC, reason="needs nvcc to build CUDA code")
def test_cuda_build_drops_the_norm_kernels_and_two_launches_per_layer():
    dm, ids = _lm()
    b = build_tvm(dm, (ids,), target="cuda", dtype=torch.float16, config=PROLOGUE)
    kn = b.kernel_names()
    assert "fxc_packed_mma_rms_kernel" in kn and [k for k in kn if k.endswith("_rms_swiglu_kernel")], kn
    assert len([k for k in kn if "rsqrt" in k]) <= 1, kn  # the final norm only
    src = b.device_source()
    assert "__shfl_xor_sync" in src and "rsqrtf" in src
    groups = per_layer(launch_list(b), [layer["name"] for layer in b.info["layers"]])
    counts = [sum(k for *_, k in g) for lab, g in groups if lab.startswith("layer")]
    names = [[name for _, name, _ in g] for lab, g in groups if lab.startswith("layer")]
    assert not [n for n in names[1] if "rsqrt" in n], names[1]
    # the middle layer: 17 launches with the epilogues (tests/test_tvm_decode_epilogue.py) -> 15
    assert counts[1] <= 15, (counts, names[1])


@pytest.mark.skipif(not NVCC, reason="needs nvcc to build CUDA code")
@pytest.mark.parametrize("mode,rows", [("int8", 4), ("residual", 3)])
def test_cuda_build_prologue_int8_and_with_the_residual_epilogue(mode, rows):
    b = build_tvm(_NormLinear(mode, bits=8 if mode == "int8" else 4).eval(), (torch.randn(1, rows, 256),),
                  target="cuda", dtype=torch.float16, config=PROLOGUE)
    kn = b.kernel_names()
    assert [k for k in kn if "_rms" in k and k.startswith("fxc_packed_mma")] and not [k for k in kn if "rsqrt" in k], kn


# ---- GPU (the lead runs these on an H100) ----

@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2, 4])
@pytest.mark.parametrize("mode,bits,k", [("norm", 4, 256), ("residual", 4, 2048), ("norm", 8, 1280),
                                         ("swiglu", 4, 2048)])
def test_gpu_prologue_kernel_matches_unfused_and_torch(m, mode, bits, k):
    if mode == "swiglu":
        model = _NormGateUp(k).eval()
    else:
        model = _NormLinear(mode, bits=bits, k=k, n=k if mode == "residual" else 512).eval()
    x = torch.randn(1, m, k) * 3
    outs = {}
    for fuse in (False, True):
        r = compile_tvm(model, (x,), target="cuda", dtype=torch.float16, config=(PROLOGUE if fuse else UNFUSED))
        y = r(x.half().cuda())
        outs[fuse] = (y[0] if isinstance(y, (list, tuple)) else y).float().cpu()
    ref = model(x)
    scale = ref.abs().max().item()
    assert (outs[True] - outs[False]).abs().max().item() <= 2e-3 * scale, (outs[True] - outs[False]).abs().max()
    assert (outs[True] - ref).abs().max().item() <= 2e-2 * scale


class _NormGateUp(nn.Module):
    """post_attention_layernorm -> fused gate/up -> silu(gate) * up: the prologue beside the swiglu epilogue."""

    def __init__(self, k):
        super().__init__()
        torch.manual_seed(4)
        self.norm = RMSNorm(k, 1e-6)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)
        self.gu = QuantLinear.from_linear(nn.Linear(k, 1024, bias=False), QuantSpec(4, False, "per_group", 128))

    def forward(self, x):
        g, u = self.gu(self.norm(x)).split(512, dim=-1)
        return torch.nn.functional.silu(g) * u


@pytest.mark.gpu
def test_gpu_compile_lm_fp16_decode_with_prologues_matches_unfused_and_torch():
    """A Hugging Face LLaMA (int4 RTN) through compile_lm's TVM steps in fp16 on the GPU, built with the backend's
    defaults (norm prologues) and with ``fuse_epilogues=False``: the cached logits of a prompt (prefill + decode
    steps) equal the unfused build's within fp16 noise and the uncached torch model's within the fp16 tolerance;
    greedy tokens equal the unfused build's, and torch's wherever torch's top-2 margin exceeds that tolerance."""
    from fxcompress.lm.compiled import CompiledLM, _fuse_linears
    from fxcompress.lm.steps import build_steps
    from fxcompress.lm.tvm_steps import TVMSteps, build_steps_tvm

    from lm.conftest import greedy_reference, logits_of

    m = _hf_llama_int4()
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    pre, dec, spec = build_steps(m, batch=1, max_seq_len=64, prefill_chunk=8, dtype=torch.float16)
    graphs = _fuse_linears({"prefill": pre, "decode": dec}, spec)
    lms = {}
    for fuse in (True, False):
        ex = build_steps_tvm(graphs, spec, "cuda", torch.float16, config=(PROLOGUE if fuse else UNFUSED))
        lms[fuse] = CompiledLM(TVMSteps(ex, spec, "cuda"), spec, "tvm", "cuda")
    ref_ids = greedy_reference(m, ids, 24)
    ref = logits_of(m, ref_ids).float()
    got = {f: lm.step_logits(ref_ids).float() for f, lm in lms.items()}
    scale = ref.abs().max().item()
    assert (got[True] - got[False]).abs().max().item() <= 2e-3 * scale
    tol = 2e-2 * scale
    assert (got[True] - ref).abs().max().item() <= tol
    top2 = ref[0].topk(2, -1).values
    sure = (top2[:, 0] - top2[:, 1]) > 2 * tol  # positions whose argmax no error within tol can flip
    assert sure.sum() >= 8, sure  # (23 of 32 on the CPU reference)
    assert torch.equal(got[True][0].argmax(-1)[sure], ref[0].argmax(-1)[sure])
    gen = lms[True].generate(ids, max_new_tokens=24)
    assert torch.equal(gen, lms[False].generate(ids, max_new_tokens=24))
    p = ids.shape[1]
    agree = int(torch.cumprod(sure[p - 1:-1].long(), 0).sum())  # greedy steps before the first unsure one
    assert torch.equal(gen[:, p:p + agree], ref_ids[:, p:p + agree])
