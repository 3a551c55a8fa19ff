"""Build the two cached step graphs of a causal LM: prefill (``prefill_chunk`` tokens) and decode (1 token)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.fx as fx

from .capture import capture_lm
from .errors import KVCacheRewriteError
from .kv_cache import kv_cache_pass

__all__ = ["LMSpec", "build_steps", "example_inputs", "empty_caches", "check_steps"]

_DT = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class LMSpec:
    """Static shapes of the compiled steps (stored in a saved LM's manifest)."""
    batch: int
    max_seq_len: int
    prefill_chunk: int
    vocab_size: int
    cache: tuple  # per attention layer: (kv_heads, head_dim, dtype name)

    def __post_init__(self):
        for f in ("batch", "max_seq_len", "prefill_chunk", "vocab_size"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"LMSpec.{f} must be an int >= 1, got {v!r}")
        if self.prefill_chunk > self.max_seq_len:
            raise ValueError(f"LMSpec.prefill_chunk {self.prefill_chunk} exceeds max_seq_len {self.max_seq_len}")

    def to_json(self) -> dict:
        d = asdict(self)
        d["cache"] = [list(c) for c in self.cache]
        return d

    @classmethod
    def from_json(cls, d: dict) -> "LMSpec":
        return cls(int(d["batch"]), int(d["max_seq_len"]), int(d["prefill_chunk"]), int(d["vocab_size"]),
                   tuple((int(a), int(b), str(c)) for a, b, c in d["cache"]))

    @property
    def input_names(self) -> list[str]:
        return ["input_ids", "cache_position"] + [f"{kv}_cache_{i}" for i in range(len(self.cache)) for kv in "kv"]

    @property
    def output_names(self) -> list[str]:
        return ["logits"] + [f"present_{kv}_{i}" for i in range(len(self.cache)) for kv in "kv"]


def empty_caches(spec: LMSpec, device="cpu") -> list[torch.Tensor]:
    return [torch.zeros(spec.batch, kvh, spec.max_seq_len, hd, dtype=_DT[dt], device=device)
            for kvh, hd, dt in spec.cache for _ in "kv"]


def example_inputs(spec: LMSpec, seq: int, device="cpu") -> tuple:
    ids = torch.zeros(spec.batch, seq, dtype=torch.long, device=device)
    return (ids, torch.arange(seq, device=device), *empty_caches(spec, device))


def build_steps(model, *, batch: int, max_seq_len: int, prefill_chunk: int,
                dtype: torch.dtype | None = None) -> tuple[fx.GraphModule, fx.GraphModule, LMSpec]:
    """(prefill, decode, spec): both graphs map ``(input_ids, cache_position, *caches) -> (logits, *caches)``."""
    pre, ps = kv_cache_pass(capture_lm(model, batch, prefill_chunk, dtype), max_seq_len,
                            require_causal=prefill_chunk > 1)
    dec, ds = kv_cache_pass(capture_lm(model, batch, 1, dtype), max_seq_len, require_causal=False)
    pc = [(lay["kv_heads"], lay["head_dim"], lay["dtype"]) for lay in ps.layers]
    dc = [(lay["kv_heads"], lay["head_dim"], lay["dtype"]) for lay in ds.layers]
    if pc != dc:
        raise ValueError(f"the prefill and decode graphs disagree on the cache layout: {pc} vs {dc}")
    logits = next(n for n in pre.graph.nodes if n.op == "output").args[0][0].meta.get("val")
    vocab = int(logits.shape[-1]) if isinstance(logits, torch.Tensor) else int(model.config.vocab_size)
    spec = LMSpec(batch, max_seq_len, prefill_chunk, vocab, tuple(pc))
    pre.meta["fxc_lm_cache"], dec.meta["fxc_lm_cache"] = ps, ds
    return pre, dec, spec


@torch.no_grad()
def check_steps(pre: fx.GraphModule, dec: fx.GraphModule, spec: LMSpec, steps: int = 4) -> float:
    """Self-check of the rewrite: decoding the first ``steps`` tokens one at a time must give the prefill graph's
    logits at those positions (a graph whose positions were not rewritten fails at position 1).  Runs on the CPU;
    returns the largest relative difference."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, spec.vocab_size, (spec.batch, spec.prefill_chunk), generator=g)
    ref = pre(ids, torch.arange(spec.prefill_chunk), *empty_caches(spec))[0].float()
    caches = empty_caches(spec)
    worst = 0.0
    tol = 1e-3 if all(dt == "float32" for _, _, dt in spec.cache) else 3e-2
    for p in range(min(steps, spec.prefill_chunk)):
        out = dec(ids[:, p:p + 1], torch.tensor([p]), *caches)
        caches = list(out[1:])
        r = ref[:, p]
        err = float((out[0][:, 0].float() - r).abs().max() / (1.0 + r.abs().max()))
        worst = max(worst, err)
        if not err <= tol:
            where = pre.meta["fxc_lm_cache"].position_nodes, dec.meta["fxc_lm_cache"].position_nodes
            raise KVCacheRewriteError(
                f"self-check failed: the cached decode step at position {p} disagrees with the prefill step "
                f"(relative difference {err:.2e} > {tol:g}); the graph's positions were probably not all found "
                f"(position nodes rewritten: prefill {where[0]}, decode {where[1]}). Compute positions from "
                "arange(seq_len) or a rope table sliced [:seq_len], or pass a model whose forward does")
    return worst
