"""A minimal causal-LM fine-tuning loop and perplexity, shared by the CLI and tools/.

Any loop works with a prepared L4Q model; this one exists so that ``fxcompress l4q`` and the
evaluation scripts train and measure the same way.
"""
from __future__ import annotations

import math
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .passes.l4q import l4q_param_groups


def lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy of ``model(ids[:, :-1])`` against ``ids[:, 1:]``."""
    logits = model(ids[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def token_batches(ids: torch.Tensor, seq_len: int, batch: int, *, shuffle: bool, seed: int = 0) -> Iterator:
    """Endless (shuffle=True) or single-pass batches of ``seq_len + 1`` token windows from a 1-D id tensor."""
    n = (ids.numel() - 1) // seq_len
    if n < 1:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than seq_len + 1 = {seq_len + 1}")
    starts = torch.arange(n) * seq_len
    g = torch.Generator().manual_seed(seed)
    while True:
        order = starts[torch.randperm(n, generator=g)] if shuffle else starts
        for i in range(0, n, batch):
            chunk = order[i:i + batch]
            yield torch.stack([ids[s:s + seq_len + 1] for s in chunk.tolist()])
        if not shuffle:
            return


def train_lm(model, batches: Iterable[torch.Tensor], steps: int, *, lora_lr: float = 2e-4, quant_lr: float = 1e-5,
             device="cpu", progress: bool = True, log_every: int = 0) -> list[float]:
    """Train the L4Q parameters of ``model`` for ``steps`` batches with AdamW; returns the loss curve."""
    opt = torch.optim.AdamW(l4q_param_groups(model, lora_lr, quant_lr), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, steps // 10)))
    model.train()
    losses = []
    it = iter(batches)
    bar = tqdm(range(steps), desc="l4q", unit="step", disable=not progress)
    for step in bar:
        ids = next(it).to(device)
        loss = lm_loss(model, ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if log_every and step % log_every == 0 and not progress:
            print(f"step {step}: loss {losses[-1]:.4f}", flush=True)
    model.eval()
    return losses


@torch.no_grad()
def perplexity(model, batches: Iterable[torch.Tensor], device="cpu") -> float:
    """exp(mean next-token cross entropy) over all tokens of ``batches``."""
    total, count = 0.0, 0
    for ids in batches:
        ids = ids.to(device)
        n = ids[:, 1:].numel()
        total += lm_loss(model, ids).item() * n
        count += n
    return math.exp(total / count)
