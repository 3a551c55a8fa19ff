"""TVM stepper: Relax builds of the prefill and decode graphs (``fxcompress.backends.tvm.build_tvm``: packed
integer linears, the hand-written int4 GEMV / tensor-core kernels on CUDA); the caches are TVM tensors on the
device, fed from one step's outputs to the next.  On CUDA, ``cuda_graph=True`` (the default) builds under
``relax.backend.use_cuda_graph`` (the static-shape steps captured and replayed as CUDA graphs)."""
from __future__ import annotations

from pathlib import Path

import torch

from .errors import LMError
from .steps import LMSpec, empty_caches, example_inputs

__all__ = ["TVMSteps", "build_steps_tvm"]


def _flatten(res) -> list:
    """The VM's (nested) tuple of output tensors as a flat list."""
    if isinstance(res, (list, tuple)) or type(res).__name__ in ("Array", "ADT", "Tuple"):
        out = []
        for r in res:
            out += _flatten(r)
        return out
    return [res]


def _check_device(device: str):
    import tvm

    dev = str(device)
    if dev == "cpu":
        return tvm.cpu(0), "llvm"
    if dev == "cuda" or dev.startswith("cuda:"):
        idx = int(dev.split(":")[1]) if ":" in dev else 0
        d = tvm.cuda(idx)
        if not d.exist:
            raise LMError(f"backend='tvm', device={dev!r}: TVM sees no CUDA GPU {idx} on this machine "
                          "(tvm.cuda(0).exist is False); use device='cpu' here")
        return d, "cuda"
    raise LMError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")


def build_steps_tvm(graphs: dict, spec: LMSpec, device: str, dtype=None, *, cuda_graph: bool = True) -> dict:
    """``{"prefill": executable, "decode": executable}`` built for ``device``'s target (``cuda_graph``: capture
    the static-shape steps as CUDA graphs, CUDA only)."""
    import tvm

    from ..backends.tvm import build_tvm

    _, target = _check_device(device)
    out = {}
    cfg = {"relax.backend.use_cuda_graph": True} if (target == "cuda" and cuda_graph) else {}
    for kind, g in graphs.items():
        seq = spec.prefill_chunk if kind == "prefill" else 1
        with tvm.transform.PassContext(opt_level=3, config=cfg):
            out[kind] = build_tvm(g, example_inputs(spec, seq), target=target).executable
    return out


class TVMSteps:
    backend = "tvm"

    def __init__(self, executables: dict, spec: LMSpec, device: str = "cpu"):
        from tvm import relax

        self.spec, self.device = spec, device
        self._dev, _ = _check_device(device)
        self.executables = executables
        self.vms = {k: relax.VirtualMachine(ex, self._dev) for k, ex in executables.items()}
        self.caches = None
        self._inputs: dict = {}  # kind -> (ids, pos) device tensors, allocated once and refilled per step

    def _to_tvm(self, x: torch.Tensor):
        import tvm

        return tvm.runtime.tensor(x.detach().cpu().contiguous().numpy(), self._dev)  # a host->device copy

    def reset(self):  # zeroed caches, copied to the device once per request
        self.caches = [self._to_tvm(c) for c in empty_caches(self.spec)]

    def _fill(self, kind: str, ids: torch.Tensor, pos: torch.Tensor):
        """The step's inputs copied into device tensors allocated once per step kind: a fresh ``tvm.runtime.tensor``
        per token is a device allocation (and free) per input per token, and the shapes never change."""
        host = [t.detach().cpu().contiguous().numpy() for t in (ids, pos)]
        bufs = self._inputs.get(kind)
        if bufs is None or any(tuple(b.shape) != h.shape or str(b.dtype) != str(h.dtype) for b, h in zip(bufs, host)):
            bufs = self._inputs[kind] = [self._to_tvm(t) for t in (ids, pos)]
            return bufs
        for b, h in zip(bufs, host):
            b.copyfrom(h)
        return bufs

    def step(self, kind: str, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        res = _flatten(self.vms[kind]["main"](*self._fill(kind, ids, pos), *self.caches))
        self.caches = res[1:]  # stay on the device
        return torch.from_dlpack(res[0]).float().cpu()

    def save(self, d: Path) -> list[str]:
        files = []
        for kind, ex in self.executables.items():
            ex.export_library(str(d / f"{kind}.so"))
            files.append(f"{kind}.so")
        return files

    @classmethod
    def load(cls, d: Path, spec: LMSpec, device: str) -> "TVMSteps":
        import tvm

        _check_device(device)
        exs = {k: tvm.runtime.load_module(str(d / f"{k}.so")) for k in ("prefill", "decode")}
        return cls(exs, spec, device)
