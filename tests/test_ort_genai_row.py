"""tools/ort_genai_row.py (the onnxruntime-genai peer row of tools/bench_generate.py) on CPU: a small random-init
Hugging Face LlamaForCausalLM through onnxruntime-genai's model builder and its generation loop, against the HF
model's own greedy ``generate``. Runs where onnxruntime-genai (and the builder's onnx-ir) are importable; CI has
neither (the project does not depend on onnxruntime-genai), so there it is skipped with that reason."""
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (pip install onnxruntime-genai)")
pytest.importorskip("onnx_ir", reason="onnxruntime-genai's model builder needs onnx-ir")
transformers = pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import onnx  # noqa: E402
import ort_genai_row  # noqa: E402

P, NEW, GROUP = 12, 24, 64


def _tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg).eval()


def _snap_to_uint4_grid(model, group):
    """Round every decoder linear's weight to the asymmetric uint4 grid (per ``group`` inputs, ORT's min/max RTN:
    range widened to include 0) so that int4 quantization of the result loses (almost) nothing."""
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and "lm_head" not in name:
                w = m.weight.reshape(m.weight.shape[0], -1, group)
                lo, hi = w.amin(-1, keepdim=True).clamp(max=0), w.amax(-1, keepdim=True).clamp(min=0)
                scale = (hi - lo) / 15
                zp = torch.round(-lo / scale)
                m.weight.copy_(((torch.round(w / scale) + zp).clamp(0, 15) - zp).mul(scale).reshape_as(m.weight))
    return model


def _prompt():
    return torch.randint(0, 256, (1, P), generator=torch.Generator().manual_seed(0))


def _hf_greedy(model, prompt):
    return model.generate(prompt, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)


def test_fp32_build_matches_hf_greedy_exactly(tmp_path):
    hf, prompt = _tiny_llama(), _prompt()
    before = {k: v.clone() for k, v in hf.state_dict().items()}
    r = ort_genai_row.ort_genai_generate(hf, prompt, NEW, "cpu", tmp_path, precision="fp32")
    assert r.ids.shape == (1, P + NEW) and r.ids.dtype == torch.int64
    assert torch.equal(r.ids, _hf_greedy(hf, prompt))
    assert r.ttft_ms > 0 and r.decode_ms_per_token > 0
    assert all(torch.equal(v, hf.state_dict()[k]) for k, v in before.items())  # the model is not modified


def test_int4_build_runs_matmulnbits_and_matches_hf_greedy(tmp_path):
    # weights already on the uint4 grid and fp32 activations in MatMulNBits (accuracy level 1; the CPU default 4
    # quantizes activations to int8, which flips tokens of this flat-logit random model): int4 loses nothing, so
    # the tokens must equal HF's; this checks the block layout, the zero points and the builder's RTN grid
    hf, prompt = _snap_to_uint4_grid(_tiny_llama(), GROUP), _prompt()
    r = ort_genai_row.ort_genai_generate(hf, prompt, NEW, "cpu", tmp_path, block_size=GROUP, accuracy_level=1)
    assert r.ids.shape == (1, P + NEW)
    assert torch.equal(r.ids, _hf_greedy(hf, prompt))
    m = onnx.load(str(r.model_dir / "model.onnx"), load_external_data=False)
    nbits = [n for n in m.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) >= 2 * 3  # per layer at least qkv (fused), o_proj, gate/up/down
    attrs = {a.name: a.i for a in nbits[0].attribute}
    assert attrs["bits"] == 4 and attrs["block_size"] == GROUP and attrs["accuracy_level"] == 1
    assert all(len(n.input) >= 4 and n.input[3] for n in nbits)  # zero points: asymmetric, as the bench's RTN
    head = [n for n in m.graph.node if n.name == "/lm_head/MatMul"]
    assert head and head[0].op_type == "MatMul"  # lm_head left in float, as in the bench's int4 rows
    # weights as stored: int4 codes + scales + zero points + float head/norms + one embedding row
    c = hf.config
    lin = c.num_hidden_layers * (c.hidden_size * (c.hidden_size + 2 * 32) + c.hidden_size ** 2
                                 + 3 * c.hidden_size * c.intermediate_size)
    head_bytes = c.hidden_size * c.vocab_size * 4
    assert head_bytes + lin // 2 < r.weight_bytes < head_bytes + lin


def test_bad_input_is_rejected_before_building(tmp_path):
    hf = _tiny_llama()
    with pytest.raises(ValueError, match="token ids"):
        ort_genai_row.ort_genai_generate(hf, torch.tensor([[1, 256]]), 4, "cpu", tmp_path)
    with pytest.raises(ValueError, match="LongTensor"):
        ort_genai_row.ort_genai_generate(hf, torch.tensor([1, 2]), 4, "cpu", tmp_path)
    with pytest.raises(ValueError, match="device"):
        ort_genai_row.ort_genai_generate(hf, _prompt(), 4, "tpu", tmp_path)
    assert not any(tmp_path.iterdir())
