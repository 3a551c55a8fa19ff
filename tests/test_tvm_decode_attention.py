"""The fused decode attention of the TVM backend (fxcompress/backends/tvm/kernels/decode_attention.py, lowered from
``fxc_lm::cached_attention`` by the importer): the kernel against torch's ``cached_attention`` on LLVM (outputs and
the caches it writes in place), a cached decode step with one attention kernel per layer against the torch step,
what is left unfused (prefill, caches not donated), CUDA builds (nvcc) and, on a GPU, kernel parity (gpu mark)."""
import shutil

import pytest
import torch

tvm = pytest.importorskip("tvm")

from fxcompress.backends.tvm import TVMBackendError, build_tvm  # noqa: E402
from fxcompress.backends.tvm.base import make_target  # noqa: E402
from fxcompress.backends.tvm.kernels.decode_attention import (AttentionShape, Source,  # noqa: E402
                                                              attention_splits, attention_supports, attention_warps,
                                                              decode_attention_combine_primfunc,
                                                              decode_attention_primfunc, heads_per_block)
from fxcompress.lm.attention import (FUSED_ATTENTION_OP, _rope, _unflatten, cached_attention,  # noqa: E402
                                     decode_attention, with_fused_decode_attention)
from fxcompress.lm.compiled import _fuse_linears  # noqa: E402
from fxcompress.lm.steps import build_steps, empty_caches, example_inputs  # noqa: E402
from fxcompress.models.smollm2 import tiny_causal_lm  # noqa: E402

NVCC = shutil.which("nvcc") is not None
VOCAB = 128
# (batch, heads, kv_heads, slots, head_dim): GQA rep 1 / 2 / 3 / 4, a head dim that is not a multiple of 32 lanes,
# an odd number of slots, more slots than one step of 16 warps x 4 slots
SHAPES = [(1, 4, 4, 16, 32), (2, 4, 2, 16, 16), (1, 6, 2, 17, 24), (1, 8, 2, 80, 64)]
DTYPES = {"float32": torch.float32, "float16": torch.float16}


def _shape(b, h, kvh, s, d, dt):
    return AttentionShape(b, h, kvh, s, d, dt, dt, dt, dt, dt)


def _inputs(b, h, kvh, s, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    return r(b, h, 1, d), r(b, kvh, 1, d), r(b, kvh, 1, d), r(b, kvh, s, d), r(b, kvh, s, d)


def _compile(shape, scale, target, splits=1, **kw):
    """The attention kernel as ``main``; split (``splits > 1``): the split kernel as ``main`` and the combine kernel
    as ``combine``, one module."""
    cuda = target == "cuda"
    funcs = {"main": decode_attention_primfunc(shape, scale, cuda=cuda, splits=splits, **kw)}
    if splits > 1:
        funcs["combine"] = decode_attention_combine_primfunc(shape, splits, cuda)
    mod = tvm.IRModule({n: f.with_attr("global_symbol", n) for n, f in funcs.items()})
    return tvm.compile(mod, target=make_target(target))


def _attend(mod, dev, shape, splits, ins, out):
    """``out`` = the attention of the kernel(s) on the TVM tensors ``ins`` (the caches written in place)."""
    if splits == 1:
        mod["main"](*ins, out)
        return
    b, h, d = shape.batch, shape.heads, shape.head_dim
    acc = tvm.runtime.tensor(torch.full((b, h, splits, d), float("nan")).numpy(), dev)  # every element written
    state = tvm.runtime.tensor(torch.full((b, h, splits, 2), float("nan")).numpy(), dev)
    mod["main"](*ins, acc, state)
    mod["combine"](acc, state, out)


def _run(mod, dev, q, k, v, kc, vc, pos, shape=None, splits=1):
    """(out, k_cache, v_cache) after one call; the caches are the input buffers, written in place."""
    tv = [tvm.runtime.tensor(x.numpy(), dev) for x in (q, k, v, kc, vc, torch.tensor([pos]))]
    out = tvm.runtime.tensor(torch.zeros_like(q).numpy(), dev)
    _attend(mod, dev, shape, splits, tv, out)
    return tuple(torch.from_numpy(t.numpy()) for t in (out, tv[3], tv[4]))


def _check(got, q, k, v, kc, vc, pos, scale):
    """Outputs against torch's cached_attention: in fp32 on the same (rounded) inputs within the output dtype's
    rounding, and in the inputs' own dtype within fp16 matmul rounding; the caches exactly."""
    out, kcn, vcn = got
    ref32 = cached_attention(q.float(), k.float(), v.float(), kc.float(), vc.float(), torch.tensor([pos]), scale)
    ref = cached_attention(q, k, v, kc, vc, torch.tensor([pos]), scale)
    tol = 1e-5 if q.dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out.float(), ref32[0], rtol=tol, atol=tol)
    torch.testing.assert_close(out.float(), ref[0].float(), rtol=10 * tol, atol=10 * tol)
    assert out.dtype == q.dtype
    assert torch.equal(kcn, ref[1]) and torch.equal(vcn, ref[2])
    assert torch.equal(kcn[:, :, pos], k[:, :, 0]) and not torch.equal(kcn, kc)


