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

    @torch.no_grad()
    def decode(self, nxt: torch.Tensor, pos: int) -> torch.Tensor:
        """One decode step for tokens ``nxt`` ``[B]``: last-position logits ``[B, V]``, left on the device."""
        ids = nxt.reshape(self.spec.batch, 1).to(self.device, torch.long)
        out = self.graphs["decode"](ids, torch.full((1,), int(pos), dtype=torch.long, device=self.device), *self.caches)
        self.caches = list(out[1:])
        return out[0][:, -1]

    def save(self, d: Path) -> list[str]:
        """Each step as an fxcompress artifact (JSON graph + safetensors: loading runs no code from the files;
        ``torch.export.load`` could unpickle)."""
        from ..runtime.artifact import GRAPH_FILE, WEIGHTS_FILE, save_artifact

        files = []
        for kind, g in self.graphs.items():
            seq = self.spec.prefill_chunk if kind == "prefill" else 1
            save_artifact(g.cpu(), d / kind, example_inputs=example_inputs(self.spec, seq))
            g.to(self.device)
            files += [f"{kind}/{GRAPH_FILE}", f"{kind}/{WEIGHTS_FILE}", f"{kind}/manifest.json"]
        return files

    @classmethod
    def load(cls, d: Path, spec: LMSpec, device: str) -> "TorchSteps":
        from ..runtime.artifact import load_artifact

        graphs = {k: load_artifact(d / k) for k in ("prefill", "decode")}
        return cls(graphs, spec, device)
