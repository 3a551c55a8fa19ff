"""MetaSchedule tuning (fxcompress/backends/tvm/meta_schedule.py) on LLVM: a real tune (1 trial), records reused by
the next build, records for another target or shape ignored with a warning and not applied."""
import shutil
import warnings

import pytest
import torch
from torch import nn

tvm = pytest.importorskip("tvm")

from fxcompress.backends.tvm import TVMBuildConfig, compile_tvm, meta_schedule_usable
from fxcompress.backends.tvm.meta_schedule import FFI_PIN, _ffi_version, records_dir
from fxcompress.nn import QuantLinear
from fxcompress.quant import QuantSpec
from fxcompress.runtime import check_parity

USABLE, WHY = meta_schedule_usable()
needs_ms = pytest.mark.skipif(not USABLE, reason=f"MetaSchedule is not usable here: {WHY}")
CFG = TVMBuildConfig(ms_cost_model="random")


def _model():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32, bias=True)
    return nn.Sequential(QuantLinear.from_linear(lin, QuantSpec(4, False, "per_group", 32)), nn.SiLU()).eval()


def _llvm(**attrs):
    from tvm.target import Target

    return Target({"kind": "llvm", "num-cores": 2, **attrs})


def _scripts(runner):
    b = runner.build
    return {gv.name_hint: f.script() for gv, f in b.scheduled.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}


def test_usable_or_says_to_pin_the_ffi():
    if USABLE:
        assert WHY == ""
    else:
        assert f"pin apache-tvm-ffi=={FFI_PIN}" in WHY and _ffi_version() in WHY
    if _ffi_version() == FFI_PIN:
        assert USABLE, WHY


@pytest.mark.skipif(USABLE, reason="MetaSchedule works here (the error path is for TVM builds that crash)")
def test_unusable_is_a_clear_error(tmp_path):
    from fxcompress.backends.tvm import TVMBackendError

    with pytest.raises(TVMBackendError, match=f"pin apache-tvm-ffi=={FFI_PIN}"):
        compile_tvm(_model(), (torch.randn(1, 64),), target="llvm", tune="meta_schedule", trials=2,
                    work_dir=tmp_path)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    if not USABLE:
        pytest.skip(f"MetaSchedule is not usable here: {WHY}")
    work = tmp_path_factory.mktemp("ms")
    m, x = _model(), torch.randn(1, 64)
    r = compile_tvm(m, (x,), target=_llvm(), tune="meta_schedule", trials=1, work_dir=work, config=CFG)
    return work, m, x, r


@needs_ms
def test_tuned_build_matches_reference_and_stores_records_per_target(tuned):
    work, m, x, r = tuned
    st = r.info["tuning"]
    assert st["tasks"] == 1 and st["tuned"] == 1 and st["reused"] == 0
    assert st["applied"] and all("decode_matmul" in n for n in st["applied"])
    rdir = records_dir(work, _llvm())
    assert (rdir / "database_tuning_record.json").stat().st_size > 0
    assert (rdir / "target.txt").read_text().strip() == str(_llvm())
    assert check_parity(m, r, (x,)).ok(1e-5, 1e-5)


@needs_ms
def test_records_are_reused_not_retuned(tuned):
    work, m, x, r = tuned
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r2 = compile_tvm(m, (x,), target=_llvm(), tune="meta_schedule", trials=2, work_dir=work, config=CFG)
    assert not [w for w in caught if "meta_schedule" in str(w.message)]  # same target and shape: no warning
    st = r2.info["tuning"]
    assert st["tuned"] == 0 and st["reused"] == st["tasks"] == 1 and st["applied"] == r.info["tuning"]["applied"]
    assert _scripts(r2) == _scripts(r)
    assert check_parity(m, r2, (x,)).ok(1e-5, 1e-5)


def _untuned_scripts(m, x, target):
    return _scripts(compile_tvm(m, (x,), target=target, tune="dlight"))


