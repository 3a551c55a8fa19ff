"""Timing helpers shared by the GPU benchmarks in tools/ (imported by script name: tools/ is on sys.path)."""
from __future__ import annotations

import statistics
import time


def hbm_peak(name: str) -> float | None:
    """HBM bandwidth peak (bytes/s) for a GPU name, or None if unknown."""
    n = name.upper()
    return 4.8e12 if "H200" in n else 3.35e12 if "H100" in n else 2.0e12 if "A100" in n else None


def cuda_time_us(fn, iters: int = 50, reps: int = 15, warmup: int = 5) -> float:
    """Median µs per call of ``fn`` over ``reps`` batches of ``iters`` calls, timed with CUDA events."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    res = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(iters):
            fn()
        e.record()
        torch.cuda.synchronize()
        res.append(s.elapsed_time(e) * 1e3 / iters)
    return statistics.median(res)


def wall_time_us(fn, iters: int = 200, reps: int = 10, warmup: int = 10) -> float:
    """Median wall-clock µs per call of a synchronous ``fn`` (e.g. ORT ``run_with_iobinding``)."""
    for _ in range(warmup):
        fn()
    res = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        res.append((time.perf_counter() - t) * 1e6 / iters)
    return statistics.median(res)


def write_table(path, lines, seconds: float) -> None:
    """Write a results table (markdown lines) to ``path`` and say so."""
    from pathlib import Path

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out} in {seconds:.0f} s")
