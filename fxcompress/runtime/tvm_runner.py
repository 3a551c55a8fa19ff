"""TVM runner: a Relax VirtualMachine behind the :class:`~fxcompress.runtime.runner.Runner` interface.

``TVMRunner`` takes / returns torch tensors (zero-copy through DLPack), checks inputs against the shapes
and dtypes the model was built for, and writes ``export_library(path)``: the compiled library plus a
``path + ".json"`` sidecar (format version, target, inputs, outputs, packed layers).
``load_tvm(path, device="cpu" | "cuda" | "cuda:N")`` (``runtime.load_runner(path, backend="tvm")``) reads both.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .native_logs import drop_native_stderr
from .runner import Runner, RunnerInputError

__all__ = ["TVMRunner", "TVMLoadError", "load_tvm", "export_build"]

FORMAT_VERSION = 1
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
           "int64": torch.int64, "int32": torch.int32, "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool}


class TVMLoadError(ValueError):
    """The library or its sidecar is missing / unreadable, or the device is not available."""


def _device(device: str):
    import tvm

    dev = str(device)
    if dev == "cpu":
        return tvm.cpu(0)
    if dev == "cuda" or dev.startswith("cuda:"):
        idx = int(dev.split(":")[1]) if ":" in dev else 0
        d = tvm.cuda(idx)
        if not d.exist:
            raise TVMLoadError(f"device={dev!r}: TVM sees no CUDA GPU {idx} on this machine")
        return d
    raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")


class TVMRunner(Runner):
    backend = "tvm"

    def __init__(self, executable, device: str = "cpu", info: dict | None = None, *, build=None):
        from tvm import relax

        info = dict(info or {})
        self.info = info
        self.build = build
        self.executable = executable
        self._dev = _device(device)
        kind = "cuda" if str(device).startswith("cuda") else "llvm"
        built_for = info.get("target")
        if built_for and built_for != kind:
            raise TVMLoadError(f"this library was built for target {built_for!r}, it cannot run on device "
                               f"{device!r}")
        with drop_native_stderr():
            self.vm = relax.VirtualMachine(executable, self._dev)
        self._inputs = info.get("inputs", [])
        super().__init__(str(device), [i["name"] for i in self._inputs] or ["input_0"],
                         info.get("outputs") or ["output_0"])

    # ---- inputs ---------------------------------------------------------------------------------------------
    def check_inputs(self, inputs) -> list[torch.Tensor]:
        if self._inputs and len(inputs) != len(self._inputs):
            raise RunnerInputError(f"the TVM model takes {len(self._inputs)} input(s) {self.input_names}, "
                                   f"got {len(inputs)}")
        out = []
        for i, x in enumerate(inputs):
            if isinstance(x, np.ndarray):
                x = torch.from_numpy(x)
            if not isinstance(x, torch.Tensor):
                raise RunnerInputError(f"input {i} must be a torch.Tensor, got {type(x).__name__}")
            if self._inputs:
                meta = self._inputs[i]
                want = _DTYPES.get(meta["dtype"])
                if want is not None and x.dtype != want:
                    raise RunnerInputError(f"input {meta['name']!r} must have dtype {want}, got {x.dtype}")
                if list(x.shape) != list(meta["shape"]):
                    raise RunnerInputError(f"input {meta['name']!r} must have shape {tuple(meta['shape'])} "
                                           f"(TVM builds for static shapes), got {tuple(x.shape)}")
            out.append(x.detach())
        return out

    def _to_tvm(self, x: torch.Tensor):
        import tvm

        want = "cuda" if self._dev.dlpack_device_type() == 2 else "cpu"
        if want == "cuda":
            x = x.to(f"cuda:{self._dev.index}")
        elif x.device.type != "cpu":
            x = x.cpu()
        return tvm.runtime.from_dlpack(x.contiguous())

    def run(self, *inputs) -> list[torch.Tensor]:
        args = [self._to_tvm(x) for x in self.check_inputs(inputs)]
        res = self.vm["main"](*args)
        return [torch.from_dlpack(t) for t in _flatten(res)]

    # ---- artifacts ------------------------------------------------------------------------------------------
    def export_library(self, path) -> Path:
        """Write the compiled library to ``path`` and its metadata to ``path + '.json'``."""
        return _export(self.executable, self.info, path)

    def time_evaluator(self, *inputs, number: int = 10, repeat: int = 30, min_repeat_ms: int = 0):
        """TVM's own timer over ``main`` (seconds per call: ``.median``, ``.mean``, ``.results``)."""
        args = [self._to_tvm(x) for x in self.check_inputs(inputs)]
        f = self.vm.time_evaluator("main", self._dev, number=number, repeat=repeat, min_repeat_ms=min_repeat_ms)
        return f(*args)


def _flatten(res) -> list:
    import tvm

    if isinstance(res, (list, tuple)) or type(res).__name__ in ("Array", "Tuple"):
        out = []
        for r in res:
            out.extend(_flatten(r))
        return out
    if hasattr(res, "__dlpack__") or isinstance(res, tvm.runtime.Tensor):
        return [res]
    try:
        return [r for item in res for r in _flatten(item)]
    except TypeError:
        return [res]


def _export(executable, info: dict, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with drop_native_stderr():
        executable.export_library(str(path))
    meta = {"format": "fxcompress-tvm", "format_version": FORMAT_VERSION, **info}
    Path(str(path) + ".json").write_text(json.dumps(meta, indent=1, default=str))
    return path


def export_build(build, path) -> Path:
    """Write a :class:`~fxcompress.backends.tvm.TVMBuild` (no device needed) like ``export_library``."""
    return _export(build.executable, build.info, path)


def load_tvm(path, device: str = "cpu", **_) -> TVMRunner:
    """Load a library written by :meth:`TVMRunner.export_library` on ``device``."""
    import tvm

    path = Path(path)
    if not path.is_file():
        raise TVMLoadError(f"no TVM library at {path}")
    side = Path(str(path) + ".json")
    info = {}
    if side.is_file():
        info = json.loads(side.read_text())
        if info.get("format_version", 0) > FORMAT_VERSION:
            raise TVMLoadError(f"{side} has format_version {info.get('format_version')}; this fxcompress reads "
                               f"<= {FORMAT_VERSION}")
    try:
        with drop_native_stderr():
            mod = tvm.runtime.load_module(str(path))
    except Exception as e:  # noqa: BLE001
        raise TVMLoadError(f"TVM could not load {path}: {str(e).strip().splitlines()[-1] if str(e).strip() else e}") \
            from None
    return TVMRunner(mod, device, info)