@needs_ms
@pytest.mark.parametrize("flat", [False, True])
def test_records_for_another_target_are_ignored_with_a_warning(tuned, tmp_path, flat):
    """Another target string (here another -mcpu) never gets this target's schedules, whether the records sit in
    the per-target directories or in a flat records file copied into work_dir."""
    work, m, x, r = tuned
    if flat:  # a records file copied from another machine, straight into work_dir
        for f in records_dir(work, _llvm()).glob("database_*.json"):
            shutil.copy(f, tmp_path / f.name)
        work = tmp_path
    other = _llvm(mcpu="x86-64")
    with pytest.warns(UserWarning, match="another target"):
        r2 = compile_tvm(m, (x,), target=other, tune="meta_schedule", trials=0, work_dir=work, config=CFG)
    st = r2.info["tuning"]
    assert st["applied"] == [] and st["ignored_other_target"] >= 1 and st["reused"] == 0
    assert _scripts(r2) == _untuned_scripts(m, x, other) != _scripts(r)
    assert check_parity(m, r2, (x,)).ok(1e-5, 1e-5)


@needs_ms
def test_records_for_another_shape_are_ignored_with_a_warning(tuned):
    work, m, _, _ = tuned
    x3 = torch.randn(3, 64)
    with pytest.warns(UserWarning, match="workloads this model does not have"):
        r2 = compile_tvm(m, (x3,), target=_llvm(), tune="meta_schedule", trials=0, work_dir=work, config=CFG)
    st = r2.info["tuning"]
    assert st["applied"] == [] and st["ignored_other_workload"] >= 1
    assert _scripts(r2) == _untuned_scripts(m, x3, _llvm())
    assert check_parity(m, r2, (x3,)).ok(1e-5, 1e-5)


@pytest.mark.gpu
@needs_ms
def test_cuda_tunes_untuned_kernels_and_hand_kernels_compete(tmp_path):
    """On the GPU: a LayerNorm, an int4 linear (hand-written tensor-core kernel, competing with a tuned te kernel)
    and a float linear; tuned, parity with torch, the choice stored and reused by the next build."""
    torch.manual_seed(0)
    lin = QuantLinear.from_linear(nn.Linear(256, 256, bias=False), QuantSpec(4, False, "per_group", 128))
    m = nn.Sequential(nn.LayerNorm(256), lin, nn.SiLU(), nn.Linear(256, 64)).eval()
    x = torch.randn(1, 4, 256)
    kw = dict(target="cuda", tune="meta_schedule", trials=8, work_dir=tmp_path, dtype=torch.float16)
    r = compile_tvm(m, (x,), **kw)
    st = r.info["tuning"]
    assert st["tuned"] >= 1 and st["applied"], st
    assert st["compete"] == "measured" and len(st["choices"]) == 1, st
    (choice,) = st["choices"].values()
    assert choice["kernel"] == "fxc_mma" and choice["hand_us"] > 0
    want = "te" if choice["winner"] == "tuned" else "fxc_mma"
    assert [layer["kernel"] for layer in r.info["layers"]] == [want]
    ref = m(x)
    y = r(x.half().cuda()).float().cpu()
    assert (y - ref).abs().max().item() <= 2e-2 * ref.abs().max().item()
    r2 = compile_tvm(m, (x,), **kw)
    st2 = r2.info["tuning"]
    assert st2["tuned"] == 0 and st2["reused"] == st2["tasks"] and st2["choices"] == st["choices"]
    assert [layer["kernel"] for layer in r2.info["layers"]] == [want]


