"""``compile_lm`` / ``CompiledLM`` / ``load_lm``: a causal LM deployed for generation on one backend."""
from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import torch

from .errors import LMError
from .sampling import generate_tokens
from .steps import LMSpec, build_steps, check_steps

__all__ = ["compile_lm", "load_lm", "CompiledLM", "FORMAT", "FORMAT_VERSION", "BACKENDS"]

FORMAT = "fxcompress-lm"
FORMAT_VERSION = 1
BACKENDS = ("torch", "ort", "tvm")


def _sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class CompiledLM:
    """A causal LM compiled for cached generation: ``generate(...)``, ``save(dir)``."""

    def __init__(self, steps, spec: LMSpec, backend: str, device: str, files_dir: Path | None = None,
                 options: dict | None = None):
        self.steps, self.spec, self.backend, self.device = steps, spec, backend, device
        self._files_dir = files_dir  # ORT: the exported .onnx files (kept until saved)
        self.options = dict(options or {})
        self.last_stats: dict = {}

    def generate(self, input_ids, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int | None = None,
                 eos_token_id: int | None = None, seed: int | None = None, on_token=None) -> torch.Tensor:
        """``[batch, prompt + new]`` token ids (temperature 0 = greedy; ``seed`` makes sampling repeatable)."""
        self.last_stats = {}
        return generate_tokens(self.steps, self.spec, input_ids, max_new_tokens, temperature, top_k, eos_token_id,
                               seed, on_token, self.last_stats)

    @torch.no_grad()
    def step_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, T, V]`` of a prompt through the cache: chunked prefill of ``input_ids[:, :prefill_chunk]``
        then one decode step per remaining token (the parity check against the uncached forward)."""
        ids = input_ids.to(torch.long)
        c = self.spec.prefill_chunk
        if ids.shape[1] < c:
            raise LMError(f"step_logits needs at least prefill_chunk={self.spec.prefill_chunk} tokens")
        if ids.shape[1] > self.spec.max_seq_len:
            raise LMError(f"{ids.shape[1]} tokens exceed max_seq_len={self.spec.max_seq_len}")
        self.steps.reset()
        outs = [self.steps.step("prefill", ids[:, :c], torch.arange(c))]
        for p in range(c, ids.shape[1]):
            outs.append(self.steps.step("decode", ids[:, p:p + 1], torch.tensor([p])))
        return torch.cat(outs, 1)

    def save(self, directory) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        if self.backend == "ort":
            import shutil

            files = []
            for f in ("prefill.onnx", "decode.onnx", "weights.bin"):
                shutil.copyfile(self._files_dir / f, d / f)
                files.append(f)
        else:
            files = self.steps.save(d)
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION,
                    "fxcompress_version": __import__("fxcompress").__version__, "backend": self.backend,
                    "built_for_device": "cuda" if str(self.device).startswith("cuda") else "cpu",
                    "spec": self.spec.to_json(), "options": self.options,
                    "files": {f: _sha256(d / f) for f in files}}
        (d / "manifest.json").write_text(json.dumps(manifest, indent=1))
        return d


def _fuse_linears(graphs: dict, spec: LMSpec) -> dict:
    """Each step graph with its shared-input linears fused, checked on the step's example inputs (a graph with
    nothing to fuse is kept as it is)."""
    from ..passes.base import NothingToCompressError
    from ..passes.fusion import fuse_linears
    from .steps import example_inputs

    out = {}
    for kind, g in graphs.items():
        seq = spec.prefill_chunk if kind == "prefill" else 1
        args = example_inputs(spec, seq)
        half = any(dt != "float32" for _, _, dt in spec.cache)
        try:
            fused = fuse_linears(g, args, atol=2e-2 if half else 1e-4, rtol=2e-2 if half else 1e-4)
        except NothingToCompressError:
            fused = g
        fused.meta.update(g.meta)
        out[kind] = fused
    return out


def compile_lm(model, backend: str = "torch", device: str = "cpu", max_seq_len: int = 2048,
               dtype: torch.dtype | None = None, *, batch_size: int = 1, prefill_chunk: int = 64,
               weight_format: str = "matmulnbits", accuracy_level: int | None = None, cuda_graph: bool = True,
               fuse: bool | None = None) -> CompiledLM:
    """Compile a causal LM (``forward(input_ids) -> logits``: the built-in ``CausalLM``, a Hugging Face
    ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` / ``MistralForCausalLM``, or either after ``quantize_rtn`` /
    ``convert_l4q``) into cached prefill / decode steps on ``backend`` ("torch", "ort", "tvm").

    Shapes are static: ``batch_size`` rows, a KV cache of ``max_seq_len`` positions, prompts prefilled in chunks
    of ``prefill_chunk`` tokens.  ``dtype`` (e.g. ``torch.float16``) casts the float parameters and activations.
    ORT: ``weight_format`` / ``accuracy_level`` go to :func:`fxcompress.export_onnx` (None: its per-format
    default, 4 = int8 activations in MatMulNBits on CPU; 0 = fp32 compute, token-exact with torch, slower).
    TVM: the caches are donated to the steps (written in place, never copied); on CUDA, ``cuda_graph`` captures
    the whole decode step in one CUDA graph on its first use (and builds the prefill step with
    ``relax.backend.use_cuda_graph``); ``cuda_graph=False`` calls the Relax VM per token.
    ``fuse``: linears that read one tensor (q/k/v, gate/up) become one linear in both steps
    (:func:`fxcompress.fuse_linears`, checked against the unfused step); None = on for TVM (one kernel launch
    and one weight stream instead of three), off for torch and ORT.
    The model is not modified.
    """
    if backend not in BACKENDS:
        raise LMError(f"backend must be one of {BACKENDS}, got {backend!r}")
    for name, v in (("max_seq_len", max_seq_len), ("batch_size", batch_size), ("prefill_chunk", prefill_chunk)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise LMError(f"{name} must be an int >= 1, got {v!r}")
    device = str(device)
    if not (device == "cpu" or device == "cuda" or device.startswith("cuda:")):
        raise LMError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if backend == "tvm":
        from .tvm_steps import _check_device

        _check_device(device)  # before any tracing: no GPU -> a clear error now
    if device.startswith("cuda") and backend == "torch" and not torch.cuda.is_available():
        raise LMError(f"device={device!r}: torch sees no CUDA GPU")
    cfg = getattr(model, "config", None)
    window = getattr(cfg, "sliding_window", None)
    if window and getattr(cfg, "use_sliding_window", True) and max_seq_len > int(window):
        raise LMError(f"{type(model).__name__} uses sliding-window attention (window {window}); the KV cache attends "
                      f"to every earlier position, so max_seq_len must be <= {window}, got {max_seq_len}")
    if backend == "ort" and dtype not in (None, torch.float32, torch.float16):
        raise LMError(f"backend='ort' supports dtype None / float32 / float16, got {dtype}")
    # ORT: the graphs are exported in fp32 and converted to fp16 afterwards (export_onnx's stand-ins are fp32)
    pre, dec, spec = build_steps(model, batch=batch_size, max_seq_len=max_seq_len,
                                 prefill_chunk=min(prefill_chunk, max_seq_len),
                                 dtype=None if backend == "ort" else dtype)
    check_steps(pre, dec, spec)
    graphs = {"prefill": pre, "decode": dec}
    if fuse is None:
        fuse = backend == "tvm"
    if not isinstance(fuse, bool):
        raise LMError(f"fuse must be None, True or False, got {fuse!r}")
    if fuse:
        graphs = _fuse_linears(graphs, spec)
    if backend == "torch":
        from .torch_steps import TorchSteps

        return CompiledLM(TorchSteps(graphs, spec, device), spec, backend, device)
    if backend == "ort":
        from .ort_steps import OrtSteps, export_steps_onnx

        tmp = Path(tempfile.mkdtemp(prefix="fxc-lm-ort-"))
        fp16 = dtype == torch.float16
        export_steps_onnx(graphs, spec, tmp, weight_format, accuracy_level, float16=fp16)
        if fp16:
            spec = LMSpec(spec.batch, spec.max_seq_len, spec.prefill_chunk, spec.vocab_size,
                          tuple((kvh, hd, "float16") for kvh, hd, _ in spec.cache))
        opts = {"weight_format": weight_format, "accuracy_level": accuracy_level}
        return CompiledLM(OrtSteps(tmp, spec, device), spec, backend, device, tmp, opts)
    from .tvm_steps import TVMSteps, build_steps_tvm

    steps = TVMSteps(build_steps_tvm(graphs, spec, device, dtype, cuda_graph=cuda_graph), spec, device)
    return CompiledLM(steps, spec, backend, device)


def load_lm(directory, device: str = "cpu") -> CompiledLM:
    """Load a directory written by :meth:`CompiledLM.save` (checks format, version and file hashes first)."""
    d = Path(directory)
    mpath = d / "manifest.json"
    if not mpath.is_file():
        raise LMError(f"{d} is not a saved LM directory (no manifest.json); write one with CompiledLM.save")
    try:
        m = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LMError(f"{mpath} is not valid JSON ({e}); the directory is corrupt: save the LM again") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise LMError(f"{mpath} is not an fxcompress LM manifest (format {m.get('format') if isinstance(m, dict) else m!r})")
    if m.get("format_version") != FORMAT_VERSION:
        raise LMError(f"{d} was written with LM format version {m.get('format_version')!r}; this fxcompress "
                      f"({__import__('fxcompress').__version__}) reads version {FORMAT_VERSION}: compile and save it again")
    backend = m.get("backend")
    if backend not in BACKENDS:
        raise LMError(f"{mpath}: unknown backend {backend!r}")
    try:
        spec = LMSpec.from_json(m["spec"])
        files = dict(m["files"])
    except (KeyError, TypeError, ValueError) as e:
        raise LMError(f"{mpath} is corrupt: {type(e).__name__}: {e}") from None
    for f, h in files.items():
        p = d / f
        if not p.is_file():
            raise LMError(f"{d} is missing {f}; the directory is incomplete: save the LM again")
        if _sha256(p) != h:
            raise LMError(f"{p} does not match its sha256 in the manifest (changed or truncated); save the LM again")
    device = str(device)
    if backend == "torch":
        from .torch_steps import TorchSteps

        return CompiledLM(TorchSteps.load(d, spec, device), spec, backend, device)
    if backend == "ort":
        from .ort_steps import OrtSteps

        return CompiledLM(OrtSteps(d, spec, device), spec, backend, device, d, m.get("options"))
    if m.get("built_for_device") != ("cuda" if device.startswith("cuda") else "cpu"):
        raise LMError(f"{d} holds TVM libraries built for {m.get('built_for_device')}; it cannot run on {device!r}")
    from .tvm_steps import TVMSteps

    return CompiledLM(TVMSteps.load(d, spec, device), spec, backend, device)
