"""Running and storing deployed artifacts: one runner interface over ONNX Runtime and TVM.

The backend modules (``ort``, ``tvm_runner``) are imported when a runner of that backend is first loaded.
"""
from .artifact import ArtifactError, read_manifest, save
from .artifact import load as load_artifact
from .runner import ParityReport, Runner, RunnerInputError, backends, benchmark, check_parity, load_runner, register_backend

__all__ = ["ArtifactError", "load_artifact", "read_manifest", "save", "ParityReport", "Runner", "RunnerInputError",
           "backends", "benchmark", "check_parity", "load_runner", "register_backend"]
