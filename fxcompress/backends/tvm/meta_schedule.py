"""MetaSchedule tuning of a fused Relax module into a JSON records database that later builds reuse."""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

from .base import TVMBackendError, require_tvm

__all__ = ["meta_schedule_usable", "tune_meta_schedule"]


def _shash(obj) -> int:
    try:
        from tvm_ffi import structural_hash
    except ImportError:  # pragma: no cover - older TVM
        from tvm.ir import structural_hash
    return int(structural_hash(obj))


_MS_PROBE: list = []
_PROBE_SRC = """
import tvm, tvm_ffi
from tvm import te
A = te.placeholder((8, 8), "float32", name="A")
C = te.compute((8, 8), lambda i, j: A[i, j] * 2.0, name="C")
tvm_ffi.serialization.to_json_graph_str(tvm.IRModule({"main": te.create_prim_func([A, C])}))
"""


def meta_schedule_usable() -> tuple[bool, str]:
    """MetaSchedule's JSON database and builder serialize TIR modules; some TVM wheels crash doing that.

    Probed once, in a subprocess (a segfault there cannot take this process down).
    """
    if not _MS_PROBE:
        import subprocess

        try:
            r = subprocess.run([sys.executable, "-c", _PROBE_SRC], capture_output=True, timeout=120,
                               env=dict(os.environ))
            ok = r.returncode == 0
            why = "" if ok else (f"serializing a TIR module crashes this TVM build (exit {r.returncode}: "
                                 f"{(r.stderr.decode(errors='replace').strip().splitlines() or [''])[0][:120]})")
        except subprocess.TimeoutExpired:
            ok, why = False, "serializing a TIR module hangs in this TVM build"
        _MS_PROBE.append((ok, why))
    return _MS_PROBE[0]


def tune_meta_schedule(mod, target, trials: int, work_dir):
    """Tune the untuned tasks of ``mod`` (already fused) into ``work_dir``; return the scheduled module."""
    tvm = require_tvm()
    ok, why = meta_schedule_usable()
    if not ok:
        raise TVMBackendError(f"tune='meta_schedule' is not usable with tvm {tvm.__version__}: {why} "
                              "(MetaSchedule stores workloads as JSON). Use tune='dlight'.")
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    tasks = ms.relax_integration.extract_tasks(mod, target)
    db = ms.database.JSONDatabase(work_dir=str(work_dir))
    ours = {_shash(t.dispatched[0]) for t in tasks}
    tkey = str(target.kind.name) + ":" + str(target.attrs.get("arch", target.attrs.get("mcpu", "")))
    other_target = other_shape = 0
    for rec in db.get_all_tuning_records():
        rkey = str(rec.target.kind.name) + ":" + str(rec.target.attrs.get("arch", rec.target.attrs.get("mcpu", "")))
        if rkey != tkey:
            other_target += 1
        elif _shash(rec.workload.mod) not in ours:
            other_shape += 1
    if other_target:
        warnings.warn(f"meta_schedule: {other_target} record(s) in {work_dir} are for another target (this build: "
                      f"{tkey}); they are ignored", stacklevel=3)
    if other_shape:
        warnings.warn(f"meta_schedule: {other_shape} record(s) in {work_dir} are for other workloads (another "
                      "model or shape); they are ignored", stacklevel=3)
    todo = [t for t in tasks if db.query_tuning_record(t.dispatched[0], target, "main") is None]
    reused = len(tasks) - len(todo)
    if todo and trials > 0:
        import importlib.util

        ncpu = os.cpu_count() or 1  # explicit counts: MetaSchedule's own default needs psutil
        if importlib.util.find_spec("psutil") is None:  # MetaSchedule asks C++-side too: answer without psutil
            import tvm_ffi

            tvm_ffi.register_global_func("s_tir.meta_schedule.cpu_count", lambda logical=True: ncpu, override=True)
        ctxs, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(todo, str(work_dir), num_threads=ncpu)
        per_task = max(1, int(trials) // max(1, len(todo)))
        cost_model = "xgb" if importlib.util.find_spec("xgboost") else "random"
        ms.tune_tasks(tasks=ctxs, task_weights=weights, work_dir=str(work_dir), max_trials_global=int(trials),
                      max_trials_per_task=per_task, num_trials_per_iter=min(64, per_task), database=db,
                      builder=ms.builder.LocalBuilder(max_workers=ncpu), cost_model=cost_model)
    with target, db:
        mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
    return mod, {"tasks": len(tasks), "reused": reused, "tuned": len(todo) if trials > 0 else 0,
                 "work_dir": str(work_dir)}
