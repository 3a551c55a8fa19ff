"""The onnxruntime-genai peer row of tools/bench_generate.py: its model builder's int4 ONNX, its generation loop.

``ort_genai_generate(hf_model, prompt, new_tokens, device, work_dir)``:

1. saves the Hugging Face ``LlamaForCausalLM`` (``save_pretrained``) and, because the model builder loads a
   tokenizer (``AutoTokenizer.from_pretrained`` in ``get_hf_details`` and ``save_processing``) and our models
   carry none, an id-only word-level tokenizer (token ``i`` is the string ``<i>``); generation never uses it,
   the prompt's ids are fed directly;
2. runs the model builder (``python -m onnxruntime_genai.models.builder -p int4 -e cuda|cpu``) in a child
   process with ``block_size`` (the bench's group size), ``is_symmetric=false`` (uint4 codes + zero points, as
   the bench's asymmetric RTN int4 rows) and, unless ``quantize_lm_head``, ``lm_head`` left in float (the
   bench's int4 rows exclude it too);
3. generates the full ``new_tokens`` (``min_length = max_length``: genai masks the EOS logit until then, as the
   HF-generate row's ``min_new_tokens`` does; genai rejects an EOS id outside the vocabulary);
4. loads it with ``og.Model``, generates greedily (``do_sample=False``) and times it as ``time_generate`` in
   bench_generate.py does: a warm-up generation of ``min(8, new_tokens)`` tokens, then a timed one; time to
   first token = prompt in -> first new token on the host (``append_tokens`` runs the prefill,
   the first ``generate_next_token`` picks from its logits); decode ms/token = the remaining time / (new - 1).

Every missing piece (package not importable, builder failure, unsupported device) raises ``OrtGenaiUnavailable``
with the reason, which the bench keeps in the row's note.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

_ELEM_BYTES = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2, 21: 0.5, 22: 0.5}


class OrtGenaiUnavailable(RuntimeError):
    """onnxruntime-genai cannot run here (the message says why)."""


@dataclass(frozen=True)
class OrtGenaiResult:
    ids: torch.Tensor  # LongTensor [1, prompt + new]
    ttft_ms: float
    decode_ms_per_token: float
    weight_bytes: int  # initializers a decode step reads (a Gather-only table counts one row)
    model_dir: Path


def _require_genai():
    try:
        import onnxruntime_genai as og
    except ImportError as e:
        raise OrtGenaiUnavailable(f"onnxruntime-genai not importable ({e}); stage it with tools/stage_ort_genai.sh"
                                  ) from e
    try:
        import onnx_ir  # noqa: F401  (the model builder's graph library)
    except ImportError as e:
        raise OrtGenaiUnavailable(f"the model builder needs onnx-ir ({e})") from e
    return og


def write_id_tokenizer(out_dir: str | Path, vocab_size: int) -> None:
    """A word-level tokenizer over ``vocab_size`` tokens ``<0> .. <V-1>`` that ``AutoTokenizer`` loads: the model
    builder insists on one; generation here feeds token ids and never tokenizes."""
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<{i}>": i for i in range(vocab_size)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<0>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<0>").save_pretrained(str(out_dir))


def build_onnx(hf_dir: Path, out_dir: Path, device: str, block_size: int, quantize_lm_head: bool = False,
               precision: str = "int4", accuracy_level: int | None = None, timeout_s: int = 1800) -> Path:
    """Run onnxruntime-genai's model builder on ``hf_dir`` for the CPU or CUDA execution provider: int4 (uint4 +
    zero points, ``block_size``), or ``precision`` "fp32" / "fp16" (no quantization: the parity reference).
    ``accuracy_level``: MatMulNBits' compute type (1 fp32, 2 fp16, 3 bf16, 4 int8 activations); None keeps the
    builder's default (4 on the CPU EP, 0 = the kernel's own choice on CUDA).
    Returns ``out_dir`` (model.onnx, its weights, genai_config.json)."""
    ep = {"cuda": "cuda", "cpu": "cpu"}[device]
    extra = [f"block_size={block_size}", "is_symmetric=false", "hf_token=false"]
    if not quantize_lm_head:
        extra.append("nodes_to_exclude=/lm_head/MatMul")
    if accuracy_level is not None:
        extra.append(f"accuracy_level={accuracy_level}")
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out_dir),
           "-p", precision, "-e", ep, "-c", str(out_dir.parent / "builder_cache"), "--extra_options", *extra]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=timeout_s)
    if r.returncode != 0 or not (out_dir / "genai_config.json").is_file():
        tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
        raise OrtGenaiUnavailable(f"model builder failed (rc {r.returncode}): {' / '.join(tail)[:300]}")
    return out_dir


def onnx_weight_bytes(model_dir: Path) -> int:
    """Bytes of the ONNX model's initializers as stored (packed int4 codes, scales, zero points, float weights);
    an initializer read only by Gather (the embedding table) counts one row, the rotary tables not at all."""
    import onnx

    m = onnx.load(str(model_dir / "model.onnx"), load_external_data=False)
    users: dict[str, set[str]] = {}
    for n in m.graph.node:
        for i in n.input:
            users.setdefault(i, set()).add(n.op_type)
    total = 0
    for t in m.graph.initializer:
        numel = int(np.prod(t.dims)) if len(t.dims) else 1
        nbytes = numel * _ELEM_BYTES.get(t.data_type, 0)
        if not nbytes:  # unknown element type: the stored length
            ext = {e.key: e.value for e in t.external_data}
            nbytes = int(ext.get("length", len(t.raw_data)))
        if t.name in ("cos_cache", "sin_cache"):  # rotary tables: a row per position is read (the bench's
            continue  # weight_bytes skips rope_cos / rope_sin too)
        if users.get(t.name) == {"Gather"} and len(t.dims) >= 2:
            nbytes = nbytes // t.dims[0]
        total += int(nbytes)
    return total


def _generate(og, model, prompt: np.ndarray, new_tokens: int):
    """Greedy generation of ``new_tokens`` tokens; returns (sequence, ttft_s, decode_s)."""
    params = og.GeneratorParams(model)
    total = prompt.shape[1] + new_tokens
    params.set_search_options(do_sample=False, max_length=total, min_length=total)
    t0 = time.perf_counter()
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)  # the prefill
    gen.generate_next_token()
    gen.get_next_tokens()  # the first new token, on the host
    t1 = time.perf_counter()
    n = 1
    while not gen.is_done():
        gen.generate_next_token()
        gen.get_next_tokens()
        n += 1
    t2 = time.perf_counter()
    seq = np.asarray(gen.get_sequence(0), dtype=np.int64)
    del gen
    if n != new_tokens:
        raise OrtGenaiUnavailable(f"onnxruntime-genai generated {n} tokens, expected {new_tokens}")
    return seq, t1 - t0, t2 - t1


def _check_request(prompt: torch.Tensor, new_tokens: int, vocab: int, device: str) -> None:
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")
    if prompt.dim() != 2 or prompt.shape[0] != 1:
        raise ValueError(f"prompt must be a LongTensor [1, P], got shape {tuple(prompt.shape)}")
    if new_tokens < 2:
        raise ValueError(f"new_tokens must be >= 2 (decode time is measured after the first), got {new_tokens}")
    if int(prompt.min()) < 0 or int(prompt.max()) >= vocab:
        raise ValueError(f"prompt token ids must be in [0, {vocab})")


def _require_device(og, device: str) -> None:
    if device == "cuda" and "cuda" not in getattr(og, "__id__", ""):
        raise OrtGenaiUnavailable(f"the installed onnxruntime-genai ({getattr(og, '__id__', '?')}) has no CUDA "
                                  "support; stage onnxruntime-genai-cuda")


def build_ort_genai(hf_model, device: str, work_dir: str | Path, block_size: int = 128,
                    quantize_lm_head: bool = False, precision: str = "int4", accuracy_level: int | None = None
                    ) -> Path:
    """Save ``hf_model`` (a transformers ``LlamaForCausalLM``, fp16 or fp32; not modified) with an id-only
    tokenizer under ``work_dir``/hf and build it with the model builder for ``device``; returns the ONNX dir."""
    if precision not in ("int4", "fp16", "fp32"):
        raise ValueError(f"precision must be 'int4', 'fp16' or 'fp32', got {precision!r}")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")
    if accuracy_level not in (None, 0, 1, 2, 3, 4):
        raise ValueError(f"accuracy_level must be None or 0..4, got {accuracy_level!r}")
    _require_device(_require_genai(), device)
    work = Path(work_dir)
    hf_dir = work / "hf"
    onnx_dir = work / (f"{precision}-{device}" + (f"-b{block_size}" if precision == "int4" else ""))
    hf_dir.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(str(hf_dir))
    write_id_tokenizer(hf_dir, hf_model.config.vocab_size)
    return build_onnx(hf_dir, onnx_dir, device, block_size, quantize_lm_head, precision, accuracy_level)


def run_ort_genai(model_dir: str | Path, prompt: torch.Tensor, new_tokens: int, device: str,
                  cuda_graph: bool = False) -> OrtGenaiResult:
    """Generate ``new_tokens`` greedy tokens after ``prompt`` (LongTensor [1, P]) with the model builder's ONNX
    in ``model_dir`` on ``device``, timed as bench_generate.time_generate (warm-up, then one timed run).
    ``cuda_graph``: the CUDA EP's graph capture for the decode steps (genai's ``enable_cuda_graph``)."""
    og = _require_genai()
    model_dir = Path(model_dir)
    vocab = int(json.loads((model_dir / "genai_config.json").read_text())["model"]["vocab_size"])
    _check_request(prompt, new_tokens, vocab, device)
    _require_device(og, device)
    if cuda_graph and device != "cuda":
        raise ValueError("cuda_graph needs device='cuda'")
    config = og.Config(str(model_dir))
    config.clear_providers()
    if device == "cuda":
        config.append_provider("cuda")
        config.set_provider_option("cuda", "enable_cuda_graph", "1" if cuda_graph else "0")
    model = og.Model(config)
    ids = prompt.to("cpu", torch.int64).numpy().astype(np.int32)
    _generate(og, model, ids, min(8, new_tokens))  # warm-up
    seq, ttft, decode = _generate(og, model, ids, new_tokens)
    out = torch.from_numpy(seq).unsqueeze(0)
    if out.shape[1] != prompt.shape[1] + new_tokens or not torch.equal(out[:, :prompt.shape[1]], prompt.cpu()):
        raise OrtGenaiUnavailable(f"onnxruntime-genai returned a sequence of shape {tuple(out.shape)} that does not "
                                  "start with the prompt")
    return OrtGenaiResult(out, ttft * 1e3, decode * 1e3 / (new_tokens - 1), onnx_weight_bytes(model_dir), model_dir)


def ort_genai_generate(hf_model, prompt: torch.Tensor, new_tokens: int, device: str, work_dir: str | Path,
                       block_size: int = 128, quantize_lm_head: bool = False, precision: str = "int4",
                       cuda_graph: bool = False, accuracy_level: int | None = None) -> OrtGenaiResult:
    """``build_ort_genai`` then ``run_ort_genai``: ``hf_model`` (transformers ``LlamaForCausalLM``) through the
    model builder's int4 ONNX (``block_size``) on ``device``, ``new_tokens`` greedy tokens after ``prompt``."""
    _check_request(prompt, new_tokens, hf_model.config.vocab_size, device)
    d = build_ort_genai(hf_model, device, work_dir, block_size, quantize_lm_head, precision, accuracy_level)
    return run_ort_genai(d, prompt, new_tokens, device, cuda_graph)
