"""Running and storing deployed artifacts: one runner interface over ONNX Runtime (and TVM)."""
from .artifact import ArtifactError, read_manifest, save
from .artifact import load as load_artifact
from .runner import ParityReport, Runner, RunnerInputError, benchmark, check_parity, load, register_backend

__all__ = ["ArtifactError", "load_artifact", "read_manifest", "save", "ParityReport", "Runner", "RunnerInputError",
           "benchmark", "check_parity", "load", "register_backend"]
