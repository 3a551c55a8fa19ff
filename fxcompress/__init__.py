"""fxcompress: torch.fx passes that compress PyTorch models, and backends that deploy them."""
from .capture import CaptureError, capture
from .passes import (L4QConfig, LayerReport, PassResult, Pipeline, Report, RTNConfig, as_fx_pass, convert_l4q,
                     l4q_param_groups, l4q_trainable_parameters, prepare_l4q, quantize_rtn, report)
from .passes.udfc import UDFCConfig, udfc, udfc_pass
from .quant import QuantSpec, QuantWeight
from . import runtime
from .runtime.artifact import ArtifactError, load, save

__version__ = "0.1.0"

# backend entry points, imported on first use so that ``import fxcompress`` (and ``fxcompress --help``) does not
# load onnx, onnxruntime or TVM
_LAZY = {"export_onnx": "fxcompress.backends.onnx", "ExportError": "fxcompress.backends.onnx",
         "compile_tvm": "fxcompress.backends.tvm", "build_tvm": "fxcompress.backends.tvm",
         "TVMBackendError": "fxcompress.backends.tvm", "TVMBuildConfig": "fxcompress.backends.tvm"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fxcompress' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))

__all__ = [
    "capture", "CaptureError", "report", "Report", "LayerReport", "PassResult", "Pipeline", "as_fx_pass",
    "QuantSpec", "QuantWeight", "save", "load", "ArtifactError", "RTNConfig", "quantize_rtn", "L4QConfig", "prepare_l4q", "convert_l4q",
    "l4q_trainable_parameters", "l4q_param_groups", "UDFCConfig", "udfc", "udfc_pass",
    "export_onnx", "ExportError", "compile_tvm", "build_tvm", "TVMBackendError", "TVMBuildConfig", "runtime", "__version__",
]
