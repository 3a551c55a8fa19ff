"""ONNX Runtime runner: an InferenceSession behind the :class:`~fxcompress.runtime.runner.Runner` interface.

``load_ort(path, device="cpu" | "cuda" | "cuda:N")`` opens the model with graph optimization level
``ORT_ENABLE_ALL`` (so blocked int4 DequantizeLinear + MatMul fuse into MatMulNBits), checks inputs
(count, dtype, rank, static dims) before ONNX Runtime sees them, and reports which op types ORT's
optimized graph holds (:meth:`OrtRunner.optimized_op_types`).  The CUDA path needs onnxruntime-gpu.

``matmulnbits_accuracy_level`` sets the compute precision of the MatMulNBits kernels that ORT fuses from
DequantizeLinear + MatMul (session config ``session.qdq_matmulnbits_accuracy_level``; it does not change
MatMulNBits nodes written in the file, which carry their own level: see ``export_onnx(accuracy_level=)``).
``None`` (the default) leaves ORT's own default, 4: int8 activations inside the kernel, faster than fp32 on
CPU, ~1e-2 relative error.  0 computes in fp32 and matches torch to ~1e-6, but is a trap for 8-bit
weights on CPU: ORT then dequantizes and runs a float GEMM, ~20x slower than the fp32 model.

``fold_weight_dequantize``: a weight-only integer model whose DequantizeLinear nodes feed no MatMul / Gemm
(convolutions: ONNX Runtime has no weight-only integer conv kernel, and no activation QuantizeLinear to form a
QLinearConv) would dequantize every weight on every run: ORT's constant folding skips DequantizeLinear while QDQ
fusion is on (a ResNet-18 on CPU ran ~6x slower than its fp32 export).  ``None`` (the default) detects that
case and turns QDQ handling off for the session (``session.disable_quant_qdq``), so the weights are dequantized
once, at load: integer on disk, float in memory, fp32 speed.  True / False force it on / off.
"""
from __future__ import annotations

import collections
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from .runner import Runner, RunnerInputError

__all__ = ["OrtRunner", "OrtLoadError", "load_ort"]

ORT_DTYPES = {
    "tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(double)": torch.float64,
    "tensor(bfloat16)": torch.bfloat16, "tensor(int64)": torch.int64, "tensor(int32)": torch.int32,
    "tensor(int16)": torch.int16, "tensor(int8)": torch.int8, "tensor(uint8)": torch.uint8,
    "tensor(bool)": torch.bool,
}
_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
           "all": "ORT_ENABLE_ALL"}


class OrtLoadError(ValueError):
    """The .onnx file is missing, corrupt / truncated, or ONNX Runtime cannot build a session for it."""


