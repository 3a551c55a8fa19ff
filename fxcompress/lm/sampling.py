"""The generation loop shared by every backend: chunked prefill, then one cached decode step per token."""
from __future__ import annotations

import time

import torch

from .errors import LMError

__all__ = ["generate_tokens", "pick_next", "check_request"]


def pick_next(logits: torch.Tensor, temperature: float, top_k: int | None, gen: torch.Generator | None):
    """Next token ids ``[B]`` from last-position logits ``[B, V]``: argmax at temperature 0, else sampling."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, -1)
    return torch.multinomial(probs, 1, generator=gen)[:, 0]


def check_request(input_ids, spec, max_new_tokens, temperature, top_k) -> torch.Tensor:
    """Validate a request against the compiled shapes before any compute; returns int64 ids on the CPU."""
    if not isinstance(input_ids, torch.Tensor):
        raise LMError(f"input_ids must be a LongTensor [batch, prompt], got {type(input_ids).__name__}")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32) or input_ids.shape[1] < 1:
        raise LMError(f"input_ids must be an integer tensor [batch, prompt >= 1], got {input_ids.dtype} "
                      f"{tuple(input_ids.shape)}")
    b, p = input_ids.shape
    if b != spec.batch:
        raise LMError(f"this LM was compiled for batch {spec.batch}, got input_ids of batch {b}; "
                      f"compile_lm(..., batch_size={b})")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise LMError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if p > spec.max_seq_len:
        raise LMError(f"the prompt has {p} tokens, more than max_seq_len={spec.max_seq_len}; shorten it or compile "
                      "with a larger max_seq_len")
    if p + max_new_tokens > spec.max_seq_len:
        raise LMError(f"prompt ({p}) + max_new_tokens ({max_new_tokens}) = {p + max_new_tokens} exceeds "
                      f"max_seq_len={spec.max_seq_len}; ask for at most {spec.max_seq_len - p} new tokens")
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= spec.vocab_size:
        raise LMError(f"token ids must be in [0, {spec.vocab_size}) (the vocabulary), got values in [{lo}, {hi}]")
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise LMError(f"temperature must be a number >= 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise LMError(f"top_k must be None or an int >= 1, got {top_k!r}")
    return input_ids.to("cpu", torch.long)


def _prefill(stepper, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    """Run the prompt through the prefill graph in chunks of ``chunk`` tokens; last-position logits [B, V].

    A last partial chunk is shifted back to end at the prompt's end (re-writing already cached positions with
    the same values) when the prompt is at least one chunk long, else padded (padding sits at positions after
    the prompt: masked now, overwritten by the decode steps)."""
    b, p = ids.shape
    start, logits = 0, None
    while start < p:
        end = min(start + chunk, p)
        if end - start == chunk:
            out = stepper.step("prefill", ids[:, start:end], torch.arange(start, end))
            logits = out[:, -1]
        elif p >= chunk:
            out = stepper.step("prefill", ids[:, p - chunk:p], torch.arange(p - chunk, p))
            logits = out[:, -1]
        else:
            pad = torch.zeros(b, chunk - (end - start), dtype=ids.dtype)
            out = stepper.step("prefill", torch.cat([ids[:, start:end], pad], 1), torch.arange(start, start + chunk))
            logits = out[:, end - start - 1]
        start = end
    return logits


class _HostCopy:
    """Token ids copied to the host without waiting for work queued after them: a CUDA tensor is copied into
    pinned memory behind an event, so the host can read it while the next decode step runs on the GPU."""

    def __init__(self, *tensors: torch.Tensor):
        self.event = None
        if tensors[0].device.type == "cpu":
            self.values = tensors
            return
        self.values = tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                            for t in tensors)
        self.event = torch.cuda.Event()
        self.event.record()

    def get(self) -> tuple:
        if self.event is not None:
            self.event.synchronize()
        return self.values


def generate_tokens(stepper, spec, input_ids, max_new_tokens=64, temperature=0.0, top_k=None, eos_token_id=None,
                    seed=None, on_token=None, stats: dict | None = None) -> torch.Tensor:
    """Greedy (temperature 0) or sampled generation; ``[B, prompt + new]`` (shorter when every row hit EOS).

    The next token is picked where the stepper leaves the logits (on the GPU for the torch and TVM steppers) and
    fed to the next step from there; the host reads a token (``on_token`` streaming, the EOS check) only after
    the next step is queued, so the GPU is not left idle while the host looks.  ``on_token(ids [B])`` is called
    per new token; ``stats`` receives ``ttft_s`` and ``decode_s``.  Sampling with ``seed`` is repeatable on the
    same device (the generator lives where the logits are)."""
    ids = check_request(input_ids, spec, max_new_tokens, temperature, top_k)
    b, p = ids.shape
    stepper.reset()
    t0 = time.perf_counter()
    logits = _prefill(stepper, ids, spec.prefill_chunk)
    gens: dict = {}  # one seeded generator per device the logits come from (prefill: host; decode: the stepper's)
    toks = []
    done = None
    t1 = None
    eos = None if eos_token_id is None else int(eos_token_id)
    for i in range(max_new_tokens):
        gen = None
        if seed is not None:
            gen = gens.get(str(logits.device))
            if gen is None:
                gen = gens[str(logits.device)] = torch.Generator(device=logits.device).manual_seed(int(seed))
        nxt = pick_next(logits, temperature, top_k, gen)
        if eos is not None:
            done = torch.zeros(b, dtype=torch.bool, device=nxt.device) if done is None else done.to(nxt.device)
            nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
            done = done | (nxt == eos)
        toks.append(nxt)
        look = None
        if on_token is not None or eos is not None or t1 is None:
            look = _HostCopy(*([nxt] if done is None else [nxt, done]))
        if i < max_new_tokens - 1:
            logits = stepper.decode(nxt, p + i)  # queued; the host goes on while it runs
        if look is None:
            continue
        host_nxt, *host_done = look.get()
        if t1 is None:
            t1 = time.perf_counter()
        if on_token is not None:
            on_token(host_nxt)
        if host_done and bool(host_done[0].all()):
            break
    # one copy to the host (the first token came from the host-side prefill logits), waits for the last token
    out = torch.cat([ids, torch.stack([t.to(toks[-1].device) for t in toks], 1).cpu()], 1)
    if stats is not None:
        t2 = time.perf_counter()
        stats.update(ttft_s=t1 - t0, decode_s=t2 - t1, new_tokens=len(toks))
    return out
