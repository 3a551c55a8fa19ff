"""Cached generation: every backend's greedy tokens equal the uncached torch model's; cached logits equal the
uncached forward's at every position; bad input fails before any compute."""
import json

import pytest
import torch
import torch.nn.functional as F

import fxcompress as fxc
from fxcompress.lm import KVCacheRewriteError, LMError, compile_lm, load_lm, with_quant_layers

from .conftest import VOCAB, builtin, greedy_reference, logits_of, qwen2, rtn_int4

N_NEW = 32
MAX_LEN = 64
CHUNK = 8


def _l4q_builtin():
    m = builtin()
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(1))
    qm = fxc.prepare_l4q(m, (ids,), fxc.L4QConfig(bits=4, group_size=32, exclude=("lm_head",)))
    with torch.no_grad():  # move the learned offsets off the RTN grid: fractional zero points, nonzero LoRA
        for name, p in qm.named_parameters():
            if "zero" in name or "lora_b" in name.lower():
                p.add_(0.01 * torch.randn_like(p))
    return fxc.convert_l4q(qm)


def _qwen2_int4():
    h = qwen2()
    return with_quant_layers(h, rtn_int4(h))


def _qwen2_l4q():
    """The HF Qwen2 (grouped-query attention, tied embeddings) after prepare_l4q -> convert_l4q, with fractional
    zero points and a nonzero LoRA merged in."""
    from .conftest import _Logits

    h = qwen2()
    ids = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(1))
    qm = fxc.prepare_l4q(_Logits(h), (ids,), fxc.L4QConfig(bits=4, group_size=32, exclude=("*lm_head*",)))
    with torch.no_grad():
        for name, p in qm.named_parameters():
            if "zero" in name or "lora_b" in name.lower():
                p.add_(0.01 * torch.randn_like(p))
    return with_quant_layers(h, fxc.convert_l4q(qm))


MODELS = {
    "builtin-float": builtin,
    "builtin-l4q": _l4q_builtin,
    "qwen2-float": qwen2,
    "qwen2-rtn4": _qwen2_int4,
    "qwen2-l4q": _qwen2_l4q,
}
_CACHE = {}


def model(name):
    if name not in _CACHE:
        _CACHE[name] = MODELS[name]()
    return _CACHE[name]


