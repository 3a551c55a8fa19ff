"""MetaSchedule tuning of a fused Relax module into a records database that later builds reuse.

Records live under ``work_dir/<target key>/`` (MetaSchedule's ``database_workload.json`` +
``database_tuning_record.json``), one directory per target string (``cuda -arch=sm_90a ...``, ``llvm -mcpu=...
-num-cores=...``): a GPU or CPU gets its own records.  Before tuning, every records file under ``work_dir`` (the
per-target directories, and a flat ``work_dir/database_*.json`` copied from elsewhere) is read; a record is used only
when its target string equals this build's AND its workload (the PrimFunc, shapes included) is one of this module's
tasks.  Records for another target or for workloads this module does not have are ignored with a warning (never
applied: the application database holds only the matching records).  Tasks with a usable record are not tuned
again.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import warnings
from pathlib import Path

from .base import TVMBackendError, require_tvm
from .ms_builder import warm_builder

__all__ = ["meta_schedule_usable", "tune_meta_schedule", "tune_primfunc", "target_key", "records_dir", "FFI_PIN"]

FFI_PIN = "0.1.14.post0"  # the apache-tvm-ffi whose JSON serialization of TIR works with apache-tvm 0.27
RECORD_FILES = ("database_workload.json", "database_tuning_record.json")


def _shash(obj) -> int:
    try:
        from tvm_ffi import structural_hash
    except ImportError:  # pragma: no cover - older TVM
        from tvm.ir import structural_hash
    return int(structural_hash(obj))


def _ffi_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("apache-tvm-ffi")
    except PackageNotFoundError:  # pragma: no cover - TVM without the separate ffi package
        return "unknown"


_MS_PROBE: list = []
_PROBE_SRC = """
import tvm, tvm_ffi
from tvm import te
A = te.placeholder((8, 8), "float32", name="A")
C = te.compute((8, 8), lambda i, j: A[i, j] * 2.0, name="C")
tvm_ffi.serialization.to_json_graph_str(tvm.IRModule({"main": te.create_prim_func([A, C])}))
"""


def meta_schedule_usable() -> tuple[bool, str]:
    """(True, "") when MetaSchedule can run here, else (False, why and what to do).

    MetaSchedule's JSON database and builder serialize TIR modules; ``apache-tvm==0.27.0.post1`` with
    ``apache-tvm-ffi==0.1.15.*`` segfaults doing that (``tvm::ffi::ToJSONGraph``), ``0.1.14.post0`` works.
    Probed once, in a subprocess (a segfault there cannot take this process down).
    """
    if not _MS_PROBE:
        import subprocess

        pin = (f"pin apache-tvm-ffi=={FFI_PIN} (pip install 'apache-tvm-ffi=={FFI_PIN}'; the 'tvm' extra of "
               "fxcompress pins it), or use tune='dlight'")
        try:
            r = subprocess.run([sys.executable, "-c", _PROBE_SRC], capture_output=True, timeout=120, check=False,
                               env=dict(os.environ))
            ok = r.returncode == 0
            why = "" if ok else (f"serializing a TIR module crashes apache-tvm-ffi {_ffi_version()} (exit "
                                 f"{r.returncode}: {(r.stderr.decode(errors='replace').strip().splitlines() or [''])[-1][:120]}"
                                 f"); {pin}")
        except subprocess.TimeoutExpired:
            ok, why = False, f"serializing a TIR module hangs with apache-tvm-ffi {_ffi_version()}; {pin}"
        _MS_PROBE.append((ok, why))
    return _MS_PROBE[0]


def _plain(v):
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if hasattr(v, "items"):  # dict / tvm Map
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)) or type(v).__name__ in ("Array", "List"):
        return [_plain(x) for x in v]
    if hasattr(v, "export"):  # a host Target inside the target
        return _plain(v.export())
    return str(v)


def target_key(target) -> str:
    """The string records are keyed by: every attribute of the target (kind, arch / mcpu, core count, limits) as
    sorted JSON, so a record's target read back from the database compares equal to the build's."""
    return json.dumps(_plain(target.export()), sort_keys=True)


def records_dir(work_dir, target) -> Path:
    """``work_dir/<kind>_<arch or mcpu>-<hash of the target key>``: this target's records."""
    key = target_key(target)
    attrs = target.export()
    what = str(attrs.get("arch") or attrs.get("mcpu") or "")
    slug = re.sub(r"[^A-Za-z0-9=._-]+", "_", f"{attrs.get('kind')}_{what}").strip("_")
    return Path(work_dir) / f"{slug}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"


