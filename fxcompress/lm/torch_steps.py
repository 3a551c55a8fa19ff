"""PyTorch stepper: the rewritten GraphModules run eagerly, the caches stay torch tensors on the device."""
from __future__ import annotations

from pathlib import Path

import torch

from .steps import LMSpec, empty_caches, example_inputs

__all__ = ["TorchSteps"]


class TorchSteps:
    backend = "torch"

    def __init__(self, graphs: dict, spec: LMSpec, device: str = "cpu"):
        self.spec, self.device = spec, torch.device(device)
        self.graphs = {k: g.to(self.device) for k, g in graphs.items()}
        self.caches = None

    def reset(self):
        self.caches = empty_caches(self.spec, self.device)

    @torch.no_grad()
    def step(self, kind: str, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        out = self.graphs[kind](ids.to(self.device), pos.to(self.device), *self.caches)
        self.caches = list(out[1:])
        return out[0].float().cpu()

    def save(self, d: Path) -> list[str]:
        files = []
        for kind, g in self.graphs.items():
            seq = self.spec.prefill_chunk if kind == "prefill" else 1
            ep = torch.export.export(g, example_inputs(self.spec, seq, self.device), strict=False)
            torch.export.save(ep, d / f"{kind}.pt2")
            files.append(f"{kind}.pt2")
        return files

    @classmethod
    def load(cls, d: Path, spec: LMSpec, device: str) -> "TorchSteps":
        graphs = {k: torch.export.load(d / f"{k}.pt2").module() for k in ("prefill", "decode")}
        return cls(graphs, spec, device)
