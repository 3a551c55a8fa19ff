"""Timing helpers shared by the GPU benchmarks in tools/ (imported by script name: tools/ is on sys.path).

Honest timing (issue 13): in a real model every weight comes from HBM, because the other layers' weights have
pushed it out of L2 since its last use.  Back-to-back calls on one weight let an int4 layer (8192x8192 g128:
34.6 MB) sit in the H100's 50 MB L2 while the fp16 one (134 MB) cannot, which flatters int4 by 25-40%.  So:

* :func:`time_cold_hot` times each call *alone* between two CUDA events, after writing a buffer of at least
  twice the L2 size (:class:`L2Flush`, which can also read it instead; the size comes from ``torch.cuda.get_device_properties().L2_cache_size``,
  or 256 MB when that is not reported), or, with ``rotate``, cycles through enough copies of the weights that
  none is in L2 when it is used.  That is the **cold** figure, the main column of every table.
* The **hot** figure (back-to-back calls on one weight, batched between two events) is reported beside it.
* Each is measured in several repeats; a figure is the median of the per-repeat medians, with the spread
  (min / max of the per-repeat medians) beside it.  Ratios are quoted against torch fp16 timed in the same run.

Everything runs without CUDA too (``cuda=False``: wall clock, no flush), for the benches' ``--dry-run`` smoke
paths on a CPU; such figures are labelled as CPU and are not GPU results.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

DEFAULT_FLUSH_BYTES = 256 * 2**20  # when the device does not report its L2 size


def hbm_peak(name: str) -> float | None:
    """HBM bandwidth peak (bytes/s) for a GPU name, or None if unknown."""
    n = name.upper()
    return 4.8e12 if "H200" in n else 3.35e12 if "H100" in n else 2.0e12 if "A100" in n else None


def l2_cache_bytes(device: int = 0) -> int | None:
    """The GPU's L2 size in bytes (``L2_cache_size`` of the device properties), or None if not reported."""
    import torch

    if not torch.cuda.is_available():
        return None
    size = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", None)
    return int(size) if size else None


class L2Flush:
    """Evicts the L2 cache before a timed call by streaming a buffer of at least twice its size through it (256 MB
    if the size is unknown).  Neither mode is exact; weight rotation (``time_cold_hot(rotate=...)``, one copy per
    call, as a model reads each layer once per token) is the reference, and the GEMV table uses it.

    ``mode="write"`` (the default; every committed table before 2026-11-27 session 6 used it) fills the buffer: L2 is
    left holding ~50 MB of dirty lines, whose write-back to HBM then competes with the timed call's reads.  On H100s
    it added ~10 µs to a call against rotation: cuBLAS fp16 8192x8192 at batch 1 59.7 µs vs 50.1-52.4 rotated, the
    int4 kernel at 8192x28672 61.6 vs 50.4-50.6 rotated (the write figures from session 5's table, another H100):
    pessimistic for every path, and it lowers the ratio of the shorter call.  ``mode="read"`` sums the buffer: L2
    is left holding clean lines; fp16 then agrees with rotation (50.5 µs at 8192x8192, 166.0 vs 166.5-167.2 at
    8192x28672), but the int4 kernel measured below its rotated time on the small weight (4096x4096: 8.5-10.1 µs
    against 13.4-21.4 rotated), as if part of an 8.6 MB weight survived the flush.  Figures:
    tools/results/gemv_bench.md and fxc_tile_sweep_b1.md."""

    MODES = ("read", "write")

    def __init__(self, nbytes: int | None = None, device: int = 0, mode: str = "write"):
        import torch

        if mode not in self.MODES:
            raise ValueError(f"L2Flush mode must be one of {self.MODES}, got {mode!r}")
        l2 = l2_cache_bytes(device)
        self.l2_bytes, self.mode = l2, mode
        self.nbytes = int(nbytes) if nbytes else (max(2 * l2, 64 * 2**20) if l2 else DEFAULT_FLUSH_BYTES)
        self.nbytes -= self.nbytes % 8
        self.buf = torch.zeros(self.nbytes, dtype=torch.uint8, device=f"cuda:{device}")  # pages touched once
        self._words = self.buf.view(torch.int64)
        self._sum = torch.zeros((), dtype=torch.int64, device=f"cuda:{device}")

    def __call__(self) -> None:
        import torch

        if self.mode == "write":
            self.buf.zero_()  # every L2 line now holds (dirty) lines of this buffer
        else:
            torch.sum(self._words, dim=0, out=self._sum)  # every L2 line now holds (clean) lines of this buffer

    def describe(self) -> str:
        l2 = f"L2 {self.l2_bytes / 2**20:.0f} MiB" if self.l2_bytes else "L2 size not reported"
        what = "read" if self.mode == "read" else "written (dirty lines left in L2)"
        return f"{self.nbytes / 2**20:.0f} MiB buffer {what} before each timed call ({l2})"


def copies_to_defeat_l2(bytes_per_copy: int, device: int = 0, cap: int = 64) -> int:
    """How many rotated weight copies make every use a cold one: their total exceeds twice the L2 size."""
    l2 = l2_cache_bytes(device) or DEFAULT_FLUSH_BYTES // 2
    return max(2, min(cap, math.ceil(2 * l2 / max(1, bytes_per_copy)) + 1))


