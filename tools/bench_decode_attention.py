"""The fused decode attention kernel on the GPU, single kernel against the slots split over blocks (flash-decoding):
µs per call, cold (L2 flushed) and hot, for each split count, at a few cache positions.

    PYTHONPATH=/tmp/gpu-site:$PWD python3 tools/bench_decode_attention.py --out tools/results/decode_attention_gpu.md
    PYTHONPATH=$PWD python3 tools/bench_decode_attention.py --dry-run     # CPU smoke run: llvm, no GPU figures

Shapes (batch 1, fp16, 384 cache slots): the 2048-wide model of tools/bench_generate.py (16 heads, 16 KV heads x
128) and SmolLM2-135M (9 query heads, 3 KV heads x 64); ``pos`` = the slot the new token is written to (pos + 1
slots attended).  A split count ``P > 1`` is the split kernel (``call_tir_inplace``: caches written in place,
partial softmax states) followed by the combine kernel, timed together (two launches, as in the decode step);
``P = 1`` is the single kernel.  The default column marks ``attention_splits(shape)``, the importer's choice.
err = max |kernel - torch ``cached_attention`` in fp32| on the same inputs.

Timing (tools/gpu_timing.py): **cold** = each call timed alone with CUDA events after an L2 flush (a write of
>= 2x the L2 size); **hot** = back-to-back calls, beside it.  Median of the per-repeat medians (spread: min-max
of those medians).  The caches are rewritten at slot pos by every call (the same values: the kernel's own write).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from gpu_timing import L2Flush, time_cold_hot, write_table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fxcompress.backends.tvm.kernels.decode_attention import (  # noqa: E402
    AttentionShape,
    attention_splits,
    decode_attention_combine_primfunc,
    decode_attention_primfunc,
)
from fxcompress.lm.attention import cached_attention  # noqa: E402

SHAPES = {"wide": (1, 16, 16, 384, 128), "smollm2": (1, 9, 3, 384, 64)}
SPLITS = [1, 2, 4, 8, 14, 16, 32]
POSITIONS = [15, 150, 383]
DRY = {"shapes": {"tiny": (1, 4, 2, 48, 32)}, "splits": [1, 3], "positions": [5, 47]}


def build(shape: AttentionShape, scale: float, splits: int, target: str):
    """The compiled kernel(s): ``main`` (the single kernel, or the split kernel) and, split, ``combine``."""
    import tvm

    from fxcompress.backends.tvm.base import make_target

    cuda = target == "cuda"
    funcs = {"main": decode_attention_primfunc(shape, scale, cuda, splits=splits)}
    if splits > 1:
        funcs["combine"] = decode_attention_combine_primfunc(shape, splits, cuda)
    mod = tvm.IRModule({n: f.with_attr("global_symbol", n) for n, f in funcs.items()})
    return tvm.compile(mod, target=make_target(target))


def run_case(name, dims, splits, positions, args, dev, flush, rows):
    import tvm

    b, h, kvh, s, d = dims
    dt = torch.float16
    shape = AttentionShape(b, h, kvh, s, d, "float16", "float16", "float16", "float16", "float16")
    scale = d ** -0.5
    t0 = time.time()
    mod = build(shape, scale, splits, "llvm" if args.dry_run else "cuda")
    secs = time.time() - t0
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, n, 1, d, generator=g).to(dt) for n in (h, kvh, kvh))
    kc, vc = (torch.randn(b, kvh, s, d, generator=g).to(dt) for _ in range(2))
    for pos in positions:
        ins = [tvm.runtime.tensor(x.numpy(), dev) for x in (q, k, v, kc, vc, torch.tensor([pos]))]
        out = tvm.runtime.empty((b, h, 1, d), "float16", dev)
        if splits > 1:
            acc = tvm.runtime.empty((b, h, splits, d), "float32", dev)
            state = tvm.runtime.empty((b, h, splits, 2), "float32", dev)
            main, comb = mod["main"], mod["combine"]

            def fn(main=main, comb=comb, ins=ins, acc=acc, state=state, out=out):
                main(*ins, acc, state)
                comb(acc, state, out)
        else:
            main = mod["main"]

            def fn(main=main, ins=ins, out=out):
                main(*ins, out)

        fn()
        ref = cached_attention(q.float(), k.float(), v.float(), kc.float(), vc.float(), torch.tensor([pos]), scale)[0]
        err = (torch.from_numpy(out.numpy()).float() - ref).abs().max().item()
        t = time_cold_hot(fn, flush=flush, reps=args.reps, calls=args.calls, cuda=not args.dry_run)
        rows.append(dict(shape=name, dims=dims, splits=splits, default=splits == attention_splits(shape), pos=pos,
                         t=t, err=err, build_s=secs))
        print(f"{name:>8} P={splits:<3} pos={pos:<4} cold {t.cold} hot {t.hot} µs  err {err:.1e}", flush=True)


def table(rows, args, gpu, flush, total, argv) -> list[str]:
    import tvm

    how = ("DRY RUN on the CPU (llvm target, wall clock, no flush): exercises the code, NOT a GPU result"
           if args.dry_run else f"cold = {flush.describe()}")
    lines = ["# Fused decode attention: single kernel vs the slots split over blocks (flash-decoding)", "",
             f"GPU: **{gpu}**; torch {torch.__version__}; tvm {tvm.__version__}; total bench time {total:.0f} s.", "",
             "Command: `PYTHONPATH=/tmp/gpu-site:$PWD python3 tools/bench_decode_attention.py " + " ".join(argv) + "`",
             "", f"Timing: {how}; each call timed alone (CUDA events); hot = back-to-back calls. Figures: median of "
             f"{args.reps} per-repeat medians ({args.calls} calls each), spread = min-max of those medians. P > 1: "
             "the split kernel + the combine kernel (two launches); default = `attention_splits(shape)`.", "",
             "| shape (B, H, KVH, S, D) | splits P | default | pos | cold µs | hot µs | err vs fp32 |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} {r['dims']} | {r['splits']} | {'**yes**' if r['default'] else ''} | "
                     f"{r['pos']} | {r['t'].cold} | {r['t'].hot} | {r['err']:.1e} |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(SHAPES))
    ap.add_argument("--splits", nargs="+", type=int, default=None, help=f"split counts (default {SPLITS} and the "
                    "default of each shape)")
    ap.add_argument("--positions", nargs="+", type=int, default=POSITIONS)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--dry-run", action="store_true", help="CPU smoke run (llvm, a tiny shape): no GPU figures")
    ap.add_argument("--out", default=None, help="results table (default tools/results/decode_attention_gpu.md; "
                    "a dry run writes only where --out says)")
    a = ap.parse_args(argv)
    argv_s = list(argv if argv is not None else sys.argv[1:])
    for p in a.splits or []:
        if p < 1:
            ap.error(f"--splits must be >= 1, got {p}")
    import tvm

    t0 = time.time()
    if a.dry_run:
        shapes, positions, dev, gpu, flush = DRY["shapes"], DRY["positions"], tvm.cpu(0), "CPU (dry run)", None
        base = a.splits or DRY["splits"]
    else:
        if not torch.cuda.is_available():
            ap.error("needs a CUDA GPU (or --dry-run)")
        shapes = {n: SHAPES[n] for n in a.shapes}
        positions, dev, gpu, flush = a.positions, tvm.cuda(0), torch.cuda.get_device_name(0), L2Flush()
        base = a.splits or SPLITS
    rows: list[dict] = []
    for name, dims in shapes.items():
        default = attention_splits(AttentionShape(*dims, *["float16"] * 5))
        pos = [p for p in positions if 0 <= p < dims[3]]
        for splits in sorted(set(base) | ({default} if a.splits is None else set())):
            run_case(name, dims, splits, pos, a, dev, flush, rows)
    out = a.out or (None if a.dry_run else "tools/results/decode_attention_gpu.md")
    lines = table(rows, a, gpu, flush, time.time() - t0, argv_s)
    print("\n".join(lines))
    if out:
        write_table(out, lines, time.time() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
