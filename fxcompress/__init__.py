"""fxcompress: torch.fx passes that compress PyTorch models, and backends that deploy them.

The backends (ONNX, TVM) and the runtime are imported on first use, so ``import fxcompress`` (and
``fxcompress.nn`` / ``fxcompress.passes``) never imports onnx, onnxruntime or TVM.
"""
import importlib

from .capture import CaptureError, NonFiniteWeightError, capture
from .passes import (L4QConfig, LayerReport, NothingToCompressError, PassResult, Pipeline, Report, RTNConfig,
                     as_fx_pass, convert_l4q, convert_pass, l4q_param_groups, l4q_pass, l4q_trainable_parameters,
                     materialize_quant_modules, prepare_l4q, quantize_rtn, report, rtn_pass)
from .passes.udfc import UDFCConfig, udfc, udfc_pass
from .quant import QuantSpec, QuantWeight

__version__ = "0.1.0"

_LAZY = {
    "runtime": (".runtime", None),
    "export_onnx": (".backends.onnx_qdq", "export_onnx"), "ExportError": (".backends.onnx_qdq", "ExportError"),
    "compile_tvm": (".backends.tvm", "compile_tvm"), "build_tvm": (".backends.tvm", "build_tvm"),
    "TVMBackendError": (".backends.tvm", "TVMBackendError"),
    "save": (".runtime.artifact", "save"), "load": (".runtime.artifact", "load"),
    "ArtifactError": (".runtime.artifact", "ArtifactError"),
}


def __getattr__(name):
    if name in _LAZY:
        mod, attr = _LAZY[name]
        m = importlib.import_module(mod, __name__)
        value = m if attr is None else getattr(m, attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fxcompress' has no attribute {name!r}")


__all__ = [
    "capture", "CaptureError", "NonFiniteWeightError", "report", "Report", "LayerReport", "PassResult",
    "NothingToCompressError", "Pipeline", "as_fx_pass", "QuantSpec", "QuantWeight", "save", "load", "ArtifactError",
    "RTNConfig", "rtn_pass", "quantize_rtn", "L4QConfig", "l4q_pass", "prepare_l4q", "convert_pass", "convert_l4q",
    "l4q_trainable_parameters", "l4q_param_groups", "UDFCConfig", "udfc", "udfc_pass", "materialize_quant_modules",
    "export_onnx", "ExportError", "compile_tvm", "build_tvm", "TVMBackendError", "runtime", "__version__",
]
