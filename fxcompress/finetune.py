"""A minimal causal-LM fine-tuning loop and perplexity, shared by the CLI and tools/.

Any loop works with a prepared L4Q model; this one exists so that ``fxcompress l4q`` and the
evaluation scripts train and measure the same way.
"""
from __future__ import annotations

import math
import itertools
from typing import Iterable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .passes.l4q import l4q_param_groups


def lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy of ``model(ids[:, :-1])`` against ``ids[:, 1:]``."""
    logits = model(ids[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def train_lm(model, batches: Iterable[torch.Tensor], steps: int, *, lora_lr: float = 2e-4, quant_lr: float = 1e-5,
             device="cpu", progress: bool = True, log_every: int = 0, param_groups: list | None = None) -> list[float]:
    """Train the L4Q parameters of ``model`` for ``steps`` batches (``batches`` is cycled) with AdamW
    and a 10% linear warm-up; returns the loss curve.  ``param_groups`` (optimizer groups) replaces the
    L4Q groups, e.g. to train a peft LoRA model with the same loop, data order and schedule."""
    groups = l4q_param_groups(model, lora_lr, quant_lr) if param_groups is None else param_groups
    if not any(p.requires_grad for g in groups for p in g["params"]):
        raise ValueError("train_lm: nothing to train (no L4QLinear layer and no param_groups given); "
                         "prepare the model with fxcompress.prepare_l4q or pass param_groups")
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, steps // 10)))
    model.train()
    losses = []
    it = itertools.cycle(batches)
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
def perplexity(model, batches: Iterable[torch.Tensor], device=None) -> float:
    """exp(mean next-token cross entropy) over ``batches`` of windows ``[b, t]`` (each predicts its t-1 tokens)."""
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    total, count = 0.0, 0
    for ids in batches:
        ids = ids.to(device)
        n = ids[:, 1:].numel()
        total += lm_loss(model, ids).item() * n
        count += n
    if count == 0:
        raise ValueError("perplexity needs at least one batch of windows with 2+ tokens")
    return math.exp(total / count)
