"""The one guarded import of Apache TVM for the backend, its error type and the target helpers."""
from __future__ import annotations

try:  # TVM is optional: everything here works without it until a build is asked for
    import tvm
    from tvm import relax  # noqa: F401  (fails on TVM builds without Relax)
    _IMPORT_ERROR: ImportError | None = None
except ImportError as e:  # pragma: no cover - depends on the environment
    tvm = None
    _IMPORT_ERROR = e


class TVMBackendError(ValueError):
    """The model cannot be lowered / built / run with TVM as asked; the message says what and why."""


def require_tvm():
    """The ``tvm`` module, or :class:`TVMBackendError` saying how to install it."""
    if tvm is None:
        raise TVMBackendError("the TVM backend needs apache-tvm (pip install 'fxcompress[tvm]')") from _IMPORT_ERROR
    return tvm


def cuda_available() -> bool:
    """Whether TVM sees a CUDA GPU (False without TVM)."""
    if tvm is None:
        return False
    try:
        return bool(tvm.cuda(0).exist)
    except Exception:  # noqa: BLE001
        return False


def make_target(target):
    """A ``tvm.target.Target`` for ``"llvm"``, ``"cuda"`` (the local GPU's if there is one, else sm_90)
    or a dict / Target given as is."""
    tvm_ = require_tvm()
    from tvm.target import Target

    if isinstance(target, Target):
        return target
    if isinstance(target, dict):
        return Target(target)
    if target in ("llvm", "cpu"):
        return Target("llvm")
    if target == "cuda" or (isinstance(target, str) and target.startswith("cuda")):
        if cuda_available():
            return Target.from_device(tvm_.cuda(0))
        return Target({"kind": "cuda", "arch": "sm_90", "max_shared_memory_per_block": 49152,
                       "max_threads_per_block": 1024, "thread_warp_size": 32, "max_num_threads": 1024})
    raise TVMBackendError(f"target must be 'llvm', 'cuda', a dict or a tvm Target, got {target!r}")
