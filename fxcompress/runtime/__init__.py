"""Running and storing deployed artifacts: one runner interface over ONNX Runtime and TVM.

The backend modules (``ort``, ``tvm_runner``) are imported when a runner of that backend is first loaded.
"""
from .artifact import ArtifactError, load_artifact, read_manifest, register_artifact_module, save_artifact
from .artifact_v1 import convert_v1
from .runner import ParityReport, Runner, RunnerInputError, backends, benchmark, check_parity, load_runner, register_backend

__all__ = ["ArtifactError", "convert_v1", "load_artifact", "read_manifest", "register_artifact_module", "save_artifact",
           "ParityReport", "Runner", "RunnerInputError", "backends", "benchmark", "check_parity", "load_runner",
           "register_backend"]
