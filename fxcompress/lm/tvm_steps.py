"""TVM stepper: Relax builds of the prefill and decode graphs (``fxcompress.backends.tvm.build_tvm``: packed
integer linears, the hand-written int4 GEMV / tensor-core kernels on CUDA); the caches are TVM tensors on the
device, donated to both steps (written in place, the same buffers for a whole request).  On CUDA,
``cuda_graph=True`` (the default) captures the whole decode step in one CUDA graph at its first use and builds
the prefill step under ``relax.backend.use_cuda_graph``."""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

from .attention import with_fused_decode_attention
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


def build_steps_tvm(graphs: dict, spec: LMSpec, device: str, dtype=None, *, cuda_graph: bool = True,
                    config=None) -> dict:
    """``{"prefill": executable, "decode": executable}`` built for ``device``'s target.

    The caches are donated (``build_tvm(donate=...)``): each step writes its keys / values into the cache buffers
    it is given and returns those buffers.  ``cuda_graph`` (CUDA only): the prefill step is built with
    ``relax.backend.use_cuda_graph``; the decode step is built without it, because :class:`TVMSteps` captures the
    whole decode step in one CUDA graph itself (Relax's rewrite leaves every kernel that reads a function input,
    the caches and positions, outside its graphs: 36 separate launches and 14 graph launches per token on the
    2048-wide model).  Each attention of the decode step is one kernel that also writes the caches
    (:func:`~fxcompress.lm.attention.with_fused_decode_attention`); the prefill step's are the decomposed ops."""
    import tvm

    from ..backends.tvm import build_tvm

    _, target = _check_device(device)
    out = {}
    donate = spec.input_names[2:]
    for kind, g in graphs.items():
        seq = spec.prefill_chunk if kind == "prefill" else 1
        relax_graphs = target == "cuda" and cuda_graph and kind == "prefill"
        cfg = {"relax.backend.use_cuda_graph": True} if relax_graphs else {}
        g, fused = with_fused_decode_attention(g, donate)
        if kind == "decode" and fused < len(spec.cache):
            warnings.warn(f"TVM decode step: {len(spec.cache) - fused} of {len(spec.cache)} attention layers do not "
                          f"match the fused decode-attention kernel (a cache read by another op, or not donated) and "
                          f"run as separate kernels (slower, same results)", stacklevel=2)
        with tvm.transform.PassContext(opt_level=3, config=cfg):
            out[kind] = build_tvm(g, example_inputs(spec, seq), target=target, config=config,
                                  donate=donate).executable
    return out


