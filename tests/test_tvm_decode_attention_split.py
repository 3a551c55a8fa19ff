"""The decode attention split over the cache slots (flash-decoding; fxcompress/backends/tvm/kernels/decode_attention.py:
the split kernel, which also writes the caches in place, and the combine kernel): the default split count, the LLVM
kernels against torch's ``cached_attention`` (positions 0, 1, at split boundaries and the last slot; grouped-query
and not; q / k / v read from rows with the rotary embedding; fp16 / fp32), the empty splits' state, bad split
counts, CUDA builds (nvcc: two kernels, a block per (head, split)), a CUDA decode step with one more launch per
layer, and on a GPU the same parity (gpu mark), including the 2048-wide model's shape and SmolLM2-135M's."""
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

tvm = pytest.importorskip("tvm")

from fxcompress.backends.tvm import build_tvm  # noqa: E402
from fxcompress.backends.tvm.kernels.decode_attention import (NEG, AttentionShape, attention_splits,  # noqa: E402
                                                              decode_attention_combine_primfunc,
                                                              decode_attention_primfunc)
from fxcompress.lm.attention import cached_attention, with_fused_decode_attention  # noqa: E402
from fxcompress.lm.steps import empty_caches, example_inputs  # noqa: E402
from test_tvm_decode_attention import (DTYPES, ROPE_CASES, SHAPES, _check, _check_rows_and_rope,  # noqa: E402
                                       _compile, _inputs, _run, _shape, _steps)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from profile_decode_gpu import launch_list  # noqa: E402

NVCC = shutil.which("nvcc") is not None
WIDE = (1, 16, 16, 384, 128)  # the 2048-wide model of tools/bench_generate.py: 16 heads x 128, 384 slots
SMOL = (1, 9, 3, 384, 64)  # SmolLM2-135M: 9 query heads, 3 KV heads x 64
# (batch, heads, kv_heads, slots, head_dim), splits: not grouped; GQA with an odd number of slots and a head dim
# that is not a multiple of 32 lanes; GQA rep 4 at batch 1; more splits than slots (the last 4 always empty)
CASES = [((1, 4, 4, 40, 32), 3), ((2, 6, 2, 37, 24), 4), ((1, 8, 2, 80, 64), 8), ((1, 4, 2, 12, 16), 16)]
KERNEL = re.compile(r"__global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(")