def _providers(device: str):
    import onnxruntime as ort

    dev = str(device)
    if dev == "cpu":
        return ["CPUExecutionProvider"]
    if dev == "cuda" or dev.startswith("cuda:"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise OrtLoadError(f"device={dev!r} needs onnxruntime-gpu (CUDAExecutionProvider); this onnxruntime "
                               f"{ort.__version__} has {ort.get_available_providers()}")
        idx = int(dev.split(":")[1]) if ":" in dev else 0
        return [("CUDAExecutionProvider", {"device_id": idx}), "CPUExecutionProvider"]
    raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")


class OrtRunner(Runner):
    backend = "ort"

    def __init__(self, path, device: str = "cpu", *, optimization: str = "all", intra_op_num_threads: int | None = None,
                 matmulnbits_accuracy_level: int | None = None, log_severity_level: int = 3,
                 fold_weight_dequantize: bool | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise OrtLoadError(f"no ONNX model at {self.path}")
        if optimization not in _LEVELS:
            raise ValueError(f"optimization must be one of {tuple(_LEVELS)}, got {optimization!r}")
        self._providers = _providers(device)
        self._opt = optimization
        self._threads = intra_op_num_threads
        if matmulnbits_accuracy_level not in (None, 0, 1, 2, 3, 4):
            raise ValueError(f"matmulnbits_accuracy_level must be None or 0..4, got {matmulnbits_accuracy_level!r}")
        self._acc = matmulnbits_accuracy_level
        self._log = log_severity_level
        if fold_weight_dequantize not in (None, True, False):
            raise ValueError(f"fold_weight_dequantize must be None, True or False, got {fold_weight_dequantize!r}")
        self.fold_weight_dequantize = (weight_only_conv_dequantize(self.path) if fold_weight_dequantize is None
                                       else fold_weight_dequantize)
        try:
            self.session = ort.InferenceSession(str(self.path), self._options(), providers=self._providers)
        except Exception as e:  # noqa: BLE001 - every ORT load failure becomes one clear error
            text = str(e).strip()
            hint = ""
            if "protobuf" in text.lower() or "parsing" in text.lower() or "ModelProto" in text:
                hint = " (the file is corrupt or truncated: not a readable ONNX protobuf)"
            raise OrtLoadError(f"onnxruntime could not load {self.path}{hint}: {text}") from None
        self._inputs = self.session.get_inputs()
        super().__init__(str(device), [i.name for i in self._inputs], [o.name for o in self.session.get_outputs()])

    def _options(self, optimized_path: str | None = None):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[self._opt])
        so.log_severity_level = self._log
        if self._threads:
            so.intra_op_num_threads = self._threads
        if self._acc is not None:
            so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(self._acc))
        if self.fold_weight_dequantize:
            so.add_session_config_entry("session.disable_quant_qdq", "1")
        if optimized_path:
            so.optimized_model_filepath = optimized_path
        return so

    # ---- inputs ---------------------------------------------------------------------------------------------
    def input_meta(self) -> list:
        """ONNX Runtime's ``NodeArg`` of each input (``.name``, ``.shape`` with None / str for dynamic dims, ``.type``)."""
        return list(self._inputs)

    def check_inputs(self, inputs) -> list[np.ndarray]:
        """Validate count, dtype, rank and static dims; returns numpy arrays for ORT."""
        if len(inputs) != len(self._inputs):
            raise RunnerInputError(f"{self.path.name} takes {len(self._inputs)} input(s) "
                                   f"{[i.name for i in self._inputs]}, got {len(inputs)}")
        arrays = []
        for meta, x in zip(self._inputs, inputs):
            if isinstance(x, np.ndarray):
                x = torch.from_numpy(x)
            if not isinstance(x, torch.Tensor):
                raise RunnerInputError(f"input {meta.name!r} must be a torch.Tensor, got {type(x).__name__}")
            want = ORT_DTYPES.get(meta.type)
            if want is not None and x.dtype != want:
                raise RunnerInputError(f"input {meta.name!r} must have dtype {want} ({meta.type}), got {x.dtype}")
            shape = list(meta.shape)
            if x.dim() != len(shape):
                raise RunnerInputError(f"input {meta.name!r} must have {len(shape)} dims {_fmt(shape)}, got shape "
                                       f"{tuple(x.shape)}")
            bad = [i for i, (d, s) in enumerate(zip(shape, x.shape)) if isinstance(d, int) and d >= 0 and d != s]
            if bad:
                raise RunnerInputError(f"input {meta.name!r} must have shape {_fmt(shape)}, got {tuple(x.shape)} "
                                       f"(dim {bad[0]} differs)")
            x = x.detach()
            if x.device.type != "cpu":
                x = x.cpu()
            arrays.append(x.contiguous().numpy() if x.dtype != torch.bfloat16 else x.float().numpy())
        return arrays

    def run(self, *inputs) -> list[torch.Tensor]:
        feeds = dict(zip(self.input_names, self.check_inputs(inputs)))
        outs = self.session.run(None, feeds)
        res = [torch.from_numpy(np.ascontiguousarray(o)) for o in outs]
        if self.device.startswith("cuda") and torch.cuda.is_available():
            res = [t.to(self.device) for t in res]
        return res

    # ---- what ORT made of the graph --------------------------------------------------------------------------
    def optimized_model(self):
        """The graph after ORT's optimizations for this device (an ``onnx.ModelProto``, weights not loaded)."""
        import onnx
        import onnxruntime as ort

        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "optimized.onnx")
            so = self._options(out)
            so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "weights.bin")
            so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
            ort.InferenceSession(str(self.path), so, providers=self._providers)
            return onnx.load(out, load_external_data=False)

    def optimized_op_types(self) -> collections.Counter:
        """Counter of op types in ORT's optimized graph, e.g. ``{"MatMulNBits": 7, ...}``."""
        return collections.Counter(n.op_type for n in self.optimized_model().graph.node)

    def op_types(self) -> collections.Counter:
        """Counter of op types in the model as written (before ORT's optimizations)."""
        import onnx

        return collections.Counter(n.op_type for n in onnx.load(str(self.path), load_external_data=False).graph.node)


def weight_only_conv_dequantize(path) -> bool:
    """True when the model's DequantizeLinear nodes all read initializers (weights) and none feeds a MatMul / Gemm,
    and it has no QuantizeLinear: nothing QDQ fusion could turn into an integer kernel (see the module doc)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - an unreadable file is reported by the session below
        return False
    g = model.graph
    inits = {i.name for i in g.initializer} | {n.output[0] for n in g.node if n.op_type == "Constant"}
    # a weight may pass an Identity / Reshape / Transpose on its way to its consumer
    passthrough = {"Identity", "Reshape", "Transpose", "Unsqueeze", "Squeeze", "Cast"}
    consumers = collections.defaultdict(list)
    for n in g.node:
        for i in n.input:
            consumers[i].append(n)

    def feeds_matmul(name, depth=0) -> bool:
        for c in consumers[name]:
            if c.op_type in ("MatMul", "Gemm") or (c.op_type in passthrough and depth < 4
                                                    and any(feeds_matmul(o, depth + 1) for o in c.output)):
                return True
        return False

    dq = [n for n in g.node if n.op_type == "DequantizeLinear"]
    if not dq or any(n.op_type == "QuantizeLinear" for n in g.node):
        return False
    return all(n.input[0] in inits for n in dq) and not any(feeds_matmul(n.output[0]) for n in dq)


def _fmt(shape) -> str:
    return "(" + ", ".join(str(d) if isinstance(d, int) else str(d or "?") for d in shape) + ")"


def load_ort(path, device: str = "cpu", **kwargs) -> OrtRunner:
    """Open an .onnx file with ONNX Runtime on ``device`` ("cpu", "cuda", "cuda:N")."""
    return OrtRunner(path, device, **kwargs)
