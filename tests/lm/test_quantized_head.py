"""An int8 lm_head (RTN per output channel, on top of int4 linears): the head is a large share of a small model's
bytes per token. The torch, TVM and ORT steps of the same quantized model generate the same greedy tokens, and the
head really is an 8-bit QuantLinear."""
import pytest
import torch

import fxcompress as fxc
from fxcompress.lm import compile_lm
from fxcompress.nn import QuantLinear

from .conftest import VOCAB, builtin, rtn_int4


def _int4_with_int8_head():
    q = rtn_int4(builtin())
    q = getattr(q, "gm", q)
    res = fxc.quantize_rtn(q, fxc.RTNConfig(bits=8, granularity="per_channel", symmetric=True,
                                            targets=("*lm_head*",)))
    return getattr(res, "gm", res)


@pytest.mark.parametrize("backend", ["tvm", "ort"])
def test_int8_head_generates_the_torch_steps_greedy_tokens(backend):
    if backend == "tvm":
        pytest.importorskip("tvm")
    q = _int4_with_int8_head()
    head = q.get_submodule("lm_head")
    assert isinstance(head, QuantLinear) and head.spec.bits == 8 and head.spec.granularity == "per_channel"
    ids = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(3))
    want = compile_lm(q, "torch", max_seq_len=32, prefill_chunk=8).generate(ids, max_new_tokens=12)
    got = compile_lm(q, backend, max_seq_len=32, prefill_chunk=8).generate(ids, max_new_tokens=12)
    assert torch.equal(got, want)