def _prompt(n, batch=1, seed=0):
    return torch.randint(0, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


def _hf(kind):
    transformers = pytest.importorskip("transformers")
    cls, cfg = {"llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig),
                "mistral": (transformers.MistralForCausalLM, transformers.MistralConfig)}[kind]
    torch.manual_seed(0)
    return cls(cfg(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256,
                   tie_word_embeddings=False)).eval()


@pytest.mark.parametrize("name", list(MODELS) + ["qwen2-eager", "llama-untied", "mistral-untied"])
def test_cached_logits_equal_uncached_forward(name):
    extra = {"qwen2-eager": lambda: qwen2(attn="eager"), "llama-untied": lambda: _hf("llama"),
             "mistral-untied": lambda: _hf("mistral")}
    m = extra[name]() if name in extra else model(name)
    lm = compile_lm(m, "torch", max_seq_len=MAX_LEN, prefill_chunk=CHUNK)
    ids = _prompt(20)
    torch.testing.assert_close(lm.step_logits(ids), logits_of(m, ids), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("backend,name", [(b, n) for b in ("ort", "tvm") for n in MODELS])
def test_greedy_tokens_equal_torch(name, backend):
    m = model(name)
    # ORT: fp32 compute in MatMulNBits (accuracy_level=0); the default (4, int8 activations) is tested apart
    lm = compile_lm(m, backend, max_seq_len=MAX_LEN, prefill_chunk=CHUNK, accuracy_level=0)
    for n_prompt in (11, 5):  # a shifted last chunk, a padded single chunk
        ids = _prompt(n_prompt, seed=n_prompt)
        ref = greedy_reference(m, ids, N_NEW)
        assert torch.equal(lm.generate(ids, max_new_tokens=N_NEW), ref), (name, backend, n_prompt)
    torch.testing.assert_close(lm.step_logits(_prompt(12)), logits_of(m, _prompt(12)), atol=1e-4, rtol=1e-4)
    if backend == "tvm":  # the step inputs live in device tensors allocated once per step kind, refilled per token
        before = [id(t) for t in lm.steps._inputs["decode"]]
        lm.generate(_prompt(5), max_new_tokens=3)
        assert [id(t) for t in lm.steps._inputs["decode"]] == before


def test_batch_sampling_eos_and_save_load(tmp_path):
    m = model("qwen2-float")
    lm = compile_lm(m, "ort", max_seq_len=MAX_LEN, prefill_chunk=CHUNK, batch_size=2, accuracy_level=0)
    ids = _prompt(9, batch=2)
    assert torch.equal(lm.generate(ids, 12), greedy_reference(m, ids, 12))
    a = lm.generate(ids, 12, temperature=0.8, top_k=20, seed=3)
    assert torch.equal(a, lm.generate(ids, 12, temperature=0.8, top_k=20, seed=3))
    assert torch.equal(lm.generate(ids, 12, temperature=1.0, top_k=1, seed=5), greedy_reference(m, ids, 12))
    greedy = greedy_reference(m, ids[:1].repeat(2, 1), 12)
    new = greedy[0, 9:].tolist()
    j = next((i for i in range(len(new)) if new[i] not in new[:i] and i > 0), 0)  # first token not emitted before
    out = lm.generate(ids[:1].repeat(2, 1), 12, eos_token_id=new[j])
    assert out.shape[1] == 9 + j + 1 and int(out[0, -1]) == new[j]
    assert torch.equal(out, greedy[:, :9 + j + 1])
    lm.save(tmp_path / "lm")
    lm2 = fxc.runtime.load_lm(tmp_path / "lm") if hasattr(fxc.runtime, "load_lm") else load_lm(tmp_path / "lm")
    assert torch.equal(lm2.generate(ids, 12), greedy_reference(m, ids, 12))


def test_torch_backend_save_load(tmp_path):
    m = model("builtin-l4q")
    lm = compile_lm(m, "torch", max_seq_len=MAX_LEN, prefill_chunk=CHUNK)
    ids = _prompt(10)
    lm.save(tmp_path / "t")
    assert torch.equal(load_lm(tmp_path / "t").generate(ids, 8), greedy_reference(m, ids, 8))


@pytest.fixture(scope="module")
def small_lm():
    return compile_lm(builtin(), "torch", max_seq_len=16, prefill_chunk=4)


def test_bad_requests_fail_before_compute(small_lm):
    with pytest.raises(LMError, match="more than max_seq_len=16"):
        small_lm.generate(_prompt(17), 1)
    with pytest.raises(LMError, match="exceeds max_seq_len=16"):
        small_lm.generate(_prompt(10), 7)
    with pytest.raises(LMError, match=r"vocabulary"):
        small_lm.generate(torch.tensor([[1, VOCAB]]), 2)
    with pytest.raises(LMError, match="batch 1"):
        small_lm.generate(_prompt(4, batch=2), 2)
    with pytest.raises(LMError, match="max_new_tokens"):
        small_lm.generate(_prompt(4), 0)


def test_corrupt_or_other_version_dir(tmp_path, small_lm):
    d = small_lm.save(tmp_path / "lm")
    with pytest.raises(LMError, match="no manifest.json"):
        load_lm(tmp_path)
    man = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").write_text(json.dumps(dict(man, format_version=99)))
    with pytest.raises(LMError, match="format version 99"):
        load_lm(d)
    (d / "manifest.json").write_text(json.dumps(man))
    with open(d / "decode" / "weights.safetensors", "ab") as f:  # torch backend: one artifact per step
        f.write(b"x")
    with pytest.raises(LMError, match="sha256"):
        load_lm(d)
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(LMError, match="not valid JSON"):
        load_lm(d)


def test_tvm_cuda_without_gpu_is_a_clear_error():
    pytest.importorskip("tvm")
    import tvm

    if tvm.cuda(0).exist:
        pytest.skip("this machine has a GPU")
    with pytest.raises(LMError, match="no CUDA GPU"):
        compile_lm(builtin(), "tvm", device="cuda", max_seq_len=16)


class _Bidirectional(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, 16)
        self.qkv = torch.nn.Linear(16, 48)
        self.out = torch.nn.Linear(16, VOCAB)

    def forward(self, input_ids):
        b, t = input_ids.shape
        q, k, v = self.qkv(self.emb(input_ids)).view(b, t, 3, 2, 8).permute(2, 0, 3, 1, 4)
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, 16))


class _NoAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, 16)
        self.out = torch.nn.Linear(16, VOCAB)

    def forward(self, input_ids):
        return self.out(self.emb(input_ids))


