"""compile_lm on TVM with the fused decode attention (fxcompress.lm.attention.with_fused_decode_attention): a batch of
two prompts on a grouped-query Hugging Face model (per-batch-row rotary tables, read by the kernel) generates the
uncached model's greedy tokens (the decode step calls the fused kernel, the prefill step does not)."""
import warnings

import pytest
import torch

pytest.importorskip("tvm")

from fxcompress.lm import compile_lm  # noqa: E402

from .conftest import VOCAB, greedy_reference, qwen2  # noqa: E402


def test_tvm_batch_of_two_gqa_prompts_generates_the_uncached_greedy_tokens():
    m = qwen2()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="TVM decode step")  # every attention fused: no warning
        lm = compile_lm(m, "tvm", max_seq_len=48, prefill_chunk=8, batch_size=2)
    decode, prefill = (lm.steps.executables[k].as_text() for k in ("decode", "prefill"))
    assert "fxc_decode_attention" in decode and "fxc_decode_attention" not in prefill
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(4))
    assert torch.equal(lm.generate(ids, max_new_tokens=16), greedy_reference(m, ids, 16))
