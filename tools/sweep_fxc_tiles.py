"""Tile sweep of the hand-scheduled TVM kernels (fxcompress/backends/tvm/kernels/) on the GPU: int4 g128 GEMV /
small-batch GEMM, weights cold (L2 flushed before each timed call) and hot beside it, next to torch fp16 (cuBLAS)
in the same run: the CUDA-core packed GEMV (its default tile, 1..16 rows), the tensor-core kernel ``fxc_mma`` at
several ``(warps, prefetch)`` tiles, and the tensor-core batch kernel ``fxc_mma_batch`` at several
``(row_tiles, warps, prefetch, stage)`` tiles (5..32 rows).  The defaults (kernels.mma_gemv.DEFAULT_MMA_TILES,
kernels.mma_batch.DEFAULT_BATCH_TILES, kernels.cuda_core_gemv.tile_for) come from this table.

    PYTHONPATH=/tmp/gpu-site:$PWD python3 tools/sweep_fxc_tiles.py --out tools/results/fxc_tile_sweep.md
    # in pieces (each well under 10 minutes), e.g. the tensor-core kernels at 8..32 rows, two shapes per run:
    PYTHONPATH=/tmp/gpu-site:$PWD python3 tools/sweep_fxc_tiles.py --kernels mma,batch --batches 8,16,32 \\
        --shapes 4096x4096,8192x8192 --out tools/results/fxc_tile_sweep_batch_a.md

Cost: one nvcc build and about 300 timed calls per cell, roughly 2 s a cell, plus up to a minute per shape to make
and pack the weights (8192x28672); the default run has 192 cells (about 8 minutes), the piece above 72.

Each kernel is generated alone (``emit.fxc_primfunc``, no epilogue) and compiled with ``tvm.compile``; one cell =
``cold / hot`` µs (tools/gpu_timing.py: cold = each call alone after writing a buffer of twice the L2 size, CUDA
events; hot = back-to-back calls; medians of per-repeat medians).  The batch kernel adapts a requested tile to the
layer (``kernels.mma_batch.batch_tile``: row tiles to a divisor of N / 16, warps to a divisor of the K loads); the
log line of each cell prints the tile it ran.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from bench_gemv import make_weights, target
from gpu_timing import L2Flush, time_cold_hot, write_table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = [(4096, 4096), (8192, 8192), (4096, 11008), (8192, 28672)]  # (K in, N out)
BATCHES = [1, 4, 8, 16, 32]
GROUP = 128
MMA_TILES = [(8, 4), (8, 8), (4, 8), (4, 4)]  # fxc_mma: (warps, prefetch)
# fxc_mma_batch: (row tiles a warp, warps splitting K, weight loads in flight per row tile, stage: activations
# staged in shared memory)
BATCH_TILES = [(4, 8, 2, 1), (4, 8, 2, 0), (2, 8, 4, 1), (2, 8, 4, 0), (4, 4, 4, 1), (8, 4, 2, 1), (8, 8, 1, 1),
               (1, 8, 4, 1)]
KERNELS = ("gemv", "mma", "batch")


def batch_label(tile) -> str:
    r, w, p, st = tile
    return f"batch r{r} w{w} pf{p} s{st}"


def variants(kernels, mma_tiles=MMA_TILES, batch_tiles=BATCH_TILES):
    """(label, kind, tile-or-None, rows it applies to) per column."""
    out = []
    if "gemv" in kernels:
        out.append(("cuda-core gemv", "fxc_gemv", None, range(1, 17)))
    if "mma" in kernels:
        out += [(f"mma w{w} pf{p}", "fxc_mma", (w, p), range(1, 33)) for w, p in mma_tiles]
    if "batch" in kernels:
        out += [(batch_label(t), "fxc_mma_batch", t, range(5, 33)) for t in batch_tiles]
    return out


def kernel_func(kind, tile, m, k, n, qmin):
    """The hand-written kernel ``kind`` of one int4 g128 symmetric linear (x (1, m, k) fp16 -> y (1, m, n)),
    at ``tile``, and a description of the tile it runs."""
    from fxcompress.backends.tvm.emit import fxc_primfunc
    from fxcompress.backends.tvm.kernels import Epilogue, tile_for
    from fxcompress.backends.tvm.kernels.mma_batch import batch_case, batch_tile
    from fxcompress.backends.tvm.kernels.mma_gemv import mma_tile

    params = dict(kind=kind, m=m, k=k, n=n, bits=4, qmin=qmin, group_size=GROUP, scale_rows=n, has_zero_point=False,
                  has_bias=False, lead=[1, m])
    if kind == "fxc_gemv":
        t = tile_for(m, k, n)
        params["tile"] = asdict(t)
        ran = str(t)
    elif kind == "fxc_mma":
        params["tiles"] = {"small": list(tile), "batch": list(tile)}
        w, p = mma_tile(m, k, 4, {"small": tile, "batch": tile})
        ran = f"w{w} pf{p}"
    else:
        params["tiles"] = {batch_case(m): list(tile)}
        ran = batch_label(batch_tile(m, k, n, 4, {batch_case(m): tile}))
    return fxc_primfunc(params, Epilogue(), "main").with_attr("global_symbol", "main"), ran


def default_column(m, k, n):
    """(kernel, column label) of what a build with the default TVMBuildConfig emits for this layer."""
    from fxcompress.backends.tvm import TVMBuildConfig
    from fxcompress.backends.tvm.emit import fxc_kind
    from fxcompress.backends.tvm.kernels.mma_batch import batch_tile
    from fxcompress.backends.tvm.kernels.mma_gemv import DEFAULT_MMA_TILES

    kind = fxc_kind(m, k, n, 4, GROUP, "float16", TVMBuildConfig())
    if kind == "fxc_mma_batch":
        return kind, batch_label(batch_tile(m, k, n, 4))  # the default tile as adapted to this layer
    if kind == "fxc_mma":
        w, p = DEFAULT_MMA_TILES["small" if m <= 4 else "batch"]
        return kind, f"mma w{w} pf{p}"
    return kind, "cuda-core gemv" if kind == "fxc_gemv" else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="tools/results/fxc_tile_sweep.md")
    ap.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES), help="KxN comma list")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)), help="comma list of rows (1..32)")
    ap.add_argument("--kernels", default=",".join(KERNELS), help=f"comma list of {','.join(KERNELS)}")
    ap.add_argument("--mma-tiles", default=None, help="fxc_mma tiles as WxP comma list (default: "
                    + ",".join(f"{w}x{p}" for w, p in MMA_TILES) + ")")
    ap.add_argument("--batch-tiles", default=None, help="fxc_mma_batch tiles as RxWxPxS comma list (default: "
                    + ",".join("x".join(map(str, t)) for t in BATCH_TILES) + ")")
    ap.add_argument("--flush", default="write", choices=["write", "read"], help="how the L2 flush evicts "
                    "(tools/gpu_timing.py L2Flush)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--calls", type=int, default=20)
    args = ap.parse_args(argv)

    def tiles(text, default, size):
        if text is None:
            return default
        out = [tuple(int(v) for v in t.split("x")) for t in text.split(",")]
        if any(len(t) != size for t in out):
            raise SystemExit(f"tiles {text!r}: each needs {size} numbers joined by 'x'")
        return out
    import tvm

    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    kernels = args.kernels.split(",")
    bad = sorted(set(kernels) - set(KERNELS))
    if bad:
        print(f"--kernels: unknown {bad}; choose from {list(KERNELS)}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available() or not tvm.cuda(0).exist:
        print("sweep_fxc_tiles needs a CUDA GPU visible to torch and TVM", file=sys.stderr)
        return 2
    from fxcompress.backends.tvm import pack_mma_words

    t0 = time.time()
    dev = tvm.cuda(0)
    gpu = torch.cuda.get_device_name(0)
    flush = L2Flush(mode=args.flush)
    cols = variants(kernels, tiles(args.mma_tiles, MMA_TILES, 2), tiles(args.batch_tiles, BATCH_TILES, 4))
    rng = np.random.default_rng(0)
    rows = []
    for k, n in shapes:
        codes, words, scale, qmin = make_weights(k, n, 4, rng)
        wref = torch.from_numpy((codes.reshape(n, k // GROUP, GROUP).astype(np.float32)
                                 * scale.astype(np.float32)[..., None]).reshape(n, k)).cuda()
        w16 = wref.half()
        wt = {"fxc_gemv": tvm.runtime.tensor(words, dev), "fxc_mma": tvm.runtime.tensor(pack_mma_words(codes, qmin), dev)}
        wt["fxc_mma_batch"] = wt["fxc_mma"]
        st = tvm.runtime.tensor(scale, dev)
        del codes
        for m in batches:
            x = torch.randn(1, m, k, device="cuda", dtype=torch.float16) * 0.5
            ref = torch.nn.functional.linear(x.float(), wref)
            t_torch = time_cold_hot(lambda: torch.nn.functional.linear(x, w16), flush=flush,  # noqa: B023
                                    reps=args.reps, calls=args.calls)
            xt = tvm.runtime.from_dlpack(x)
            yk = tvm.runtime.empty((1, m, n), "float16", dev)
            cells = {}
            for label, kind, tile, applies in cols:
                if m not in applies:
                    continue
                f, ran = kernel_func(kind, tile, m, k, n, qmin)
                lib = tvm.compile(tvm.IRModule({"main": f}), target="cuda")
                fn = getattr(lib, "mod", lib)["main"]
                fn(xt, wt[kind], st, yk)
                err = ((torch.from_dlpack(yk).float() - ref).abs().max() / ref.abs().max()).item()
                t = time_cold_hot(lambda: fn(xt, wt[kind], st, yk), flush=flush,  # noqa: B023
                                  reps=args.reps, calls=args.calls)
                cells[label] = (t, err, ran)
            dk = default_column(m, k, n)
            rows.append((f"{k}x{n}", k, n, m, t_torch, cells, dk))
            print(f"{k}x{n} M={m}: torch cold {t_torch.cold.median:.2f} hot {t_torch.hot.median:.2f} | " + " | ".join(
                f"{lab} [{ran}]: {t.cold.median:.2f} / {t.hot.median:.2f} ({e:.0e})"
                for lab, (t, e, ran) in cells.items()) + f" | default {dk[1]}", flush=True)
    total = time.time() - t0
    labels = [c[0] for c in cols]
    lines = ["# Tile sweep of the hand-scheduled TVM kernels (int4 g128, fp16 activations, weights cold)", "",
             f"GPU: **{gpu}**; torch {torch.__version__}; tvm {tvm.__version__}; {total:.0f} s; cold = "
             f"{flush.describe()}.", "",
             f"Command: `PYTHONPATH=/tmp/gpu-site:$PWD python3 tools/sweep_fxc_tiles.py {' '.join(argv or sys.argv[1:])}`",
             "",
             "One linear, K(in) x N(out), M rows; each cell `cold / hot` µs of the kernel alone (CUDA events; cold: "
             "L2 flushed before each call). torch fp16 = `F.linear` (cuBLAS). mma wW pfP = `fxc_mma` (W warps "
             "splitting K, P 16-byte weight loads in flight per lane); batch rR wW pfP sS = `fxc_mma_batch` (R "
             "16-feature row tiles a warp, each activation fragment reused for R weight fragments; W warps split K; "
             "P loads in flight per row tile; S = 1: the activations of each K block staged in shared memory with "
             "16-byte loads, 0: B fragments straight from global memory); cuda-core gemv = the packed GEMV at its "
             "default tile. Best cold per row in bold; `default` = the kernel (and tile) a default build emits, its "
             "cold speed vs torch fp16, the issue-13 target and whether it is met; max relative error of every cell "
             "vs an fp32 reference in the last column.", "",
             f"| K x N | M | torch fp16 µs | {' | '.join(f'{lab} µs' for lab in labels)} | best cold vs torch | "
             "default: kernel, cold vs torch | target | met | max err |",
             "|---|---|---|" + "---|" * len(labels) + "---|---|---|---|---|"]
    for shape, k, n, m, t_torch, cells, dk in rows:
        best = min(t.cold.median for t, _, _ in cells.values()) if cells else None
        vals = []
        for lab in labels:
            if lab not in cells:
                vals.append("-")
                continue
            t = cells[lab][0]
            s = f"{t.cold.median:.2f} / {t.hot.median:.2f}"
            vals.append(f"**{s}**" if t.cold.median == best else s)
        tg = target(k, n, m, 4)
        ratio = f"{t_torch.cold.median / best:.2f}x" if best else "-"
        err = max((e for _, e, _ in cells.values()), default=float("nan"))
        dt = cells.get(dk[1])
        dratio = t_torch.cold.median / dt[0].cold.median if dt else None
        default = f"{dk[0]}, {dratio:.2f}x" if dt else f"{dk[0]}, not swept"
        met = "-" if not (tg and dt) else "yes" if dratio >= tg else "no"
        lines.append(f"| {shape} | {m} | {t_torch.cold.median:.2f} / {t_torch.hot.median:.2f} | {' | '.join(vals)} "
                     f"| {ratio} | {default} | {f'>= {tg:.1f}x' if tg else '-'} | {met} | {err:.1e} |")
    write_table(args.out, lines, total)
    return 0


if __name__ == "__main__":
    sys.exit(main())