def _record_dirs(work_dir: Path) -> list[Path]:
    dirs = [work_dir] + sorted(p for p in work_dir.iterdir() if p.is_dir())
    return [d for d in dirs if (d / RECORD_FILES[1]).is_file()]


def _valid(rec) -> bool:
    secs = [float(s) for s in (rec.run_secs or [])]
    return bool(secs) and max(secs) < 1e9  # MetaSchedule stores 1e10 for failed runs


def _load_records(work_dir: Path, key: str, ours: set[int]):
    """Records under ``work_dir`` for this target and these workloads, and counts of the ignored ones."""
    from tvm.s_tir import meta_schedule as ms

    usable, other_target, other_workload = [], {}, 0
    dirs = _record_dirs(work_dir)
    if dirs:  # records' traces name tensor intrinsics, registered by this import (13-20 s: only when there are records)
        import tvm.s_tir.tensor_intrin  # noqa: F401
    for d in dirs:
        db = ms.database.JSONDatabase(path_workload=str(d / RECORD_FILES[0]),
                                      path_tuning_record=str(d / RECORD_FILES[1]), allow_missing=True)
        for rec in db.get_all_tuning_records():
            rkey = target_key(rec.target)
            if rkey != key:
                other_target[rkey] = other_target.get(rkey, 0) + 1
            elif _shash(rec.workload.mod) not in ours:
                other_workload += 1
            elif _valid(rec):
                usable.append(rec)
    return usable, other_target, other_workload


def _memory_database(records):
    from tvm.s_tir import meta_schedule as ms

    mem = ms.database.MemoryDatabase()
    for rec in records:
        wl = mem.commit_workload(rec.workload.mod)
        mem.commit_tuning_record(ms.database.TuningRecord(rec.trace, wl, rec.run_secs, rec.target, rec.args_info))
    return mem