def test_rewrite_errors_name_the_node():
    with pytest.raises(KVCacheRewriteError, match=r"attention node 'scaled_dot_product_attention' is neither causal"):
        compile_lm(_Bidirectional(), "torch", max_seq_len=16, prefill_chunk=4)
    with pytest.raises(KVCacheRewriteError, match="no attention node"):
        compile_lm(_NoAttention(), "torch", max_seq_len=16, prefill_chunk=4)


def test_shape_baked_graph_points_to_with_quant_layers():
    h = qwen2()
    with pytest.raises(LMError, match="with_quant_layers"):
        compile_lm(rtn_int4(h), "torch", max_seq_len=16, prefill_chunk=4)


def test_sliding_window_longer_than_cache_is_refused():
    m = _hf("mistral")
    m.config.sliding_window = 8
    with pytest.raises(LMError, match="sliding-window"):
        compile_lm(m, "torch", max_seq_len=16, prefill_chunk=4)


def test_user_model_not_modified():
    m = builtin()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    compile_lm(m, "torch", max_seq_len=16, prefill_chunk=4)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


class _HiddenPositions(torch.nn.Module):
    """Rotary-like position signal computed from a constant that the rewrite cannot see as a position source."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, 16)
        self.qkv = torch.nn.Linear(16, 48)
        self.out = torch.nn.Linear(16, VOCAB)
        self.register_buffer("ramp", torch.linspace(0, 1, 64))

    def forward(self, input_ids):
        b, t = input_ids.shape
        x = self.emb(input_ids) + self.ramp.flip(0)[-t:, None]  # positions via a flipped table: not rewritten
        q, k, v = self.qkv(x).view(b, t, 3, 2, 8).permute(2, 0, 3, 1, 4)
        return self.out(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, 16))


def test_positions_not_found_fail_the_self_check():
    with pytest.raises(KVCacheRewriteError, match="self-check failed"):
        compile_lm(_HiddenPositions(), "torch", max_seq_len=16, prefill_chunk=4)


@pytest.mark.gpu
@pytest.mark.parametrize("backend,cuda_graph", [("torch", False), ("tvm", False), ("tvm", True), ("ort", False)])
def test_cuda_greedy_tokens_equal_torch_cpu(backend, cuda_graph):
    """On the GPU (fp32, so argmax ties are not a dtype effect) the cached steps reproduce the uncached CPU model."""
    if backend == "ort":
        ort = pytest.importorskip("onnxruntime")
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            pytest.skip("onnxruntime-gpu (CUDAExecutionProvider) is not installed")
    m = model("builtin-l4q")
    ids = _prompt(11)
    want = greedy_reference(m, ids, N_NEW)
    kw = {"cuda_graph": cuda_graph} if backend == "tvm" else {}
    lm = compile_lm(m, backend, device="cuda", max_seq_len=MAX_LEN, prefill_chunk=CHUNK, **kw)
    assert torch.equal(lm.generate(ids, max_new_tokens=N_NEW).cpu(), want)


@pytest.mark.gpu
def test_cuda_tvm_decode_graph_replays_the_vm_step_and_streams_with_eos():
    """The whole decode step captured in one CUDA graph gives the VM-per-token path's tokens (fp16, int4); the
    device-side loop streams every token and stops at EOS."""
    m = model("builtin-l4q")
    ids = _prompt(11)
    kw = dict(device="cuda", max_seq_len=MAX_LEN, prefill_chunk=CHUNK, dtype=torch.float16)
    graph = compile_lm(m, "tvm", **kw)
    out = graph.generate(ids, max_new_tokens=N_NEW)
    assert graph.steps.graph_status == "captured", graph.steps.graph_status
    plain = compile_lm(m, "tvm", cuda_graph=False, **kw)
    assert torch.equal(plain.generate(ids, max_new_tokens=N_NEW), out)
    new = out[0, ids.shape[1]:].tolist()
    eos = new[5]
    stop = new.index(eos)
    seen = []
    got = graph.generate(ids, max_new_tokens=N_NEW, eos_token_id=eos, on_token=lambda t: seen.append(int(t[0])))
    assert got[0, ids.shape[1]:].tolist() == new[:stop + 1] == seen
    sampled = graph.generate(ids, max_new_tokens=12, temperature=0.8, top_k=20, seed=3)  # host then device generator
    assert torch.equal(sampled, graph.generate(ids, max_new_tokens=12, temperature=0.8, top_k=20, seed=3))