def _positions(s, p):
    """0, 1, the split boundaries (the last split's first slot, split 0's second), the middle and the last slot."""
    return sorted({x for x in (0, 1, p - 1, p, p + 1, s // 2, s - 1) if 0 <= x < s})


def test_default_split_count_fills_the_gpu_when_blocks_are_few():
    assert attention_splits(_shape(*WIDE, "float16")) == 8  # 16 blocks x 8 splits = 128 blocks of 132 SMs
    assert attention_splits(_shape(*SMOL, "float16")) == 14  # 9 x 14 = 126
    assert attention_splits(_shape(1, 9, 3, 2048, 64, "float16")) == 14
    assert attention_splits(_shape(4, 64, 16, 384, 64, "float16")) == 2  # 64 blocks of 4 query heads
    assert attention_splits(_shape(8, 16, 16, 384, 128, "float16")) == 1  # 128 blocks: the single kernel
    assert attention_splits(_shape(1, 4, 4, 31, 32, "float32")) == 1  # under 2 x 16 slots: no split
    assert attention_splits(_shape(*WIDE, "float16"), sms=108) == 6  # an A100
    assert attention_splits(_shape(*WIDE, "float16"), min_slots=128) == 3
    for kw, name in (({"sms": 0}, "sms"), ({"min_slots": True}, "min_slots"), ({"sms": 13.2}, "sms")):
        with pytest.raises(ValueError, match=f"{name} must be an int >= 1"):
            attention_splits(_shape(*WIDE, "float16"), **kw)


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "4", None])
def test_bad_split_count_is_a_clear_error(bad):
    shape = _shape(1, 4, 2, 16, 32, "float32")
    for cuda in (False, True):
        with pytest.raises(ValueError, match=r"splits must be an int >= 1 .*got " + re.escape(repr(bad))):
            decode_attention_primfunc(shape, 0.2, cuda, splits=bad)
        with pytest.raises(ValueError, match="splits must be an int >= 1"):
            decode_attention_combine_primfunc(shape, bad, cuda)


@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("dims,splits", CASES, ids=lambda c: "x".join(map(str, c)) if isinstance(c, tuple) else c)
def test_llvm_split_kernels_match_torch_cached_attention(dims, splits, dt):
    """Split + combine against torch (fp32 on the same inputs within the output dtype's rounding; the caches
    exactly), and against the single kernel in fp32 (the same math, the partial sums combined in another order)."""
    b, h, kvh, s, d = dims
    scale = d ** -0.5
    shape = _shape(b, h, kvh, s, d, dt)
    mod = _compile(shape, scale, "llvm", splits)
    one = _compile(shape, scale, "llvm") if dt == "float32" else None
    for pos in _positions(s, splits):
        x = _inputs(b, h, kvh, s, d, DTYPES[dt], seed=pos)
        got = _run(mod, tvm.cpu(0), *x, pos, shape, splits)
        _check(got, *x, pos, scale)
        if one is not None:
            torch.testing.assert_close(got[0], _run(one, tvm.cpu(0), *x, pos)[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dt,rope_dt", ROPE_CASES)
@pytest.mark.parametrize("rows", [1, 2])
def test_llvm_split_kernels_read_qkv_rows_and_apply_the_rotary_embedding(dt, rope_dt, rows):
    _check_rows_and_rope("llvm", tvm.cpu(0), dt, rope_dt, rows, splits=3)


def test_llvm_split_kernels_cast_new_keys_to_the_cache_dtype():
    shape = AttentionShape(1, 4, 2, 24, 16, "float32", "float32", "float32", "float16", "float16")
    mod = _compile(shape, 0.25, "llvm", 4)
    q, k, v, kc, vc = _inputs(1, 4, 2, 24, 16, torch.float32)
    kc, vc = kc.half(), vc.half()
    out, kcn, vcn = _run(mod, tvm.cpu(0), q, k, v, kc, vc, 9, shape, 4)
    ref = cached_attention(q, k, v, kc, vc, torch.tensor([9]), 0.25)
    torch.testing.assert_close(out, ref[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(kcn, ref[1]) and torch.equal(vcn, ref[2])


def test_split_kernel_state_of_empty_splits_is_ignored_by_the_combine():
    """At pos 0 only split 0 holds a slot (the new one): its state is (m = its score, l = 1, acc = v); the other
    splits leave m = -1e30, l = 0, acc = 0, and the combine's output is v itself."""
    b, h, kvh, s, d, p = 1, 2, 2, 16, 8, 4
    shape = _shape(b, h, kvh, s, d, "float32")
    f = decode_attention_primfunc(shape, 0.5, False, splits=p)
    mod = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target="llvm")
    q, k, v, kc, vc = _inputs(b, h, kvh, s, d, torch.float32)
    tv = [tvm.runtime.tensor(x.numpy()) for x in (q, k, v, kc, vc, torch.tensor([0]))]
    acc, state = (tvm.runtime.tensor(torch.full(sh, float("nan")).numpy()) for sh in ((b, h, p, d), (b, h, p, 2)))
    mod["main"](*tv, acc, state)
    acc, state = torch.from_numpy(acc.numpy()), torch.from_numpy(state.numpy())
    torch.testing.assert_close(state[:, :, 0, 0], (q[:, :, 0] * k[:, :, 0]).sum(-1) * 0.5)
    assert torch.equal(state[:, :, 0, 1], torch.ones(b, h))
    torch.testing.assert_close(acc[:, :, 0], v[:, :, 0])
    assert torch.equal(state[:, :, 1:, 0], torch.full((b, h, p - 1), NEG)) and not state[:, :, 1:, 1].any()
    assert not acc[:, :, 1:].any()
    out = _run(_compile(shape, 0.5, "llvm", p), tvm.cpu(0), q, k, v, kc, vc, 0, shape, p)[0]
    torch.testing.assert_close(out, v, rtol=1e-6, atol=1e-6)


def _cuda_kernels(shape, splits):
    """(CUDA kernel names, the split kernel's TVMScript) of the two kernels built as the importer names them."""
    f = decode_attention_primfunc(shape, 0.125, True, splits=splits)
    c = decode_attention_combine_primfunc(shape, splits, True)
    mod = tvm.compile(tvm.IRModule({"fxc_decode_attention_split": f, "fxc_decode_attention_combine": c}),
                      target="cuda")
    src = "\n".join(m.inspect_source() for m in mod.mod.imports if m.kind == "cuda")
    assert "__shfl_sync" in src and "__shared__" in src, src[:2000]
    return sorted(set(KERNEL.findall(src))), f.script()


@pytest.mark.skipif(not NVCC, reason="needs nvcc to build CUDA code")
@pytest.mark.parametrize("dims,blocks", [(WIDE, 16 * 8), (SMOL, 9 * 14)], ids=["wide", "smollm2"])
def test_cuda_split_build_has_two_kernels_and_a_block_per_head_and_split(dims, blocks):
    shape = _shape(*dims, "float16")
    names, script = _cuda_kernels(shape, attention_splits(shape))
    assert names == ["fxc_decode_attention_combine_kernel", "fxc_decode_attention_split_kernel"], names
    assert f'T.thread_binding({blocks}, thread="blockIdx.x")' in script


@pytest.mark.skipif(not NVCC, reason="needs nvcc to build CUDA code")
def test_cuda_decode_step_launches_a_split_and_a_combine_kernel_per_layer():
    """32 cache slots: the attention split in 2, one launch more per layer than with 24 slots (one kernel)."""
    counts = {}
    for slots in (24, 32):
        _, dec, spec = _steps(torch.float16, max_seq_len=slots)
        fused, _ = with_fused_decode_attention(dec, spec.input_names[2:])
        b = build_tvm(fused, example_inputs(spec, 1), target="cuda", dtype=torch.float16, donate=spec.input_names[2:])
        launches = launch_list(b)
        counts[slots] = sum(k for _, k in launches)
        attention = [n for n, _ in launches if "attention" in n]
        if slots == 32:
            assert attention == ["fxc_decode_attention_split", "fxc_decode_attention_combine"] * len(spec.cache)
            assert {"fxc_decode_attention_split_kernel", "fxc_decode_attention_combine_kernel"} <= set(b.kernel_names())
        else:
            assert attention == ["fxc_decode_attention"] * len(spec.cache)
    assert counts[32] == counts[24] + len(spec.cache), counts


GPU_CASES = [(dims, 3) for dims in SHAPES] + [(c, p) for c, p in CASES] + [
    (WIDE, None), (SMOL, None), ((1, 9, 3, 2048, 64), None), ((2, 9, 3, 384, 64), None)]


@pytest.mark.gpu
@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("dims,splits", GPU_CASES,
                         ids=lambda c: "x".join(map(str, c)) if isinstance(c, tuple) else str(c))
def test_gpu_split_kernels_match_torch_cached_attention(dims, splits, dt):
    """``splits`` None: the importer's default (:func:`attention_splits`, > 1 for these shapes)."""
    b, h, kvh, s, d = dims
    scale = d ** -0.5
    shape = _shape(b, h, kvh, s, d, dt)
    splits = attention_splits(shape) if splits is None else splits
    assert splits > 1
    mod = _compile(shape, scale, "cuda", splits)
    for pos in _positions(s, splits) + ([150] if s > 150 else []):
        x = _inputs(b, h, kvh, s, d, DTYPES[dt], seed=pos)
        _check(_run(mod, tvm.cuda(0), *x, pos, shape, splits), *x, pos, scale)


@pytest.mark.gpu
@pytest.mark.parametrize("hb", [1, 2, 4])
def test_gpu_split_kernels_blocks_per_query_head_group(hb):
    b, h, kvh, s, d = 2, 8, 2, 80, 64
    shape = _shape(b, h, kvh, s, d, "float16")
    mod = _compile(shape, 0.125, "cuda", 5, heads_per_block_=hb)
    for pos in (0, 4, 5, 41, s - 1):
        x = _inputs(b, h, kvh, s, d, torch.float16, seed=pos)
        _check(_run(mod, tvm.cuda(0), *x, pos, shape, 5), *x, pos, 0.125)


@pytest.mark.gpu
@pytest.mark.parametrize("dt,rope_dt", ROPE_CASES)
@pytest.mark.parametrize("rows", [1, 2])
def test_gpu_split_kernels_read_qkv_rows_and_apply_the_rotary_embedding(dt, rope_dt, rows):
    _check_rows_and_rope("cuda", tvm.cuda(0), dt, rope_dt, rows, splits=3)


@pytest.mark.gpu
def test_gpu_decode_step_with_split_attention_matches_torch():
    """The tiny model's fp32 decode step on the GPU (attention split in 2, caches written in place) against torch."""
    from tvm import relax

    _, dec, spec = _steps(max_seq_len=32)
    fused, _ = with_fused_decode_attention(dec, spec.input_names[2:])
    b = build_tvm(fused, example_inputs(spec, 1), target="cuda", donate=spec.input_names[2:])
    assert "fxc_decode_attention_combine" in b.primfunc_names()
    dev = tvm.cuda(0)
    vm = relax.VirtualMachine(b.executable, dev)
    g = torch.Generator().manual_seed(1)
    caches = [torch.randn(c.shape, generator=g) for c in empty_caches(spec)]
    ids = torch.tensor([[7]])
    for pos in (0, 1, 2, 13, 31):
        with torch.no_grad():
            ref = dec(ids, torch.tensor([pos]), *[c.clone() for c in caches])
        tv = [tvm.runtime.tensor(x.numpy(), dev) for x in (ids, torch.tensor([pos]), *caches)]
        res = list(vm["main"](*tv))
        torch.testing.assert_close(torch.from_numpy(res[0].numpy()), ref[0], rtol=1e-4, atol=1e-4)
        for inp, want in zip(tv[2:], ref[1:]):
            torch.testing.assert_close(torch.from_numpy(inp.numpy()), want, rtol=1e-5, atol=1e-5)


def test_bench_dry_run_times_single_and_split_kernels(tmp_path):
    """tools/bench_decode_attention.py on the CPU (llvm, a tiny shape): a row per (splits, pos), each output
    equal to torch's fp32 attention within fp16 rounding, the default split count marked."""
    import bench_decode_attention

    out = tmp_path / "attn.md"
    assert bench_decode_attention.main(["--dry-run", "--reps", "1", "--calls", "2", "--out", str(out)]) == 0
    rows = [r.split(" | ") for r in out.read_text().splitlines() if r.startswith("| tiny")]
    assert [(r[1], r[3]) for r in rows] == [("1", "5"), ("1", "47"), ("3", "5"), ("3", "47")]
    assert [r[2] for r in rows] == ["", "", "**yes**", "**yes**"]
    assert all(float(r[6].rstrip(" |")) < 2e-3 for r in rows)
