"""ONNX Runtime stepper: prefill / decode ONNX graphs with past (``k_cache_i`` / ``v_cache_i``) and present
(``present_k_i`` / ``present_v_i``) key-values; the caches live in OrtValues on the session's device and are
bound with IO binding (two buffer sets, swapped each step: no host copy of the cache between tokens).
Integer weights are exported by :func:`fxcompress.export_onnx` (``MatMulNBits`` or blocked QDQ)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .errors import LMError
from .steps import LMSpec, example_inputs

__all__ = ["OrtSteps", "export_steps_onnx"]

_NP = {"float32": np.float32, "float16": np.float16}


def export_steps_onnx(graphs: dict, spec: LMSpec, d: Path, weight_format: str = "matmulnbits",
                      accuracy_level: int | None = None, float16: bool = False) -> list[str]:
    """Write ``prefill.onnx`` / ``decode.onnx`` (``accuracy_level`` None: export_onnx's default, 4; fp32 graphs;
    ``float16`` converts activations, float weights and the caches to fp16 afterwards with
    :func:`fxcompress.backends.onnx.to_float16`: for the CUDA EP)."""
    import onnx

    from ..backends.onnx import export_onnx
    from ..backends.onnx import to_float16

    files = []
    for kind, g in graphs.items():
        seq = spec.prefill_chunk if kind == "prefill" else 1
        export_onnx(g, example_inputs(spec, seq), d / f"{kind}.onnx", weight_format=weight_format,
                    accuracy_level=accuracy_level, dynamic_batch=False, input_names=spec.input_names,
                    output_names=spec.output_names)
        if float16:
            onnx.save(to_float16(onnx.load(str(d / f"{kind}.onnx"))), str(d / f"{kind}.onnx"))
        files.append(f"{kind}.onnx")
    return files + [_share_weights(d, files)]


WEIGHTS = "weights.bin"


def _share_weights(d: Path, files: list[str]) -> str:
    """Move the initializers of both graphs into one external-data file, each distinct tensor stored once
    (prefill and decode hold the same weights: without this the directory holds them twice)."""
    import hashlib

    import onnx
    from onnx.external_data_helper import set_external_data

    where: dict[tuple, tuple[int, int]] = {}
    with open(d / WEIGHTS, "wb") as f:
        for fn in files:
            m = onnx.load(str(d / fn))
            for t in m.graph.initializer:
                if not t.HasField("raw_data") or len(t.raw_data) < 1024:
                    continue
                raw = t.raw_data
                key = (t.name, hashlib.sha256(raw).hexdigest())
                if key not in where:
                    f.write(b"\0" * (-f.tell() % 4096))  # page-aligned offsets (ORT may memory-map them)
                    where[key] = (f.tell(), len(raw))
                    f.write(raw)
                off, n = where[key]
                set_external_data(t, WEIGHTS, offset=off, length=n)
                t.data_location = onnx.TensorProto.EXTERNAL
                t.ClearField("raw_data")
            onnx.save(m, str(d / fn))
    return WEIGHTS


def _providers(device: str):
    import onnxruntime as ort

    if str(device).startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise LMError(f"device={device!r} needs onnxruntime-gpu (CUDAExecutionProvider); this onnxruntime has "
                          f"{ort.get_available_providers()}")
        idx = int(str(device).split(":")[1]) if ":" in str(device) else 0
        return [("CUDAExecutionProvider", {"device_id": idx})], ("cuda", idx)
    if device != "cpu":
        raise LMError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    return ["CPUExecutionProvider"], ("cpu", 0)


class OrtSteps:
    backend = "ort"

    def __init__(self, d: Path, spec: LMSpec, device: str = "cpu", threads: int | None = None):
        import onnxruntime as ort

        self.spec, self.device = spec, device
        providers, (self._dev_type, self._dev_id) = _providers(device)
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = int(threads)
        self.sessions = {k: ort.InferenceSession(str(d / f"{k}.onnx"), so, providers=providers)
                         for k in ("prefill", "decode")}
        self._sets = None

    def _cache_values(self):
        import onnxruntime as ort

        return [ort.OrtValue.ortvalue_from_shape_and_type([self.spec.batch, kvh, self.spec.max_seq_len, hd],
                                                          _NP[dt], self._dev_type, self._dev_id)
                for kvh, hd, dt in self.spec.cache for _ in "kv"]

    def reset(self):
        if self._sets is None:
            self._sets = [self._cache_values(), self._cache_values()]
        layout = [dt for _, _, dt in self.spec.cache for _ in "kv"]
        for v, dt in zip(self._sets[0], layout):  # zero the caches once per request
            v.update_inplace(np.zeros(v.shape(), dtype=_NP[dt]))
        self._cur = 0

    def step(self, kind: str, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        sess = self.sessions[kind]
        b = sess.io_binding()
        b.bind_cpu_input("input_ids", np.ascontiguousarray(ids.numpy().astype(np.int64)))
        b.bind_cpu_input("cache_position", np.ascontiguousarray(pos.numpy().astype(np.int64)))
        src, dst = self._sets[self._cur], self._sets[1 - self._cur]
        names = self.spec.input_names[2:]
        for name, v in zip(names, src):
            b.bind_ortvalue_input(name, v)
        b.bind_output("logits", "cpu")
        for name, v in zip(self.spec.output_names[1:], dst):
            b.bind_ortvalue_output(name, v)
        sess.run_with_iobinding(b)
        self._cur = 1 - self._cur
        return torch.from_numpy(b.get_outputs()[0].numpy()).float()  # only the logits leave the device

    def decode(self, nxt: torch.Tensor, pos: int) -> torch.Tensor:
        """One decode step for tokens ``nxt`` ``[B]``: last-position logits ``[B, V]`` (on the host)."""
        return self.step("decode", nxt.reshape(self.spec.batch, 1).cpu(), torch.tensor([int(pos)]))[:, -1]