@needs_ms
def test_hand_scheduled_kernels_are_not_tuning_tasks(tmp_path):
    """A hand-written kernel (here the LLVM decode attention, marked scheduled) next to a plain op: only the plain op
    is a MetaSchedule task (the CUDA tensor-core kernels were extracted as tasks and crashed the tuner)."""
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    from fxcompress.backends.tvm.kernels.decode_attention import AttentionShape, decode_attention_primfunc
    from fxcompress.backends.tvm.meta_schedule import hand_scheduled, tune_meta_schedule

    shape = AttentionShape(1, 2, 2, 8, 16, "float32", "float32", "float32", "float32", "float32")
    attn = decode_attention_primfunc(shape, 0.25, False)
    bb = relax.BlockBuilder()
    f32 = "float32"
    q = relax.Var("q", relax.TensorType([1, 2, 1, 16], f32))
    kc = relax.Var("kc", relax.TensorType([1, 2, 8, 16], f32))
    pos = relax.Var("pos", relax.TensorType([1], "int64"))
    with bb.function("main", [q, kc, pos]):
        with bb.dataflow():
            gv = bb.add_func(attn, "attn")
            o = bb.emit(relax.call_tir(gv, relax.Tuple([q, q, q, kc, kc, pos]), relax.TensorType([1, 2, 1, 16], f32)))
            y = bb.emit_output(bb.emit(relax.op.add(o, o)))
        bb.emit_func_output(y)
    mod = relax.transform.LegalizeOps()(bb.get())
    tasks = ms.relax_integration.extract_tasks(mod, _llvm())
    assert len(tasks) == 2
    assert [hand_scheduled(t.dispatched[0]) for t in tasks].count(True) == 1
    # trials=0: the task list without tuning (a second MetaSchedule tuning in one pytest process fails inside TVM's
    # logging setup: an unnamed handler on its global logger)
    _, stats = tune_meta_schedule(mod, _llvm(), 0, tmp_path, cost_model="random")
    assert stats["tasks"] == 1 and stats["tuned"] == 0, stats


@needs_ms
def test_warm_builder_reuses_its_worker_across_batches():
    """MetaSchedule's LocalBuilder starts new worker processes for every batch (each re-imports TVM's tensor
    intrinsics, 13-20 s); the warm builder keeps its worker, and builds what LocalBuilder builds."""
    from tvm import te
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo
    from tvm.s_tir.meta_schedule.builder import BuilderInput
    from tvm.s_tir.meta_schedule.runner import LocalRunner, RunnerInput

    from fxcompress.backends.tvm.ms_builder import warm_builder

    a = te.placeholder((64,), "float32", name="a")
    mod = tvm.IRModule({"main": te.create_prim_func([a, te.compute((64,), lambda i: a[i] * 2.0, name="b")])})
    builder = warm_builder(1, 60.0)
    try:
        first = builder.build([BuilderInput(mod, _llvm())])
        pids = [w._proc.pid for w in builder.pool._worker_map.values()]
        second = builder.build([BuilderInput(mod, _llvm()), BuilderInput(mod, _llvm())])
        assert [w._proc.pid for w in builder.pool._worker_map.values()] == pids and len(pids) == 1
    finally:
        builder.shutdown()
    results = first + second
    assert all(r.error_msg is None and r.artifact_path for r in results), [r.error_msg for r in results]
    runner = LocalRunner()
    (fut,) = runner.run([RunnerInput(first[0].artifact_path, "cpu", ArgInfo.from_prim_func(mod["main"]))])
    res = fut.result()
    assert res.error_msg is None and len(res.run_secs) >= 1


def test_warm_builder_rejects_bad_sizes():
    from fxcompress.backends.tvm.ms_builder import warm_builder

    with pytest.raises(ValueError, match="max_workers >= 1"):
        warm_builder(0, 10.0)


@needs_ms
def test_records_naming_tensor_intrinsics_load_in_a_fresh_process():
    """A CUDA record whose trace tensorizes with wmma (the lm_head matmul of the 2048-wide decode model, tuned on an
    H100 on 2026-11-27) loads in a process that has not tuned anything: TVM registers the intrinsics it names only
    when ``tvm.s_tir.tensor_intrin`` is imported, and reading such records failed without that import."""
    import subprocess
    import sys
    from pathlib import Path

    data = Path(__file__).parent / "data" / "ms_records_wmma"
    code = ("from pathlib import Path; from tvm.target import Target\n"
            "from fxcompress.backends.tvm.meta_schedule import _load_records, target_key\n"
            f"d = Path({str(data)!r}); key = target_key(Target((d / 'target.txt').read_text().strip()))\n"
            "usable, other_target, other_workload = _load_records(d, key, set())\n"
            "print(len(usable), sum(other_target.values()), other_workload)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["0", "0", "1"]  # read, same target, not one of this (empty) task set's workloads
