"""A MetaSchedule builder whose worker processes outlive one batch of candidates.

MetaSchedule's ``LocalBuilder`` starts a fresh process pool for every batch it builds, and each worker's first build
imports ``tvm.s_tir.tensor_intrin``, which parses a few hundred TVMScript intrinsics: 13-20 s per worker (measured:
19 s on a 2-core CPU for an elementwise kernel whose own build takes under 0.1 s once the import is done).  Tuning
twenty tasks thus spent most of its time re-importing.  :func:`warm_builder` keeps one pool for the whole tuning run,
imports the intrinsics once per worker (the pool's initializer) and recycles each worker after ``recycle`` builds (the
reason ``LocalBuilder`` restarts its pool: worker memory grows with use).  Build and export are MetaSchedule's own
(``default_build`` / ``default_export``), so candidates and artifacts are the same as ``LocalBuilder``'s.
"""
from __future__ import annotations

import functools

__all__ = ["warm_builder"]


def _import_intrinsics() -> None:  # the pool's initializer: runs once per worker process
    import tvm.s_tir.tensor_intrin  # noqa: F401


def _build_one(args):
    from tvm.s_tir.meta_schedule.builder.local_builder import _worker_func

    return _worker_func(*args)


@functools.cache
def _builder_class():  # defined on first use: TVM is an optional dependency
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.meta_schedule.builder.local_builder import _serialize_params
    from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

    @derived_object
    class WarmBuilder(PyBuilder):
        """``LocalBuilder`` with one process pool kept across ``build`` calls (see the module docstring)."""

        def __init__(self, max_workers: int, timeout_sec: float, recycle: int) -> None:
            super().__init__()
            self.timeout_sec = timeout_sec
            self.pool = PopenPoolExecutor(max_workers=max_workers, timeout=timeout_sec,
                                          initializer=_import_intrinsics, maximum_process_uses=recycle)

        def build(self, build_inputs):
            jobs = [(None, None, b.mod, b.target, _serialize_params(b.params)) for b in build_inputs]
            out = []
            for r in self.pool.map_with_error_catching(_build_one, jobs):
                if r.status == StatusKind.COMPLETE:
                    out.append(BuilderResult(r.value, None))
                elif r.status == StatusKind.TIMEOUT:
                    out.append(BuilderResult(None, f"WarmBuilder: timeout, killed after {self.timeout_sec} s"))
                else:
                    out.append(BuilderResult(None, f"WarmBuilder: an exception occurred\n{r.value}"))
            return out

        def shutdown(self) -> None:
            self.pool.shutdown()

    return WarmBuilder


def warm_builder(max_workers: int, timeout_sec: float, recycle: int = 64):
    """A MetaSchedule builder (``PyBuilder``) with ``max_workers`` long-lived worker processes, each build limited to
    ``timeout_sec`` and each worker replaced after ``recycle`` builds.  Call its ``shutdown()`` when tuning is done."""
    if max_workers < 1 or recycle < 1 or timeout_sec <= 0:
        raise ValueError(f"warm_builder needs max_workers >= 1, recycle >= 1 and timeout_sec > 0, got "
                         f"{max_workers}, {recycle}, {timeout_sec}")
    return _builder_class()(max_workers, timeout_sec, recycle)
