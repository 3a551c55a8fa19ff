"""fxcompress: torch.fx passes that compress PyTorch models, and backends that deploy them."""
from .capture import CaptureError, capture
from .passes import (L4QConfig, LayerReport, PassResult, Pipeline, Report, RTNConfig, as_fx_pass, convert_l4q,
                     l4q_param_groups, l4q_trainable_parameters, prepare_l4q, quantize_rtn, report)
from .passes.udfc import UDFCConfig, udfc, udfc_pass
from .quant import QuantSpec, QuantWeight
from . import runtime
from .backends.onnx_qdq import ExportError, export_onnx
from .backends.tvm import TVMBackendError, build_tvm, compile_tvm
from .runtime.artifact import ArtifactError, load_artifact, save_artifact
from .compile_backend import compile_backend

__version__ = "0.1.0"

__all__ = [
    "capture", "CaptureError", "report", "Report", "LayerReport", "PassResult", "Pipeline", "as_fx_pass",
    "QuantSpec", "QuantWeight", "save_artifact", "load_artifact", "ArtifactError", "RTNConfig", "quantize_rtn", "L4QConfig", "prepare_l4q", "convert_l4q",
    "l4q_trainable_parameters", "l4q_param_groups", "UDFCConfig", "udfc", "udfc_pass",
    "compile_backend", "export_onnx", "ExportError", "compile_tvm", "build_tvm", "TVMBackendError", "runtime", "__version__",
]
