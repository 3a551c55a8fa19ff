"""Running and storing deployed artifacts: one runner interface over ONNX Runtime (and TVM)."""
from .artifact import ArtifactError, convert_v1, load_artifact, read_manifest, register_artifact_module, save_artifact
from .runner import ParityReport, Runner, RunnerInputError, benchmark, check_parity, load, register_backend

__all__ = ["ArtifactError", "convert_v1", "load_artifact", "read_manifest", "register_artifact_module", "save_artifact",
           "ParityReport", "Runner", "RunnerInputError",
           "benchmark", "check_parity", "load", "register_backend"]