@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("dims", SHAPES, ids=lambda d: "x".join(map(str, d)))
def test_llvm_kernel_matches_torch_cached_attention(dims, dt):
    b, h, kvh, s, d = dims
    scale = d ** -0.5
    mod = _compile(_shape(b, h, kvh, s, d, dt), scale, "llvm")
    for pos in (0, s // 2, s - 1):
        x = _inputs(b, h, kvh, s, d, DTYPES[dt], seed=pos)
        _check(_run(mod, tvm.cpu(0), *x, pos), *x, pos, scale)


def test_llvm_kernel_casts_new_keys_to_the_cache_dtype():
    """fp32 q / k / v with fp16 caches: the cache holds fp16(k), attention reads it as fp32 of that."""
    shape = AttentionShape(1, 4, 2, 8, 16, "float32", "float32", "float32", "float16", "float16")
    mod = _compile(shape, 0.25, "llvm")
    q, k, v, kc, vc = _inputs(1, 4, 2, 8, 16, torch.float32)
    kc, vc = kc.half(), vc.half()
    out, kcn, vcn = _run(mod, tvm.cpu(0), q, k, v, kc, vc, 5)
    ref = cached_attention(q, k, v, kc, vc, torch.tensor([5]), 0.25)
    torch.testing.assert_close(out, ref[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(kcn, ref[1]) and torch.equal(vcn, ref[2])


def _check_rows_and_rope(target, dev, dt, rope_dt, rows, splits=1):
    """q / k / v read from the rows of one fused q/k/v output and rotated as they are read, against the torch
    reference of the same op (``decode_attention``: slices, views and ``x * cos + rotate_half(x) * sin`` with
    torch's dtypes, then ``cached_attention``); fp16 x with fp32 cos promotes the attention to fp32.  ``splits``:
    the split kernel + combine kernel."""
    b, h, kvh, s, d = 2, 6, 2, 12, 48
    width = 8 + (h + 2 * kvh) * d
    offs = [8, 8 + h * d, 8 + (h + kvh) * d]
    shape = AttentionShape(b, h, kvh, s, d, Source(dt, width, offs[0]), Source(dt, width, offs[1]),
                           Source(dt, width, offs[2]), dt, dt, "int64", rows, rope_dt)
    assert shape.q_dtype == ("float32" if "float32" in (dt, rope_dt) else dt)
    mod = _compile(shape, 0.3, target, splits)
    g = torch.Generator().manual_seed(rows)
    rows_t = torch.randn(b, width, generator=g).to(DTYPES[dt])
    cos, sin = (torch.randn(rows, d, generator=g).to(DTYPES[rope_dt]) for _ in range(2))
    kc, vc = (torch.randn(b, kvh, s, d, generator=g).to(DTYPES[dt]) for _ in range(2))
    for pos in (0, 5, s - 1):
        tv = [tvm.runtime.tensor(x.numpy(), dev)
              for x in (rows_t, rows_t, rows_t, kc, vc, torch.tensor([pos]), cos, sin)]
        out = tvm.runtime.tensor(torch.zeros(b, h, 1, d, dtype=DTYPES[shape.q_dtype]).numpy(), dev)
        _attend(mod, dev, shape, splits, tv, out)
        ref = decode_attention(rows_t, rows_t, rows_t, kc, vc, torch.tensor([pos]), cos, sin, 0.3, h, offs)
        got = torch.from_numpy(out.numpy())
        assert got.dtype == ref[0].dtype
        # fp32 attention over the rotated q / k as torch rounds them (the kernel's fp32 scores and softmax)
        qr = _rope(_unflatten(rows_t, offs[0], h, d), cos, sin)
        kr = _rope(_unflatten(rows_t, offs[1], kvh, d), cos, sin).to(kc.dtype)
        vr = _unflatten(rows_t, offs[2], kvh, d)
        ref32 = cached_attention(qr.float(), kr.float(), vr.float(), kc.float(), vc.float(), torch.tensor([pos]), 0.3)
        tol = 1e-5 if shape.q_dtype == "float32" else 2e-3
        torch.testing.assert_close(got.float(), ref32[0], rtol=tol, atol=tol)
        torch.testing.assert_close(got, ref[0], rtol=10 * tol, atol=10 * tol)
        for t, want in zip(tv[3:5], ref[1:]):
            # the rotated key as torch rounds it: exactly where every op rounds to fp16; an fp32 rotation may be
            # contracted into FMAs (nvcc), one fp32 rounding apart, which can move the fp16 cache value by an ulp
            got_c = torch.from_numpy(t.numpy())
            others = [j for j in range(s) if j != pos]
            assert torch.equal(got_c[:, :, others], want[:, :, others])  # only slot pos is written
            ctol = 1e-6 if dt == "float32" else 1e-3
            torch.testing.assert_close(got_c, want, rtol=ctol, atol=ctol)
            if dt == rope_dt == "float16":
                assert torch.equal(got_c, want)


ROPE_CASES = [("float32", "float32"), ("float16", "float16"), ("float16", "float32")]


@pytest.mark.parametrize("dt,rope_dt", ROPE_CASES)
@pytest.mark.parametrize("rows", [1, 2])
def test_llvm_kernel_reads_qkv_rows_and_applies_the_rotary_embedding(dt, rope_dt, rows):
    _check_rows_and_rope("llvm", tvm.cpu(0), dt, rope_dt, rows)


def test_kernel_rejects_what_it_does_not_handle():
    with pytest.raises(ValueError, match="heads"):
        AttentionShape(1, 3, 2, 8, 16, *["float32"] * 5)
    bad = AttentionShape(1, 2, 2, 8, 16, "int32", *["float32"] * 4)
    assert "q is int32" in attention_supports(bad)
    with pytest.raises(ValueError, match="q is int32"):
        decode_attention_primfunc(bad, 1.0, cuda=False)
    with pytest.raises(ValueError, match="do not fit"):
        AttentionShape(1, 2, 2, 8, 16, Source("float32", 40, 10), "float32", "float32", "float32", "float32")
    assert "even head_dim" in attention_supports(AttentionShape(1, 2, 2, 8, 15, *["float32"] * 5, rope_rows=1))
    huge = _shape(1, 64, 1, 8, 256, "float32")  # 64 query heads x 256 fp32 partial sums: over 48 KB
    assert "shared memory" in attention_supports(huge)
    assert attention_warps(_shape(1, 4, 4, 384, 128, "float16")) == 16
    assert attention_warps(_shape(1, 4, 4, 3, 128, "float16")) == 2  # no more warps than slots


def _steps(dtype=None, max_seq_len=32):
    """The tiny model's cached steps: 4 query heads, 2 KV heads, ``max_seq_len`` cache slots (32: the importer splits
    the decode attention in 2, :func:`attention_splits`; 24: one kernel)."""
    m = tiny_causal_lm(seed=0, vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2)
    return build_steps(m, batch=1, max_seq_len=max_seq_len, prefill_chunk=8, dtype=dtype)


def test_only_one_token_steps_with_donated_caches_get_the_fused_op():
    pre, dec, spec = _steps()
    caches = spec.input_names[2:]
    fused, n = with_fused_decode_attention(dec, caches)
    assert n == len(spec.cache) == 2
    assert sum(nd.target is FUSED_ATTENTION_OP for nd in fused.graph.nodes) == 2
    assert not any(nd.target is FUSED_ATTENTION_OP for nd in dec.graph.nodes), "the input graph was modified"
    assert with_fused_decode_attention(pre, caches)[1] == 0  # prefill: 8 tokens
    assert with_fused_decode_attention(dec, [])[1] == 0  # nothing donated
    assert with_fused_decode_attention(dec, [c for c in caches if c.startswith("k_")])[1] == 0  # v not donated
    _torch_same(dec, fused, spec)


def _fused_args(gm):
    return [n.args for n in gm.graph.nodes if n.target is FUSED_ATTENTION_OP]


def _torch_same(dec, fused, spec, pos=4):
    """The rewritten graph run in torch gives bitwise the original's outputs (the op's torch implementation repeats
    the absorbed ops)."""
    ids, _, *cs = example_inputs(spec, 1)
    cs = [torch.randn_like(c) for c in cs]
    with torch.no_grad():
        a = dec(ids, torch.tensor([pos]), *[c.clone() for c in cs])
        b = fused(ids, torch.tensor([pos]), *[c.clone() for c in cs])
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_reads_absorbed_from_separate_and_fused_qkv_linears():
    _, dec, spec = _steps()
    fused, _ = with_fused_decode_attention(dec, spec.input_names[2:])
    for args in _fused_args(fused):  # q, k, v linears: each output's rows at offset 0; the rotary embedding
        assert args[10] == [0, 0, 0] and args[6] is not None and args[9] == 4
    assert not [n for n in fused.graph.nodes if n.target in (torch.ops.aten.cat.default, torch.ops.aten.neg.default)]
    assert len([n for n in fused.graph.nodes if n.target == torch.ops.aten.transpose.int]) == 2  # the outputs'
    assert len([n for n in dec.graph.nodes if n.target == torch.ops.aten.transpose.int]) == 8  # (q, k, v, out) x 2
    _torch_same(dec, fused, spec)
    qkv = _fuse_linears({"decode": dec}, spec)["decode"]  # one q/k/v linear + split, as compile_lm builds it
    fused2, n = with_fused_decode_attention(qkv, spec.input_names[2:])
    assert n == 2 and all(args[10] == [0, 64, 96] and args[6] is not None for args in _fused_args(fused2))
    _torch_same(qkv, fused2, spec)


def test_rotary_with_different_tables_for_q_and_k_is_left_in_the_graph():
    _, dec, spec = _steps()
    g = dec.graph
    for n in list(g.nodes):  # give k's rotary products their own cos table (same values, another node)
        if n.target is cached_attention:
            kmul = [u for u in n.args[1].args if u.target == torch.ops.aten.mul.Tensor]
            for m in kmul:
                with g.inserting_before(m):
                    m.replace_input_with(m.args[1], g.call_function(torch.ops.aten.mul.Tensor, (m.args[1], 1.0)))
    dec.recompile()
    for n in g.nodes:
        if n.target == torch.ops.aten.mul.Tensor and n.args[1] == 1.0:
            n.meta["val"] = n.args[0].meta["val"]
    fused, n = with_fused_decode_attention(dec, spec.input_names[2:])
    assert n == 2
    for args in _fused_args(fused):  # q / k as computed by the graph (4-D), v still read from the linear's rows
        assert args[6] is None and args[10] == [-1, -1, 0]
    _torch_same(dec, fused, spec)
    b = build_tvm(fused, example_inputs(spec, 1), target="llvm", donate=spec.input_names[2:])
    from tvm import relax

    vm = relax.VirtualMachine(b.executable, tvm.cpu(0))
    ids, _, *cs = example_inputs(spec, 1)
    cs = [torch.randn_like(c) for c in cs]
    with torch.no_grad():
        ref = dec(ids, torch.tensor([6]), *[c.clone() for c in cs])
    res = list(vm["main"](*[tvm.runtime.tensor(x.numpy()) for x in (ids, torch.tensor([6]), *cs)]))
    torch.testing.assert_close(torch.from_dlpack(res[0]), ref[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("slots", [24, 32])
def test_decode_step_has_one_attention_kernel_per_layer_and_matches_torch(slots):
    """24 cache slots: one attention kernel per layer; 32: the attention split in 2 (a split kernel, which writes
    the caches in place, and a combine kernel per layer)."""
    from tvm import relax

    _, dec, spec = _steps(max_seq_len=slots)
    fused, _ = with_fused_decode_attention(dec, spec.input_names[2:])
    b = build_tvm(fused, example_inputs(spec, 1), target="llvm", donate=spec.input_names[2:])
    assert sorted(b.info["inplace_inputs"]) == sorted(spec.input_names[2:])
    names = b.primfunc_names()
    split = attention_splits(_shape(1, 4, 2, slots, 16, "float32")) > 1
    assert split == (slots == 32)
    attention = ["fxc_decode_attention_combine", "fxc_decode_attention_split"] if split else ["fxc_decode_attention"]
    assert [n for n in names if "attention" in n] == attention, names
    assert not [n for n in names if "scatter" in n or "softmax" in n or n.startswith("fxc_kv_write")], names
    main = b.scheduled["main"].script()
    assert main.count("R.call_tir_inplace(") == len(spec.cache) == 2, main  # one per layer, writing both caches
    for name in attention:
        assert main.count(f"({name}, (") == len(spec.cache), main  # each attention kernel: once per layer
    vm = relax.VirtualMachine(b.executable, tvm.cpu(0))
    g = torch.Generator().manual_seed(1)
    caches = [torch.randn(c.shape, generator=g) for c in empty_caches(spec)]
    ids = torch.tensor([[7]])
    for pos in (0, 1, 13, slots - 1):
        with torch.no_grad():
            ref = dec(ids, torch.tensor([pos]), *[c.clone() for c in caches])
        tv = [tvm.runtime.tensor(x.numpy()) for x in (ids, torch.tensor([pos]), *caches)]
        res = list(vm["main"](*tv))
        torch.testing.assert_close(torch.from_dlpack(res[0]), ref[0], rtol=1e-4, atol=1e-4)
        for out, inp, want in zip(res[1:], tv[2:], ref[1:]):
            assert torch.from_dlpack(out).data_ptr() == torch.from_dlpack(inp).data_ptr(), "cache copied"
            torch.testing.assert_close(torch.from_dlpack(inp), want, rtol=1e-5, atol=1e-5)


def test_fused_graph_without_donated_caches_is_a_clear_error():
    _, dec, spec = _steps()
    fused, _ = with_fused_decode_attention(dec, spec.input_names[2:])
    with pytest.raises(TVMBackendError, match="k_cache_0.*in place.*donated"):
        build_tvm(fused, example_inputs(spec, 1), target="llvm")
    g = fused.graph  # another reader of a donated cache: it would see the in-place write
    kc = next(n for n in g.nodes if n.op == "placeholder" and n.target == "k_cache_0")
    out = next(n for n in g.nodes if n.op == "output")
    with g.inserting_before(out):
        extra = g.call_function(torch.ops.aten.mul.Tensor, (kc, 2.0))
    out.args = ((*out.args[0], extra),)
    fused.recompile()
    with pytest.raises(TVMBackendError, match="k_cache_0.*read by 2 nodes"):
        build_tvm(fused, example_inputs(spec, 1), target="llvm", donate=spec.input_names[2:])


def test_prefill_step_keeps_the_decomposed_attention_and_matches_torch():
    from tvm import relax

    pre, _, spec = _steps()
    g, n = with_fused_decode_attention(pre, spec.input_names[2:])
    assert n == 0
    b = build_tvm(g, example_inputs(spec, spec.prefill_chunk), target="llvm", donate=spec.input_names[2:])
    assert "fxc_decode_attention" not in b.primfunc_names() and b.info["inplace_inputs"] == []
    vm = relax.VirtualMachine(b.executable, tvm.cpu(0))
    ids = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(2))
    caches = empty_caches(spec)
    with torch.no_grad():
        ref = pre(ids, torch.arange(8), *[c.clone() for c in caches])
    tv = [tvm.runtime.tensor(x.numpy()) for x in (ids, torch.arange(8), *caches)]
    res = list(vm["main"](*tv))
    torch.testing.assert_close(torch.from_dlpack(res[0]), ref[0], rtol=1e-4, atol=1e-4)
    for inp, want in zip(tv[2:], ref[1:]):
        torch.testing.assert_close(torch.from_dlpack(inp), want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not NVCC, reason="needs nvcc to build CUDA code")
@pytest.mark.parametrize("dims,dt", [((1, 16, 16, 384, 128), "float16"), ((1, 6, 2, 17, 24), "float32")])
def test_cuda_kernel_builds_with_warp_shuffles(dims, dt):
    mod = _compile(_shape(*dims, dt), 0.125, "cuda")
    src = "\n".join(m.inspect_source() for m in mod.mod.imports if m.kind == "cuda")
    assert "__shfl_sync" in src and "__shared__" in src, src[:2000]


@pytest.mark.skipif(not NVCC, reason="needs nvcc to build CUDA code")
def test_cuda_kernel_grid_per_query_head_or_per_kv_head():
    """Few (batch, KV head) pairs: a block per query head (the rep heads of a KV head in rep blocks, one of which
    writes the cache slot); many: a block per KV head; a forced split that does not divide rep is an error."""
    shape = _shape(1, 8, 2, 80, 64, "float16")
    assert heads_per_block(shape) == 1 and heads_per_block(_shape(4, 64, 16, 80, 64, "float16")) == 4
    for hb in (1, 2, 4):
        src = "\n".join(m.inspect_source() for m in _compile(shape, 0.125, "cuda", heads_per_block_=hb).mod.imports
                        if m.kind == "cuda")
        assert "__shfl_sync" in src
    with pytest.raises(ValueError, match="heads_per_block must divide 4"):
        decode_attention_primfunc(shape, 0.125, cuda=True, heads_per_block_=3)


@pytest.mark.skipif(not NVCC, reason="needs nvcc to build CUDA code")
def test_cuda_decode_step_launches_one_attention_kernel_per_layer():
    """A cache too short to split (24 slots): one attention kernel per layer
    (tests/test_tvm_decode_attention_split.py: the split)."""
    _, dec, spec = _steps(torch.float16, max_seq_len=24)
    fused, _ = with_fused_decode_attention(dec, spec.input_names[2:])
    b = build_tvm(fused, example_inputs(spec, 1), target="cuda", dtype=torch.float16, donate=spec.input_names[2:])
    kernels = b.kernel_names()
    assert "fxc_decode_attention_kernel" in kernels, kernels
    assert not [k for k in kernels if "softmax" in k or k.startswith(("fxc_kv_write", "scatter"))], kernels
    main = b.scheduled["main"].script()
    assert main.count("fxc_decode_attention") == len(spec.cache), main


@pytest.mark.gpu
@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("dims", SHAPES + [(1, 16, 16, 384, 128), (2, 9, 3, 2048, 64)],
                         ids=lambda d: "x".join(map(str, d)))
def test_gpu_kernel_matches_torch_cached_attention(dims, dt):
    b, h, kvh, s, d = dims
    scale = d ** -0.5
    mod = _compile(_shape(b, h, kvh, s, d, dt), scale, "cuda")
    for pos in (0, 1, s // 2, s - 1):
        x = _inputs(b, h, kvh, s, d, DTYPES[dt], seed=pos)
        _check(_run(mod, tvm.cuda(0), *x, pos), *x, pos, scale)


@pytest.mark.gpu
@pytest.mark.parametrize("hb", [1, 2, 4])
def test_gpu_kernel_blocks_per_query_head_group(hb):
    b, h, kvh, s, d = 2, 8, 2, 80, 64
    mod = _compile(_shape(b, h, kvh, s, d, "float16"), 0.125, "cuda", heads_per_block_=hb)
    for pos in (0, 41, s - 1):
        x = _inputs(b, h, kvh, s, d, torch.float16, seed=pos)
        _check(_run(mod, tvm.cuda(0), *x, pos), *x, pos, 0.125)


@pytest.mark.gpu
@pytest.mark.parametrize("dt,rope_dt", ROPE_CASES)
@pytest.mark.parametrize("rows", [1, 2])
def test_gpu_kernel_reads_qkv_rows_and_applies_the_rotary_embedding(dt, rope_dt, rows):
    _check_rows_and_rope("cuda", tvm.cuda(0), dt, rope_dt, rows)
