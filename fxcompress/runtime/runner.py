"""One interface over deployed models: :class:`Runner`, :func:`load` (by backend) and :func:`check_parity`.

A runner takes torch tensors and returns torch tensors: one tensor for a single-output model, else a tuple.
Backends register a loader with :func:`register_backend`; ``"ort"`` (ONNX Runtime) is built in.
"""
from __future__ import annotations

import copy
import importlib
import math
from dataclasses import dataclass, field
from typing import Callable

import torch


class RunnerInputError(ValueError):
    """Inputs given to a runner do not match the model's inputs (count, dtype or shape)."""


class Runner:
    """Base class: ``runner(*inputs)`` runs the deployed model.  Subclasses implement :meth:`run`."""

    backend: str = "base"

    def __init__(self, device: str, input_names: list[str], output_names: list[str]):
        self.device = device
        self.input_names = list(input_names)
        self.output_names = list(output_names)

    def run(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    def __call__(self, *inputs: torch.Tensor):
        outs = self.run(*inputs)
        return outs[0] if len(outs) == 1 else tuple(outs)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(backend={self.backend!r}, device={self.device!r}, "
                f"inputs={self.input_names}, outputs={self.output_names})")


_LOADERS: dict[str, Callable] = {}
# the built-in backends, imported when first asked for (one table: no module imports another to register it)
_BUILTIN = {"ort": ("fxcompress.runtime.ort", "load_ort"), "tvm": ("fxcompress.runtime.tvm_runner", "load_tvm")}


def register_backend(name: str, loader: Callable) -> None:
    """Make ``load_runner(path, backend=name, device=..., **kw)`` call ``loader(path, device=..., **kw)``."""
    _LOADERS[name] = loader


def backends() -> list[str]:
    return sorted(set(_LOADERS) | set(_BUILTIN))


def load_runner(path, backend: str = "ort", device: str = "cpu", **kwargs) -> Runner:
    """Load a deployed model as a :class:`Runner` with the named backend ("ort"; others register)."""
    if backend not in _LOADERS and backend in _BUILTIN:
        mod, fn = _BUILTIN[backend]
        _LOADERS[backend] = getattr(importlib.import_module(mod), fn)
    if backend not in _LOADERS:
        raise ValueError(f"backend must be one of {backends()}, got {backend!r}")
    return _LOADERS[backend](path, device=device, **kwargs)


# ----------------------------------------------------------------------------------------------------------


@dataclass
class OutputParity:
    name: str
    shape: tuple
    max_abs: float
    max_rel: float  # max |a - b| / max |reference|

    def __str__(self) -> str:
        return f"{self.name:<16} {'x'.join(map(str, self.shape)) or 'scalar':<14} {self.max_abs:>11.3e} {self.max_rel:>11.3e}"


@dataclass
class ParityReport:
    outputs: list[OutputParity] = field(default_factory=list)
    backend: str = ""
    device: str = ""

    @property
    def max_abs(self) -> float:
        return max((o.max_abs for o in self.outputs), default=0.0)

    @property
    def max_rel(self) -> float:
        return max((o.max_rel for o in self.outputs), default=0.0)

    def ok(self, atol: float = 1e-4, rtol: float = 1e-4) -> bool:
        """True when every output is within ``atol`` absolute or ``rtol`` relative (to its max magnitude)."""
        return all(o.max_abs <= atol or o.max_rel <= rtol for o in self.outputs)

    def __str__(self) -> str:
        head = f"parity {self.backend}/{self.device} vs torch\n{'output':<16} {'shape':<14} {'max abs':>11} {'max rel':>11}"
        return "\n".join([head] + [str(o) for o in self.outputs])


def _leaves(x) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(x) if isinstance(t, torch.Tensor)]


@torch.no_grad()
def check_parity(model: torch.nn.Module, runner: Runner, example_inputs) -> ParityReport:
    """Run ``model`` (in eval mode, on a copy) and ``runner`` on the same inputs and compare every output."""
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    ref_model = copy.deepcopy(model).eval()
    dev = next((p.device for p in ref_model.parameters()), torch.device("cpu"))
    ref = _leaves(ref_model(*[a.to(dev) for a in args]))
    got = _leaves(runner(*args))
    if len(ref) != len(got):
        raise ValueError(f"the model has {len(ref)} outputs, the {runner.backend} runner returned {len(got)}")
    names = getattr(runner, "output_names", None) or [f"output_{i}" for i in range(len(ref))]
    rep = ParityReport(backend=runner.backend, device=runner.device)
    for name, r, g in zip(names, ref, got):
        r = r.detach().cpu().double()
        g = g.detach().cpu().double()
        if r.shape != g.shape:
            raise ValueError(f"output {name!r}: torch shape {tuple(r.shape)} != {runner.backend} shape "
                             f"{tuple(g.shape)}")
        diff = (r - g).abs().max().item() if r.numel() else 0.0
        scale = r.abs().max().item() if r.numel() else 0.0
        rel = diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)
        rep.outputs.append(OutputParity(name, tuple(r.shape), diff, rel))
    return rep


def benchmark(runner: Callable, inputs, warmup: int = 10, iters: int = 50, min_time_s: float = 0.0) -> dict:
    """Latency of ``runner(*inputs)`` in milliseconds: median, mean, p10, p90 over ``iters`` timed runs."""
    import statistics
    import time

    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"benchmark needs iters >= 1 timed runs, got {iters!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"benchmark needs warmup >= 0, got {warmup!r}")
    args = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    for _ in range(warmup):
        runner(*args)
    times = []
    t_start = time.perf_counter()
    while len(times) < iters or time.perf_counter() - t_start < min_time_s:
        t0 = time.perf_counter()
        runner(*args)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))]  # noqa: E731
    return {"median_ms": statistics.median(times), "mean_ms": statistics.fmean(times), "p10_ms": q(0.1),
            "p90_ms": q(0.9), "iters": len(times)}