@dataclass(frozen=True)
class Spread:
    """Median of per-repeat medians, with the min and max of those medians (µs)."""

    median: float
    lo: float
    hi: float

    @classmethod
    def of(cls, per_repeat: list[float]) -> Spread:
        return cls(statistics.median(per_repeat), min(per_repeat), max(per_repeat))

    def __str__(self) -> str:
        return f"{self.median:.2f} ({self.lo:.2f}-{self.hi:.2f})"


@dataclass(frozen=True)
class Timing:
    """A cold and a hot figure for one workload, and how cold was obtained."""

    cold: Spread
    hot: Spread
    method: str  # "flush", "rotate N copies", "wall clock + flush", "cpu wall clock (dry run)"

    def ratio_to(self, base: Timing) -> float:
        """How many times faster than ``base`` (cold vs cold)."""
        return base.cold.median / self.cold.median


def _hot_cuda(fn, iters: int, reps: int) -> list[float]:
    import torch

    res = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(iters):
            fn()
        e.record()
        torch.cuda.synchronize()
        res.append(s.elapsed_time(e) * 1e3 / iters)
    return res


def time_cold_hot(fn, *, flush: L2Flush | None = None, rotate: list | None = None, reps: int = 7, calls: int = 20,
                  hot_iters: int = 50, warmup: int = 3, cuda: bool = True) -> Timing:
    """Cold and hot µs per call of ``fn`` (CUDA events; the work must run on the current torch stream).

    Cold: each of ``calls`` calls per repeat is timed alone, after ``flush()`` or, with ``rotate`` (a list of
    callables doing the same work on different weight copies, see :func:`copies_to_defeat_l2`), on the next copy.
    Hot: ``hot_iters`` back-to-back calls of ``fn`` between two events.  ``cuda=False``: wall clock on the host.
    """
    if flush is None and rotate is None and cuda:
        raise ValueError("time_cold_hot needs flush= or rotate= for the cold figure")
    fns = list(rotate) if rotate else [fn]
    for f in fns[: max(warmup, 1)]:
        f()
    for _ in range(warmup):
        fn()
    if not cuda:
        return _time_cpu(fn, fns, reps, calls, hot_iters)
    import torch

    torch.cuda.synchronize()
    cold = []
    for _ in range(reps):
        evs = []
        for i in range(calls):
            f = fns[i % len(fns)]
            if rotate is None:
                flush()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            f()
            e.record()
            evs.append((s, e))
        torch.cuda.synchronize()
        cold.append(statistics.median(s.elapsed_time(e) * 1e3 for s, e in evs))
    hot = _hot_cuda(fn, hot_iters, reps)
    method = f"rotate {len(fns)} weight copies" if rotate else "L2 flush"
    return Timing(Spread.of(cold), Spread.of(hot), method)


def _time_cpu(fn, fns, reps, calls, hot_iters) -> Timing:
    cold, hot = [], []
    for _ in range(reps):
        ts = []
        for i in range(calls):
            t = time.perf_counter()
            fns[i % len(fns)]()
            ts.append((time.perf_counter() - t) * 1e6)
        cold.append(statistics.median(ts))
        t = time.perf_counter()
        for _ in range(hot_iters):
            fn()
        hot.append((time.perf_counter() - t) * 1e6 / hot_iters)
    return Timing(Spread.of(cold), Spread.of(hot), "cpu wall clock (dry run, not a GPU figure)")


def wall_cold_hot(fn, *, flush: L2Flush | None, reps: int = 7, calls: int = 20, hot_iters: int = 100,
                  warmup: int = 5) -> Timing:
    """Like :func:`time_cold_hot` for a synchronous ``fn`` on its own stream (ORT ``run_with_iobinding``): wall
    clock; before each cold call the flush runs and the device is synchronized.  Host overhead is included."""
    import torch

    for _ in range(warmup):
        fn()
    cold, hot = [], []
    for _ in range(reps):
        ts = []
        for _ in range(calls):
            if flush is not None:
                flush()
            torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t) * 1e6)
        cold.append(statistics.median(ts))
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(hot_iters):
            fn()
        hot.append((time.perf_counter() - t) * 1e6 / hot_iters)
    return Timing(Spread.of(cold), Spread.of(hot), "wall clock + L2 flush" if flush else "wall clock")


def cuda_time_us(fn, iters: int = 50, reps: int = 15, warmup: int = 5) -> float:
    """L2-HOT median µs per call of ``fn`` over ``reps`` batches of ``iters`` back-to-back calls (CUDA events).

    Only for a secondary "hot" column or for work whose data cannot stay in L2; quote cold figures
    (:func:`time_cold_hot`) as the result.
    """
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    return statistics.median(_hot_cuda(fn, iters, reps))


def wall_time_us(fn, iters: int = 200, reps: int = 10, warmup: int = 10) -> float:
    """Median wall-clock µs per call of a synchronous ``fn`` (e.g. ORT ``run_with_iobinding``), back to back."""
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
