"""Hugging Face causal LMs (random-init tiny configs) through capture, RTN and L4Q."""
import pytest
import torch

import fxcompress as fxc
from fxcompress.nn import L4QLinear, QuantLinear

transformers = pytest.importorskip("transformers")

VOCAB = 128


def _tiny(name):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    cfg = getattr(transformers, f"{name}Config")(**common)
    torch.manual_seed(0)
    return getattr(transformers, f"{name}ForCausalLM")(cfg).eval()


def _logits(out):
    return out.logits if hasattr(out, "logits") else out[0] if isinstance(out, (tuple, list)) else out["logits"]


@pytest.mark.parametrize("name", ["Llama", "Qwen2", "Mistral"])
def test_hf_causal_lm_capture_rtn_l4q(name):
    model = _tiny(name)
    ids = torch.randint(0, VOCAB, (2, 16))
    assert model.config.use_cache
    with pytest.warns(UserWarning, match="use_cache=False"):
        gm = fxc.capture(model, (ids,))
    assert model.config.use_cache  # the user's model is untouched
    rtn = fxc.quantize_rtn(gm, fxc.RTNConfig(bits=8, exclude=("lm_head",)))
    assert sum(isinstance(m, QuantLinear) for m in rtn.modules()) == 14
    assert torch.allclose(_logits(rtn(ids)), _logits(model(ids)), atol=0.05)

    cfg = fxc.L4QConfig(bits=4, group_size=32, lora_rank=4)
    qm = fxc.prepare_l4q(gm, config=cfg)
    assert sum(isinstance(m, L4QLinear) for m in qm.modules()) == 14
    opt = torch.optim.AdamW(fxc.l4q_param_groups(qm, lora_lr=1e-2, quant_lr=1e-3))
    losses = []
    for _ in range(8):  # a plain next-token cross-entropy loop
        logits = _logits(qm(ids))
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    with torch.no_grad():
        fake = _logits(qm(ids))
    dm = fxc.convert_l4q(qm)
    assert torch.allclose(_logits(dm(ids)), fake, atol=1e-4)


def test_gpt2_conv1d_and_tied_lm_head():
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, VOCAB, (1, 16))
    with pytest.warns(UserWarning, match="use_cache=False"):
        gm = fxc.capture(model, (ids,))
    rtn = fxc.rtn_pass(gm, fxc.RTNConfig(bits=8))
    layers = {r.layer for r in rtn.report.rows("quantized")}
    assert "lm_head" in layers and "transformer.h.0.attn.c_attn" in layers and len(layers) == 9
    assert torch.allclose(_logits(rtn.gm(ids)), _logits(model(ids)), atol=0.05)
    qm = fxc.prepare_l4q(gm, config=fxc.L4QConfig(bits=4, group_size=32, lora_rank=4))
    prepared = {r.layer for r in fxc.report(qm).rows("prepared")}
    assert len(prepared) == 8 and "lm_head" not in prepared  # excluded by default; the embedding stays float
    assert torch.allclose(_logits(fxc.convert_l4q(qm)(ids)), _logits(qm(ids)), atol=1e-4)
