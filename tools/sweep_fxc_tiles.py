"""Tile sweep of the hand-scheduled TVM kernels (fxcompress/backends/tvm/kernels/) on the GPU: int4 g128 GEMV /
small-batch GEMM, the CUDA-core packed GEMV vs the tensor-core kernel at several (warps, prefetch) tiles, next to
torch fp16 (cuBLAS), in one run.  The defaults (kernels.mma_gemv.DEFAULT_MMA_TILES,
kernels.cuda_core_gemv.tile_for) come from this table.

    PYTHONPATH=/tmp/gpu-site:$PWD python3 tools/sweep_fxc_tiles.py --out tools/results/fxc_tile_sweep.md
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from bench_gemv import build_tvm, make_weights
from gpu_timing import cuda_time_us, write_table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = [(4096, 4096), (8192, 8192), (4096, 11008)]
BATCHES = [1, 4, 8, 16]
# (label, TVMBuildConfig.mma_min_m, mma_tiles for every batch)
VARIANTS = [("cuda-core gemv", 99, None), ("mma w8 pf4", 1, (8, 4)), ("mma w8 pf8", 1, (8, 8)),
            ("mma w4 pf8", 1, (4, 8)), ("mma w4 pf4", 1, (4, 4))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="tools/results/fxc_tile_sweep.md")
    args = ap.parse_args(argv)
    import tvm

    from fxcompress.backends.tvm import TVMBuildConfig, pack_mma_words

    if not torch.cuda.is_available() or not tvm.cuda(0).exist:
        print("sweep_fxc_tiles needs a CUDA GPU visible to torch and TVM", file=sys.stderr)
        return 2
    t0 = time.time()
    dev = tvm.cuda(0)
    gpu = torch.cuda.get_device_name(0)
    rng = np.random.default_rng(0)
    rows = []
    for k, n in SHAPES:
        codes, words, scale, qmin = make_weights(k, n, 4, rng)
        wref = torch.from_numpy((codes.reshape(n, k // 128, 128).astype(np.float32)
                                 * scale.astype(np.float32)[..., None]).reshape(n, k)).cuda()
        w16 = wref.half()
        mma_words = pack_mma_words(codes, qmin)
        for m in BATCHES:
            x = torch.randn(1, m, k, device="cuda", dtype=torch.float16) * 0.5
            ref = torch.nn.functional.linear(x.float(), wref)
            t_torch = cuda_time_us(lambda: torch.nn.functional.linear(x, w16), iters=200, warmup=20)  # noqa: B023
            xt = tvm.runtime.from_dlpack(x)
            cells = []
            for _label, mmin, tile in VARIANTS:
                cfg = TVMBuildConfig(mma_min_m=mmin, mma_tiles={"small": tile, "batch": tile} if tile else None)
                build, kmod = build_tvm(k, n, m, 4, words, scale, qmin, "cuda", kernel="fxc", config=cfg)
                is_mma = "fxc_packed_mma" in build.device_source()
                wk = mma_words if is_mma else words
                yk = tvm.runtime.empty((1, m, n), "float16", dev)
                f = getattr(kmod, "mod", kmod)
                fargs = (xt, tvm.runtime.tensor(wk, dev), tvm.runtime.tensor(scale, dev), yk)
                f["main"](*fargs)
                err = ((torch.from_dlpack(yk).float() - ref).abs().max() / ref.abs().max()).item()
                t = f.time_evaluator("main", dev, number=100, repeat=11)(*fargs).median * 1e6
                cells.append((t, err))
            rows.append((f"{k}x{n}", m, t_torch, cells))
            print(f"{k}x{n} M={m}: torch {t_torch:.2f} | " + " | ".join(
                f"{v[0]}: {t:.2f} ({e:.0e})" for v, (t, e) in zip(VARIANTS, cells)), flush=True)
    total = time.time() - t0
    hdr = " | ".join(f"{v[0]} µs" for v in VARIANTS)
    lines = ["# Tile sweep of the hand-scheduled TVM kernels (int4 g128, fp16 activations)", "",
             f"GPU: **{gpu}**; torch {torch.__version__}; tvm {tvm.__version__}; {total:.0f} s.", "",
             "Command: `PYTHONPATH=/tmp/gpu-site:$PWD python3 tools/sweep_fxc_tiles.py`", "",
             "Kernel time (`time_evaluator` median) of one linear, K(in) x N(out), batch M; torch fp16 = `F.linear` "
             "(cuBLAS, CUDA events). mma wW pfP = tensor-core kernel with W warps splitting K and P 16-byte weight "
             "loads in flight per lane; cuda-core gemv = the packed GEMV with its default tile. Best per row in "
             "bold; max relative error of every cell vs an fp32 reference in the last column.", "",
             f"| K x N | M | torch fp16 µs | {hdr} | best vs torch | max err |",
             "|---|---|---|" + "---|" * len(VARIANTS) + "---|---|"]
    for shape, m, t_torch, cells in rows:
        best = min(t for t, _ in cells)
        vals = " | ".join(f"**{t:.2f}**" if t == best else f"{t:.2f}" for t, _ in cells)
        lines.append(f"| {shape} | {m} | {t_torch:.2f} | {vals} | {t_torch / best:.2f}x | "
                     f"{max(e for _, e in cells):.1e} |")
    write_table(args.out, lines, total)
    return 0


if __name__ == "__main__":
    sys.exit(main())
