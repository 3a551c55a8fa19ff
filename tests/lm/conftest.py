import pytest
import torch

import fxcompress as fxc
from fxcompress.models.smollm2 import tiny_causal_lm

VOCAB = 128


def qwen2(tie=True, attn="sdpa"):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=VOCAB, tie_word_embeddings=tie,
                                   max_position_embeddings=256, attn_implementation=attn)
    torch.manual_seed(0)
    return transformers.Qwen2ForCausalLM(cfg).eval()


def builtin():
    return tiny_causal_lm(seed=0, vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_heads=4,
                          num_kv_heads=2)


def rtn_int4(model):
    ids = torch.randint(0, VOCAB, (1, 8))
    gm = fxc.capture(model if not hasattr(model, "generation_config") else _Logits(model), (ids,))
    return fxc.quantize_rtn(gm, fxc.RTNConfig(bits=4, granularity="per_group", group_size=32, symmetric=False,
                                              exclude=("*lm_head*",)))


class _Logits(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, input_ids):
        return self.m(input_ids=input_ids, use_cache=False).logits


def logits_of(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


def greedy_reference(model, ids, n):
    """Greedy tokens of the plain model, no cache: the reference every backend must reproduce."""
    for _ in range(n):
        nxt = logits_of(model, ids)[:, -1:].argmax(-1)
        ids = torch.cat([ids, nxt], 1)
    return ids


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models: torch's intra-op threads only add contention (200x slower on a loaded 2-core runner)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
