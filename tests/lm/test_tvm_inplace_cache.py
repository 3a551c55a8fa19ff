"""Donated KV caches in the TVM build: the cache write happens in the input's buffer, numerics unchanged."""
import shutil

import pytest
import torch

pytest.importorskip("tvm")

from fxcompress.backends.tvm import TVMBackendError, build_tvm  # noqa: E402
from fxcompress.backends.tvm.inplace_cache import scatter_update_primfunc  # noqa: E402
from fxcompress.lm import compile_lm  # noqa: E402
from fxcompress.lm.steps import build_steps, empty_caches, example_inputs  # noqa: E402

from .conftest import VOCAB, builtin  # noqa: E402


def _decode_graph():
    _, dec, spec = build_steps(builtin(), batch=1, max_seq_len=32, prefill_chunk=8)
    return dec, spec


def _tvm_inputs(spec, pos, seed=0):
    import tvm

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (1, 1), generator=g)
    caches = [torch.randn(c.shape, generator=g) for c in empty_caches(spec)]
    dev = tvm.cpu(0)
    tv = [tvm.runtime.tensor(t.numpy(), dev) for t in [ids, torch.tensor([pos]), *caches]]
    return ids, caches, tv


def test_donated_caches_are_written_in_place_and_match_torch():
    from tvm import relax

    dec, spec = _decode_graph()
    ex = build_tvm(dec, example_inputs(spec, 1), target="llvm", donate=spec.input_names[2:]).executable
    vm = relax.VirtualMachine(ex, __import__("tvm").cpu(0))
    ids, caches, tv = _tvm_inputs(spec, pos=5)
    with torch.no_grad():
        ref = dec(ids, torch.tensor([5]), *[c.clone() for c in caches])
    res = vm["main"](*tv)
    for i, (out, inp) in enumerate(zip(list(res)[1:], tv[2:])):
        o, x = torch.from_dlpack(out), torch.from_dlpack(inp)
        assert o.data_ptr() == x.data_ptr(), f"cache {i} was copied, not updated in place"
        torch.testing.assert_close(x, ref[1 + i], rtol=1e-5, atol=1e-5)
        assert not torch.equal(x, caches[i]), "the step wrote nothing into the donated cache"
    torch.testing.assert_close(torch.from_dlpack(res[0]), ref[0], rtol=1e-4, atol=1e-4)


def test_without_donation_the_inputs_are_not_modified():
    from tvm import relax

    dec, spec = _decode_graph()
    ex = build_tvm(dec, example_inputs(spec, 1), target="llvm").executable
    vm = relax.VirtualMachine(ex, __import__("tvm").cpu(0))
    _, caches, tv = _tvm_inputs(spec, pos=3)
    vm["main"](*tv)
    for c, t in zip(caches, tv[2:]):
        assert torch.equal(torch.from_dlpack(t), c)


@pytest.mark.parametrize("index", [[5, 6, 7], [-3, 0, 15]])
def test_scatter_update_kernel_matches_torch_scatter(index):
    import tvm

    data = torch.randn(2, 3, 16, 4)
    idx = torch.tensor(index).reshape(1, 1, 3, 1).expand(2, 3, 3, 4).contiguous()
    upd = torch.randn(2, 3, 3, 4)
    f = scatter_update_primfunc(data.shape, idx.shape, "float32", "int64", 2, cuda=False)
    m = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target="llvm")
    d = tvm.runtime.tensor(data.numpy())
    m["main"](d, tvm.runtime.tensor(idx.numpy()), tvm.runtime.tensor(upd.numpy()))
    ref = data.scatter(2, idx % 16, upd)
    torch.testing.assert_close(torch.from_numpy(d.numpy()), ref)


def test_donating_an_input_that_is_not_a_cache_write_raises():
    dec, spec = _decode_graph()
    with pytest.raises(TVMBackendError, match="input_ids.*not written by a scatter"):
        build_tvm(dec, example_inputs(spec, 1), target="llvm", donate=["input_ids"])
    with pytest.raises(TVMBackendError, match="not inputs of the function"):
        build_tvm(dec, example_inputs(spec, 1), target="llvm", donate=["no_such_input"])


def test_tvm_decode_leaves_logits_where_the_step_ran_and_equals_step():
    lm = compile_lm(builtin(), "tvm", device="cpu", max_seq_len=32, prefill_chunk=8)
    ids = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(2))
    st = lm.steps
    st.reset()
    st.step("prefill", ids, torch.arange(8))
    saved = [torch.from_dlpack(c).clone() for c in st.caches]
    a = st.decode(torch.tensor([3]), 8)
    for c, s in zip(st.caches, saved):  # rewind the position-8 write and take the other path
        torch.from_dlpack(c).copy_(s)
    b = st.step("decode", torch.tensor([[3]]), torch.tensor([8]))[:, -1]
    torch.testing.assert_close(a.float(), b)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc to build CUDA code")
def test_cuda_decode_build_writes_caches_with_one_kernel_each():
    import torch as _t

    from fxcompress.backends.tvm import TVMBuildConfig  # noqa: F401

    _, dec, spec = build_steps(builtin(), batch=1, max_seq_len=32, prefill_chunk=8, dtype=_t.float16)
    b = build_tvm(dec, example_inputs(spec, 1), target="cuda", dtype=_t.float16, donate=spec.input_names[2:])
    names = b.kernel_names()
    assert not [n for n in names if n.startswith("scatter_elements")], names
    assert [n for n in names if n.startswith("fxc_kv_write")], names
    main = b.scheduled["main"].script()
    assert main.count("R.call_tir_inplace(") == len(spec.input_names[2:]), main
