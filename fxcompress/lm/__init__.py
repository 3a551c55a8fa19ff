"""Deploy causal LMs for generation: cached prefill / decode graphs on PyTorch, ONNX Runtime and TVM.

    lm = fxc.compile_lm(model, backend="ort", max_seq_len=256)
    out = lm.generate(input_ids, max_new_tokens=32)          # greedy; temperature / top_k / seed to sample
    lm.save("out/lm-ort"); lm2 = fxc.runtime.load_lm("out/lm-ort")

Pipeline: :mod:`.capture` (torch.export at a fixed shape, integer layers kept) -> :mod:`.kv_cache` (attention
nodes -> :func:`.attention.cached_attention` over a static cache, positions from ``cache_position``) ->
a backend stepper (:mod:`.torch_steps`, :mod:`.ort_steps`, :mod:`.tvm_steps`) -> :mod:`.sampling` (one loop).
"""
from .attention import cached_attention
from .capture import capture_lm, with_quant_layers
from .compiled import BACKENDS, CompiledLM, compile_lm, load_lm
from .errors import KVCacheRewriteError, LMError
from .kv_cache import CacheSpec, kv_cache_pass
from .steps import LMSpec, build_steps

__all__ = ["compile_lm", "load_lm", "CompiledLM", "LMError", "KVCacheRewriteError", "kv_cache_pass", "CacheSpec",
           "capture_lm", "with_quant_layers", "cached_attention", "LMSpec", "build_steps", "BACKENDS"]
