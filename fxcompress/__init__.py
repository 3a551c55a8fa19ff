"""fxcompress: torch.fx passes that compress PyTorch models, and backends that deploy them.

Every public name is imported on first use (PEP 562 ``__getattr__``), so ``import fxcompress`` and
``fxcompress --help`` load neither torch nor onnx, onnxruntime or TVM; ``fxc.capture`` (for example) imports
the module that defines it the first time it is touched.  The table below is the whole public API.
"""
from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {
    "capture": "fxcompress.capture", "CaptureError": "fxcompress.capture",
    "NonFiniteWeightError": "fxcompress.capture",
    "NothingToCompressError": "fxcompress.passes", "rtn_pass": "fxcompress.passes", "l4q_pass": "fxcompress.passes",
    "convert_pass": "fxcompress.passes", "materialize_quant_modules": "fxcompress.passes",
    "report": "fxcompress.passes", "Report": "fxcompress.passes", "LayerReport": "fxcompress.passes",
    "PassResult": "fxcompress.passes", "Pipeline": "fxcompress.passes", "as_fx_pass": "fxcompress.passes",
    "RTNConfig": "fxcompress.passes", "quantize_rtn": "fxcompress.passes",
    "FusionConfig": "fxcompress.passes.fusion", "fuse_linears": "fxcompress.passes.fusion",
    "fuse_linears_pass": "fxcompress.passes.fusion",
    "ActivationConfig": "fxcompress.passes.activations", "quantize_activations": "fxcompress.passes.activations",
    "quantize_activations_pass": "fxcompress.passes.activations",
    "L4QConfig": "fxcompress.passes", "prepare_l4q": "fxcompress.passes", "convert_l4q": "fxcompress.passes",
    "l4q_trainable_parameters": "fxcompress.passes", "l4q_param_groups": "fxcompress.passes",
    "DFQConfig": "fxcompress.passes.dfq", "dfq": "fxcompress.passes.dfq", "dfq_pass": "fxcompress.passes.dfq",
    "UDFCConfig": "fxcompress.passes.udfc", "udfc": "fxcompress.passes.udfc", "udfc_pass": "fxcompress.passes.udfc",
    "QuantSpec": "fxcompress.quant", "QuantWeight": "fxcompress.quant",
    "save_artifact": "fxcompress.runtime.artifact", "load_artifact": "fxcompress.runtime.artifact",
    "compile_backend": "fxcompress.compile_backend",
    "ArtifactError": "fxcompress.runtime.artifact",
    "export_onnx": "fxcompress.backends.onnx", "ExportError": "fxcompress.backends.onnx",
    "compile_tvm": "fxcompress.backends.tvm", "build_tvm": "fxcompress.backends.tvm",
    "compile_lm": "fxcompress.lm", "load_lm": "fxcompress.lm",
    "TVMBackendError": "fxcompress.backends.tvm", "TVMBuildConfig": "fxcompress.backends.tvm",
}
# subpackages reachable as attributes (``fxc.runtime.load_runner``) before anything imported them
_SUBMODULES = ("backends", "capture", "cli", "compile_backend", "data", "distributed", "doctor", "finetune", "lm", "models", "nn", "passes",
               "quant", "runtime")


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module 'fxcompress' has no attribute {name!r}")
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    """Keeps ``fxc.capture`` the function: importing the submodule ``fxcompress.capture`` would otherwise bind
    the module to the package attribute of the same name."""

    def __setattr__(self, name, value):
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))


__all__ = sorted(_LAZY) + ["runtime", "__version__"]