class TVMSteps:
    """Runs the two built steps.  The caches are device tensors allocated once and updated in place by both
    steps (zeroed per request).  On CUDA with ``cuda_graph=True``, the decode step (the VM call) is captured
    once in a torch CUDA graph (``tvm_ffi.use_torch_stream``) reading fixed input buffers, and replayed per
    token; if capture fails, the VM is called per token and ``graph_status`` says why."""

    backend = "tvm"

    def __init__(self, executables: dict, spec: LMSpec, device: str = "cpu", cuda_graph: bool = True):
        from tvm import relax

        self.spec, self.device = spec, device
        self._dev, target = _check_device(device)
        self._cuda = target == "cuda"
        self.executables = executables
        self.vms = {k: relax.VirtualMachine(ex, self._dev) for k, ex in executables.items()}
        self.caches = None
        self._inputs: dict = {}  # kind -> (ids, pos) device tensors, allocated once and refilled per step
        self._use_graph = bool(cuda_graph) and self._cuda
        self._graph = None
        self._graph_logits = None
        self.graph_status = "not captured yet" if self._use_graph else "off"

    def _to_tvm(self, x: torch.Tensor):
        import tvm

        return tvm.runtime.tensor(x.detach().cpu().contiguous().numpy(), self._dev)  # a host->device copy

    def _stream(self):
        """TVM launches on torch's current CUDA stream (so torch ops on the outputs are ordered after them)."""
        import contextlib

        if not self._cuda:
            return contextlib.nullcontext()
        import tvm_ffi

        return tvm_ffi.use_torch_stream()

    def reset(self):
        """Zeroed caches: allocated on the first request, zeroed in place afterwards (a captured decode graph
        keeps reading the same buffers)."""
        if self.caches is None:
            self.caches = [self._to_tvm(c) for c in empty_caches(self.spec)]
            return
        for c in self.caches:
            torch.from_dlpack(c).zero_()

    def _bufs(self, kind: str, ids_shape, pos_shape):
        bufs = self._inputs.get(kind)
        if bufs is None or tuple(bufs[0].shape) != tuple(ids_shape) or tuple(bufs[1].shape) != tuple(pos_shape):
            bufs = [self._to_tvm(torch.zeros(ids_shape, dtype=torch.long)),
                    self._to_tvm(torch.zeros(pos_shape, dtype=torch.long))]
            self._inputs[kind] = bufs + [torch.from_dlpack(b) for b in bufs]
        return self._inputs[kind]

    def _fill(self, kind: str, ids: torch.Tensor, pos: torch.Tensor):
        """The step's inputs copied into device tensors allocated once per step kind: a fresh ``tvm.runtime.tensor``
        per token is a device allocation (and free) per input per token, and the shapes never change."""
        ids_b, pos_b, ids_t, pos_t = self._bufs(kind, tuple(ids.shape), tuple(pos.shape))
        ids_t.copy_(ids.to(torch.long))
        pos_t.copy_(pos.to(torch.long))
        return [ids_b, pos_b]

    def _call(self, kind: str, bufs):
        with self._stream():
            res = _flatten(self.vms[kind]["main"](*bufs, *self.caches))
        return res

    def step(self, kind: str, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, T, V]`` on the host (the caches are updated on the device)."""
        res = self._call(kind, self._fill(kind, ids, pos))
        return torch.from_dlpack(res[0]).float().cpu()

    def _capture(self, bufs):
        """Capture the decode VM call in a torch CUDA graph (after two warm-up calls, so that every buffer the VM
        allocates comes from its pool, not from cudaMalloc, which capture forbids)."""
        import tvm_ffi

        saved = [torch.from_dlpack(c).clone() for c in self.caches]
        try:
            for _ in range(2):
                self._call("decode", bufs)
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with tvm_ffi.use_torch_stream(torch.cuda.graph(g)):
                res = _flatten(self.vms["decode"]["main"](*bufs, *self.caches))
            self._graph, self._graph_res = g, res  # res keeps the logits buffer the graph writes alive
            self._graph_logits = torch.from_dlpack(res[0])
            self.graph_status = "captured"
        except Exception as e:  # noqa: BLE001 - any capture failure: run the VM per token instead
            self._graph, self._use_graph = None, False
            self.graph_status = f"capture failed, VM call per token: {type(e).__name__}: {str(e)[:200]}"
            torch.cuda.synchronize()
        for c, s in zip(self.caches, saved):  # the warm-up / capture calls wrote into the caches
            torch.from_dlpack(c).copy_(s)

    def decode(self, nxt: torch.Tensor, pos: int) -> torch.Tensor:
        """One decode step for tokens ``nxt`` ``[B]`` (host or device) at position ``pos``: last-position logits
        ``[B, V]``, left on the device (the next token is picked there; nothing is copied to the host)."""
        ids_b, pos_b, ids_t, pos_t = self._bufs("decode", (self.spec.batch, 1), (1,))
        ids_t.copy_(nxt.reshape(self.spec.batch, 1).to(torch.long), non_blocking=True)
        pos_t.fill_(int(pos))
        if self._use_graph:
            if self._graph is None:
                self._capture([ids_b, pos_b])
            if self._graph is not None:
                self._graph.replay()
                return self._graph_logits[:, -1]
        res = self._call("decode", [ids_b, pos_b])
        return torch.from_dlpack(res[0])[:, -1]

    def save(self, d: Path) -> list[str]:
        files = []
        for kind, ex in self.executables.items():
            ex.export_library(str(d / f"{kind}.so"))
            files.append(f"{kind}.so")
        return files

    @classmethod
    def load(cls, d: Path, spec: LMSpec, device: str, cuda_graph: bool = True) -> "TVMSteps":
        import tvm

        _check_device(device)
        exs = {k: tvm.runtime.load_module(str(d / f"{k}.so")) for k in ("prefill", "decode")}
        return cls(exs, spec, device, cuda_graph=cuda_graph)