def _tune(tasks, target, trials: int, db, log_dir: Path, *, builder_timeout_s: float, cost_model: str):
    import importlib.util

    from tvm.s_tir import meta_schedule as ms

    if importlib.util.find_spec("psutil") is None:  # MetaSchedule's builder workers import it
        raise TVMBackendError("tune='meta_schedule' needs psutil (MetaSchedule's LocalBuilder imports it): "
                              "pip install psutil")
    ncpu = os.cpu_count() or 1
    ctxs, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(tasks, str(log_dir), num_threads=ncpu)
    per_task = max(1, int(trials) // max(1, len(ctxs)))
    workers = max(1, min(ncpu, per_task))  # each builder worker is a process that imports TVM
    if cost_model == "auto":
        cost_model = "xgb" if importlib.util.find_spec("xgboost") else "random"
    builder = warm_builder(workers, builder_timeout_s)
    try:
        ms.tune_tasks(tasks=ctxs, task_weights=weights, work_dir=str(log_dir), max_trials_global=int(trials),
                      max_trials_per_task=per_task, num_trials_per_iter=min(64, per_task), database=db,
                      builder=builder, cost_model=cost_model)
    finally:
        builder.shutdown()


def tune_primfunc(func, target, trials: int, log_dir, db, *, builder_timeout_s: float = 120.0,
                  cost_model: str = "auto"):
    """Tune one standalone PrimFunc into ``db`` (used by :mod:`.compete` for the hand kernels' alternatives)."""
    import importlib.util

    from tvm.s_tir import meta_schedule as ms

    if importlib.util.find_spec("psutil") is None:
        raise TVMBackendError("tune='meta_schedule' needs psutil (MetaSchedule's LocalBuilder imports it): "
                              "pip install psutil")
    if cost_model == "auto":
        cost_model = "xgb" if importlib.util.find_spec("xgboost") else "random"
    builder = warm_builder(max(1, min(os.cpu_count() or 1, int(trials))), builder_timeout_s)
    try:
        ms.tune_tir(func, target, str(log_dir), int(trials), num_trials_per_iter=min(64, int(trials)), database=db,
                    builder=builder, cost_model=cost_model)
    finally:
        builder.shutdown()


def hand_scheduled(task_mod) -> bool:
    """Whether a task's module holds a hand-scheduled PrimFunc (the ``tirx.is_scheduled`` / ``tir.is_scheduled``
    attribute is on the function, not on the module: MetaSchedule's task extraction keeps the function's attributes
    and its own module attributes are empty, so a module-level check never matched and the hand-written kernels
    were tuned as tasks, which fails: their TIR has no blocks for MetaSchedule's rules)."""
    for _, f in task_mod.functions.items():
        attrs = f.attrs or {}
        if attrs.get("tirx.is_scheduled", False) or attrs.get("tir.is_scheduled", False):
            return True
    return False


def tune_meta_schedule(mod, target, trials: int, work_dir, *, builder_timeout_s: float = 120.0,
                       cost_model: str = "auto"):
    """Tune the tasks of ``mod`` (already fused) that have no usable record into ``records_dir(work_dir, target)``
    and apply the records of this target and these workloads.  Returns ``(module, stats)``; hand-scheduled
    PrimFuncs (``tirx.is_scheduled``) are not tasks.  ``builder_timeout_s``: MetaSchedule's per-candidate build
    timeout (its 30 s default times out most CUDA candidates); ``cost_model``: "auto" (xgboost when installed,
    else random), "xgb" or "random"."""
    tvm = require_tvm()
    ok, why = meta_schedule_usable()
    if not ok:
        raise TVMBackendError(f"tune='meta_schedule' is not usable with tvm {tvm.__version__}: {why}")
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    key = target_key(target)
    tasks = [t for t in ms.relax_integration.extract_tasks(mod, target) if not hand_scheduled(t.dispatched[0])]
    ours = {_shash(t.dispatched[0]) for t in tasks}
    usable, other_target, other_workload = _load_records(work_dir, key, ours)
    if other_target:
        listed = "; ".join(f"{n} for {k!r}" for k, n in sorted(other_target.items()))
        warnings.warn(f"meta_schedule: ignoring tuning records in {work_dir} for another target ({listed}); this "
                      f"build is for {key!r}", stacklevel=3)
    if other_workload:
        warnings.warn(f"meta_schedule: ignoring {other_workload} tuning record(s) in {work_dir} for workloads this "
                      "model does not have (another model or shape)", stacklevel=3)
    have = {_shash(r.workload.mod) for r in usable}
    todo = [t for t in tasks if _shash(t.dispatched[0]) not in have]
    tuned = 0
    if todo and trials > 0:
        rdir = records_dir(work_dir, target)
        rdir.mkdir(parents=True, exist_ok=True)
        (rdir / "target.txt").write_text(str(target) + "\n")
        db = ms.database.JSONDatabase(path_workload=str(rdir / RECORD_FILES[0]),
                                      path_tuning_record=str(rdir / RECORD_FILES[1]), allow_missing=True)
        _tune(todo, target, trials, db, rdir, builder_timeout_s=builder_timeout_s, cost_model=cost_model)
        tuned = len(todo)
        usable, _, _ = _load_records(work_dir, key, ours)
    before = {gv.name_hint: _shash(f) for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}
    with target, _memory_database(usable):
        mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
    applied = sorted(gv.name_hint for gv, f in mod.functions.items()
                     if isinstance(f, tvm.tirx.PrimFunc) and before.get(gv.name_hint) not in (None, _shash(f)))
    return mod, {"tasks": len(tasks), "reused": len(tasks) - len(todo), "tuned": tuned, "applied": applied,
                 "ignored_other_target": sum(other_target.values()), "ignored_other_workload": other_workload,
                 "work_dir": str(work_dir), "records_dir": str(records_dir(work_dir, target))}
