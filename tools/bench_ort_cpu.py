"""ONNX Runtime CPU benchmark: fp32 vs integer-weight exports (QDQ int8 CNNs, int4 MatMulNBits linears).

    /work/venv/bin/python tools/bench_ort_cpu.py [--quick] [--threads N] [--out tools/results/ort_cpu.md]

Every ORT row is checked for parity with the torch model it came from (max abs error column).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import torch

import fxcompress as fxc
from fxcompress.backends.onnx import export_onnx
from fxcompress.models import DigitsResNet, load_digits_split, pretrained_digits_resnet
from fxcompress.runtime.ort import load_ort
from fxcompress.runtime.runner import benchmark, check_parity

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from toymodels import DecoderBlock  # noqa: E402


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def run_case(rows, label, model, example, bench_inputs, variants, tmp, threads, min_time):
    """variants: list of (name, gm or None for fp32, export kwargs, runner kwargs)."""
    torch.set_num_threads(threads)
    with torch.no_grad():
        t = benchmark(model, bench_inputs, warmup=3, iters=10, min_time_s=min_time)
    rows.append((label, "torch eager fp32", "-", t["median_ms"], None, "-"))
    print(f"{label:<34} {'torch eager fp32':<34} {'-':>11}   {t['median_ms']:>9.3f} ms", flush=True)
    for name, gm, ekw, rkw in variants:
        src = gm if gm is not None else model
        path = Path(tmp) / f"{label.split()[0]}_{name.replace(' ', '_').replace('/', '_')}.onnx"
        if not path.exists():
            export_onnx(src, example, path, **ekw)
        r = load_ort(path, intra_op_num_threads=threads, **rkw)
        par = check_parity(src, r, bench_inputs)
        t = benchmark(r, bench_inputs, warmup=3, iters=10, min_time_s=min_time)
        ops = r.optimized_op_types()
        kern = ", ".join(f"{k}x{v}" for k, v in sorted(ops.items()) if k in (
            "MatMulNBits", "DequantizeLinear", "MatMul", "Conv", "FusedConv", "QLinearConv", "FusedMatMul", "Gemm"))
        rows.append((label, name, path.stat().st_size, t["median_ms"], par.max_abs, kern))
        print(f"{label:<34} {name:<34} {path.stat().st_size:>11} B {t['median_ms']:>9.3f} ms  "
              f"err {par.max_abs:.1e}  {kern}", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller linear stack, shorter timing")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "ort_cpu.md"))
    args = ap.parse_args(argv)
    min_time = 0.5 if args.quick else 2.0
    load0 = os.getloadavg()[0]
    rows = []
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        # 1) the trained digits CNN (8x8 inputs), and 2) a wider copy on 32x32 inputs (random weights)
        _, _, xte, _ = load_digits_split()
        cnns = [("digits ResNet w32 8x8", pretrained_digits_resnet(), xte[:1], [(1, xte[:1]), (64, xte[:64])])]
        wide = DigitsResNet(width=128).eval()
        x32 = torch.rand(8, 1, 32, 32)
        cnns.append(("ResNet w128 32x32 (random)", wide, x32[:1], [(1, x32[:1]), (8, x32)]))
        for label, model, ex, batches in cnns:
            gm = fxc.capture(model, (ex,))
            q8 = fxc.quantize_rtn(gm, fxc.RTNConfig(bits=8, symmetric=True, granularity="per_channel"))
            q4 = fxc.quantize_rtn(gm, fxc.RTNConfig(bits=4, symmetric=True, granularity="per_channel"))
            for bs, xb in batches:
                run_case(rows, f"{label} b{bs}", model, (ex,), (xb,),
                         [("ORT fp32", None, {}, {}),
                          ("ORT QDQ int8 per-channel (weights)", q8, {}, {}),
                          ("ORT QDQ int4 per-channel (weights)", q4, {}, {})], tmp, args.threads, min_time)
        # 3) a LLaMA-style decoder block, 4-bit per-group linears
        d, heads, ffn = (1024, 8, 2816) if args.quick else (2048, 16, 5632)
        blk = DecoderBlock(d, heads, ffn).eval()
        ex = torch.randn(1, 8, d)
        gm = fxc.capture(blk, (ex,))
        q4 = fxc.quantize_rtn(gm, fxc.RTNConfig(bits=4, symmetric=False, granularity="per_group",
                                                group_size=128))
        q8 = fxc.quantize_rtn(gm, fxc.RTNConfig(bits=8, symmetric=True, granularity="per_channel"))
        dyn = {"input_names": ["x"], "dynamic_axes": {"x": {0: "batch", 1: "seq"}, "output": {0: "batch", 1: "seq"}}}
        for tokens in (1, 128):
            x = torch.randn(1, tokens, d)
            run_case(rows, f"DecoderBlock d{d} ffn{ffn} t{tokens}", blk, (ex,), (x,),
                     [("ORT fp32", None, dyn, {}),
                      ("ORT QDQ int8 per-channel (fused, acc 0)", q8, dyn, {}),
                      ("ORT QDQ int8 per-channel (fused, acc 4)", q8, dyn, {"matmulnbits_accuracy_level": None}),
                      ("ORT QDQ int4 g128 (fused, acc 0)", q4, dyn, {}),
                      ("ORT QDQ int4 g128 (fused, acc 4)", q4, dyn, {"matmulnbits_accuracy_level": None}),
                      ("ORT MatMulNBits int4 g128 (acc 0)", q4, {**dyn, "weight_format": "matmulnbits"}, {}),
                      ("ORT MatMulNBits int4 g128 (acc 4)", q4, {**dyn, "weight_format": "matmulnbits",
                                                                 "accuracy_level": 4}, {})],
                     tmp, args.threads, min_time)
    write(rows, args, min_time, load0)


def write(rows, args, min_time, load0=None):
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = "/work/venv/bin/python tools/bench_ort_cpu.py" + (" --quick" if args.quick else "") + \
        f" --threads {args.threads}"
    lines = [
        "# ONNX Runtime on CPU: fp32 vs integer-weight exports",
        "",
        f"Command: `{cmd}`  ",
        f"Device: {cpu_name()}, {os.cpu_count()} logical CPUs, {args.threads} threads; onnxruntime {ort.__version__} "
        f"(CPUExecutionProvider, ORT_ENABLE_ALL), torch {torch.__version__}; {time.strftime('%Y-%m-%d')}; "
        f"1-min load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end (a shared machine: "
        "compare rows within one table only).  ",
        f"Latency: median of >= 10 runs and >= {min_time} s after 3 warm-up runs; error: max |ORT - torch| on the "
        "bench input (torch runs the quantized model the file came from).  'acc' is the MatMulNBits "
        "accuracy level: 0 = fp32 compute, 4 = int8 activations inside the kernel (ORT's default for fused QDQ).",
        "",
        "| model / input | runtime, weights | file bytes | latency ms | max abs err | kernels in ORT's optimized graph |",
        "|---|---|---:|---:|---:|---|",
    ]
    for label, name, size, ms, err, kern in rows:
        e = "-" if err is None else f"{err:.1e}"
        lines.append(f"| {label} | {name} | {size} | {ms:.3f} | {e} | {kern} |")
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
