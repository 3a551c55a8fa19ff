"""MetaSchedule vs dlight, per kernel, on the 2048-wide decode model (H100: tuning did not finish in 545 s at the
default trials, 160 measured; with a records directory from such a run, ~2 minutes).

    PYTHONPATH=/tmp/gpu-site:$PWD python3 tools/bench_tvm_tuning.py --work-dir DIR --out tools/results/tvm_tuning.md

Run it again with the same ``--work-dir`` to build from the records without tuning (tasks with a record are not
tuned again; tools/results/tvm_tuning.md was made that way).

Model: tools/bench_decode_gpu.py's FULL config (hidden 2048, intermediate 5632, 4 layers, vocab 32000), RTN int4 g128
asymmetric (lm_head float), batch 1, one token, fp16.  Two builds of the same model:
* dlight: ``compile_tvm(..., tune="dlight")`` (the hand-written int4 kernels + dlight rules for everything else);
* MetaSchedule: ``compile_tvm(..., tune="meta_schedule", trials=--trials, work_dir=--work-dir)``: every kernel without
  a hand-written schedule tuned; each hand-written int4 kernel competes with a tuned te kernel of the same layer
  (the faster one is emitted; the choices table below).  A second MetaSchedule build with the same work_dir shows
  the records reused (no tuning).
Per-kernel times: torch.profiler (CUPTI) over decode steps, each step preceded by an L2 flush (tools/gpu_timing.py
L2Flush: a read of twice the L2), so every
kernel reads its weights from HBM as in a real decode step; µs per step per kernel name.  Step time: CUDA events
around one step after an L2 flush (cold), and back-to-back steps (hot), both via the Relax VM (host dispatch
included).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_decode_gpu import FULL, SMALL, make_models, rel_err
from gpu_timing import L2Flush, cuda_time_us, write_table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def cold_us(fn, flush, reps: int = 30) -> float:
    """Median µs of one call after an L2 flush (CUDA events around the call only)."""
    res = []
    for _ in range(reps + 3):
        flush()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        res.append(s.elapsed_time(e) * 1e3)
    return statistics.median(res[3:])


def kernel_us(runner, ids, flush, steps: int = 20) -> dict[str, tuple[int, float]]:
    """{kernel name: (launches per step, µs per step)} over ``steps`` cold decode steps (flush kernel excluded)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        runner(ids)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            flush()
            runner(ids)
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", 0.0)
        if t > 0 and "at::native" not in e.key:  # torch's kernels here are the L2 flush
            out[e.key] = (e.count // steps, t / steps)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="tools/results/tvm_tuning.md")
    ap.add_argument("--trials", type=int, default=400, help="MetaSchedule trials for the whole model (spread over "
                    "its tasks: about 20 for the FULL config)")
    ap.add_argument("--compete-trials", type=int, default=32, help="MetaSchedule trials for each hand-kernel "
                    "competition (one te kernel per distinct layer shape)")
    ap.add_argument("--work-dir", default=None, help="records directory (default: a fresh temporary one)")
    ap.add_argument("--small", action="store_true", help="a tiny config (smoke test)")
    ap.add_argument("--no-compete", action="store_true", help="tune only the kernels without a hand-written schedule "
                    "(each hand-kernel competition tunes a te kernel of that layer: ~1.5 min per layer shape)")
    args = ap.parse_args(argv)
    import fxcompress as fxc
    from fxcompress.backends.tvm import TVMBuildConfig, meta_schedule_usable

    ok, why = meta_schedule_usable()
    if not ok:
        print(f"MetaSchedule is not usable: {why}")
        return 2
    t0 = time.time()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="fxc-ms-"))
    _, dm, ids, desc = make_models(SMALL if args.small else FULL, "cuda", 0, rtn=True)
    dm = dm.cpu()
    ref = dm(ids.cpu())
    ids_c = ids.cuda()
    flush = L2Flush()
    cfg = TVMBuildConfig(ms_builder_timeout_s=120.0, ms_compete=not args.no_compete,
                         ms_compete_trials=args.compete_trials)
    builds = {}
    tb = time.time()
    builds["dlight"] = fxc.compile_tvm(dm, (ids.cpu(),), target="cuda", tune="dlight", dtype=torch.float16)
    t_dlight = time.time() - tb
    tb = time.time()
    builds["meta_schedule"] = fxc.compile_tvm(dm, (ids.cpu(),), target="cuda", tune="meta_schedule",
                                              trials=args.trials, work_dir=work, dtype=torch.float16, config=cfg)
    t_ms = time.time() - tb
    tb = time.time()
    again = fxc.compile_tvm(dm, (ids.cpu(),), target="cuda", tune="meta_schedule", trials=args.trials,
                            work_dir=work, dtype=torch.float16, config=cfg)
    t_again = time.time() - tb
    st, st2 = builds["meta_schedule"].info["tuning"], again.info["tuning"]
    gpu = torch.cuda.get_device_name(0)
    res = {}
    for name, r in builds.items():
        y = r(ids_c)
        res[name] = dict(err=rel_err(y, ref), hot=cuda_time_us(lambda: r(ids_c), iters=20, reps=10),  # noqa: B023
                         cold=cold_us(lambda: r(ids_c), flush), kernels=kernel_us(r, ids_c, flush))  # noqa: B023
    names = sorted(set(res["dlight"]["kernels"]) | set(res["meta_schedule"]["kernels"]),
                   key=lambda k: -max(res["dlight"]["kernels"].get(k, (0, 0))[1],
                                      res["meta_schedule"]["kernels"].get(k, (0, 0))[1]))
    import importlib.util

    cost = "xgb" if importlib.util.find_spec("xgboost") else "random"
    summary = (f"Model: {desc}; {'SMALL' if args.small else 'FULL (2048 wide, 4 layers)'} config, batch 1, fp16. "
               f"MetaSchedule: {args.trials} trials, cost model {cost}; {st['tasks']} tasks, {len(st['applied'])} "
               f"PrimFuncs got tuned schedules; hand-kernel competition {'off' if args.no_compete else 'on'}. Build: dlight {t_dlight:.0f} s, MetaSchedule {t_ms:.0f} s, rebuild "
               f"with the records {t_again:.0f} s (tuned {st2['tuned']}, reused {st2['reused']} of {st2['tasks']}).")
    lines = [f"# MetaSchedule vs dlight per kernel ({gpu})", "", summary, "",
             "| build | step cold µs (L2 flushed) | step hot µs | max rel err vs fp32 torch |", "|---|---|---|---|"]
    for name in builds:
        lines.append(f"| {name} | {res[name]['cold']:.1f} | {res[name]['hot']:.1f} | {res[name]['err']:.1e} |")
    lines += ["", ("Per kernel (torch.profiler, each step after an L2 flush; µs per decode step, all launches of "
                   "that kernel):"), "", "| kernel | launches | dlight µs | MetaSchedule µs | tuned / dlight |",
              "|---|---|---|---|---|"]
    for k in names:
        c1, a = res["dlight"]["kernels"].get(k, (0, 0.0))
        c2, b = res["meta_schedule"]["kernels"].get(k, (0, 0.0))
        ratio = f"{b / a:.2f}" if a and b else "-"
        lines.append(f"| `{k[:60]}` | {max(c1, c2)} | {a:.1f} | {b:.1f} | {ratio} |")
    choices = st.get("choices", {})
    if choices:
        lines += ["", ("Hand-written int4 kernels vs MetaSchedule-tuned te kernels of the same layer (standalone, "
                       "L2-hot time_evaluator; the tuned one replaces the hand one only below 0.97x):"), "",
                  "| (rows, K, N, bits, group, zp, scale rows) | hand kernel | hand µs | tuned µs | emitted |",
                  "|---|---|---|---|---|"]
        for sig, c in choices.items():
            tu = f"{c['tuned_us']:.1f}" if c.get("tuned_us") else "no record"
            lines.append(f"| {sig} | {c['kernel']} | {c['hand_us']:.1f} | {tu} | {c['winner']} |")
    print("\n".join(lines))
    write_table(args.out, lines, time.time() - t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
