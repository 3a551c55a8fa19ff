"""ResNet-18 on the GPU: TVM with integer convolutions vs torch fp16 (cuDNN, channels-last) vs ONNX Runtime CUDA EP fp16.

    PYTHONPATH=/tmp/gpu-site:$PWD python3 tools/bench_cnn_gpu.py                 # H100: writes tools/results/cnn_gpu.md
    PYTHONPATH=$PWD /work/venv/bin/python tools/bench_cnn_gpu.py --dry-run      # CPU smoke run (llvm, tiny sizes)

Model: ``fxcompress.models.vision.resnet18`` (torchvision's ImageNet layout, 1000 classes), random init with random
BatchNorm statistics (no pretrained ResNet-18 ships here; latency does not depend on the values), 224x224, batch 1
and 32.  Rows, per batch size, in one process:

* ``torch fp16 eager``: the float model in fp16, channels-last (cuDNN), ``torch.no_grad``;
* ``torch fp16 compile``: the same through ``torch.compile`` (default mode; ``--no-compile`` skips it);
* ``ORT CUDA EP fp16``: the float model exported with ``fxcompress.export_onnx``, converted with
  ``fxcompress.backends.onnx.to_float16``, inputs / outputs bound on the GPU (``io_binding``);
* ``TVM int8 w8a8``: ``quantize_activations`` (8-bit per-channel weights with BN folded, uint8 activations with
  BN-derived ranges) built with ``compile_tvm(target="cuda", dtype=float16)``: every conv int8 x int8 from int8
  weight constants and int8 activations, the next layer's quantize fused into each conv's epilogue;
* ``TVM int8 weight-only``: ``quantize_rtn(8-bit per channel)``, fp16 activations, int8 conv weights decoded in the
  kernel.

Timing (tools/gpu_timing.py): **cold** = each call timed alone between CUDA events after an L2 flush (a write of
>= 2x the L2 size), the main column; **hot** = back-to-back calls, beside it; ``--reps`` repeats, median of the
per-repeat medians with their min-max.  ORT runs synchronously: wall clock with flush + synchronize before each
cold call (``wall_cold_hot``; includes ORT's host overhead).  ``cos`` = cosine of the logits against the fp32 torch
model (the float model for the float rows; the quantization is part of the int8 rows' figure).  A row that cannot
run keeps its reason.

How long: ~4-5 minutes on an H100 host (TVM: a one-time ~45 s import of TVM's tensor intrinsics, then ~20 s per
CUDA build, 4 builds; torch.compile ~30-60 s per batch size; timing < 30 s).  ``--dry-run``: llvm / CPU EP / torch
on CPU in fp32 (the TVM rows in fp16 activations on llvm, as on the GPU) at 32x32, batch 1 and 2, 2 repeats (~1-2 min
on 2 cores): exercises the code, not a GPU result.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_timing import L2Flush, Timing, time_cold_hot, wall_cold_hot, write_table  # noqa: E402

ROWS = ("torch fp16 eager", "torch fp16 compile", "ORT CUDA EP fp16", "TVM int8 w8a8", "TVM int8 weight-only")


def _model(seed: int = 0, num_classes: int = 1000):
    import torch

    from fxcompress.models.vision import resnet18, with_random_bn_statistics

    torch.manual_seed(seed)
    return with_random_bn_statistics(resnet18(num_classes=num_classes).eval(), seed)


def _cos(a, b) -> float:
    import torch

    return float(torch.nn.functional.cosine_similarity(a.double().flatten().cpu(), b.double().flatten().cpu(), dim=0))


def _short(e: Exception) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:150]}"


class Bench:
    def __init__(self, dry: bool, reps: int, calls: int):
        import torch

        self.dry, self.reps, self.calls = dry, reps, calls
        self.dev = "cpu" if dry else "cuda"
        self.fdt = torch.float32 if dry else torch.float16
        self.tvm_dt = torch.float16  # TVM rows build fp16 activations in the dry run too (llvm), as on the GPU
        self.flush = None if dry else L2Flush()

    def time(self, fn) -> Timing:
        if self.dry:
            return time_cold_hot(fn, reps=self.reps, calls=self.calls, hot_iters=3, warmup=1, cuda=False)
        return time_cold_hot(fn, flush=self.flush, reps=self.reps, calls=self.calls)

    # ---- rows -------------------------------------------------------------------------------------------------
    def torch_eager(self, model, x):
        import torch

        m = _to(model, self.dev, self.fdt)
        xin = _to(x, self.dev, self.fdt)

        def fn():
            with torch.no_grad():
                return m(xin)

        return self.time(fn), fn().float()

    def torch_compile(self, model, x):
        import torch

        if self.dry:
            raise RuntimeError("skipped in --dry-run (compiling on 2 CPU cores is slow and says nothing)")
        m = torch.compile(_to(model, self.dev, self.fdt))
        xin = _to(x, self.dev, self.fdt)

        def fn():
            with torch.no_grad():
                return m(xin)

        for _ in range(3):
            fn()  # compile + autotune outside the timing
        return self.time(fn), fn().float()

    def ort(self, onnx_path, x):
        import numpy as np
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        if self.dry:
            sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
        else:
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise RuntimeError(f"onnxruntime has no CUDAExecutionProvider ({ort.get_available_providers()})")
            sess = ort.InferenceSession(str(onnx_path), so, providers=[("CUDAExecutionProvider", {"device_id": 0})])
        xin = x.numpy().astype(np.float32 if self.dry else np.float16)
        io = sess.io_binding()
        xv = ort.OrtValue.ortvalue_from_numpy(xin, self.dev, 0)
        io.bind_ortvalue_input(sess.get_inputs()[0].name, xv)
        out = sess.get_outputs()[0]
        yv = ort.OrtValue.ortvalue_from_shape_and_type([x.shape[0], 1000 if not self.dry else 10], xin.dtype,
                                                       self.dev, 0)
        io.bind_ortvalue_output(out.name, yv)

        def fn():
            sess.run_with_iobinding(io)

        if self.dry:
            t = time_cold_hot(fn, reps=self.reps, calls=self.calls, hot_iters=3, warmup=1, cuda=False)
        else:
            t = wall_cold_hot(fn, flush=self.flush, reps=self.reps, calls=self.calls)
        fn()
        import torch

        return t, torch.from_numpy(yv.numpy().astype(np.float32))

    def tvm(self, qmodel, x):
        import tvm

        from fxcompress.backends.tvm import compile_tvm

        t0 = time.time()
        r = compile_tvm(qmodel, (x,), target="cuda" if not self.dry else "llvm", dtype=self.tvm_dt)
        build_s = time.time() - t0
        xin = _to(x, self.dev, self.tvm_dt).contiguous()
        arg = tvm.runtime.from_dlpack(xin)
        main = r.vm["main"]

        def fn():
            return main(arg)

        t = self.time(fn)
        y = r(xin).float()
        convs = r.info.get("convs", [])
        paths = sorted({c["path"] for c in convs})
        note = f"build {build_s:.0f} s; {len(convs)} convs: {', '.join(paths)}"
        if not self.dry:
            src = r.build.device_source() if getattr(r, "build", None) is not None else ""
            note += "; wmma tensor cores" if "wmma" in src else "; NO tensor-core instruction (SIMT; see rules/conv_gemm.py)"
        return t, y, note


def _to(obj, dev, dtype):
    import copy

    import torch

    if isinstance(obj, torch.Tensor):
        x = obj.to(dev, dtype)
        return x.contiguous(memory_format=torch.channels_last) if dev == "cuda" else x
    m = copy.deepcopy(obj).to(dev, dtype)
    return m.to(memory_format=torch.channels_last) if dev == "cuda" else m


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="default tools/results/cnn_gpu.md (dry run: /tmp/cnn_gpu_dry_run.md)")
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,32; dry run 1,2)")
    ap.add_argument("--size", type=int, default=None, help="image size (default 224; dry run 32)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--rows", default=",".join(ROWS), help=f"which rows, comma-separated, of {ROWS}")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    ap.add_argument("--dry-run", action="store_true", help="CPU: llvm, CPU EP, torch fp32, tiny sizes")
    args = ap.parse_args(argv)
    import torch

    import fxcompress as fxc
    from fxcompress.backends.onnx import to_float16

    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        print("bench_cnn_gpu needs a CUDA GPU (or --dry-run)", file=sys.stderr)
        return 2
    batches = [int(b) for b in (args.batches or ("1,2" if dry else "1,32")).split(",")]
    size = args.size or (32 if dry else 224)
    if dry:
        args.reps, args.calls = min(args.reps, 2), min(args.calls, 3)
    rows_wanted = [r.strip() for r in args.rows.split(",") if r.strip()]
    bad = sorted(set(rows_wanted) - set(ROWS))
    if bad:
        print(f"unknown --rows {bad}; choose from {ROWS}", file=sys.stderr)
        return 2
    if args.no_compile and "torch fp16 compile" in rows_wanted:
        rows_wanted.remove("torch fp16 compile")
    out = Path(args.out or ("/tmp/cnn_gpu_dry_run.md" if dry else "tools/results/cnn_gpu.md"))
    t_start = time.time()
    bench = Bench(dry, args.reps, args.calls)
    classes = 10 if dry else 1000
    model = _model(num_classes=classes)
    calib = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    quant = {}
    if "TVM int8 w8a8" in rows_wanted:
        quant["TVM int8 w8a8"] = fxc.quantize_activations(model, (calib,), fxc.ActivationConfig(bits=8, ranges="bn"))
    if "TVM int8 weight-only" in rows_wanted:
        quant["TVM int8 weight-only"] = fxc.quantize_rtn(fxc.capture(model, (calib,)),
                                                         fxc.RTNConfig(bits=8, granularity="per_channel"))
    results = []  # (batch, row, Timing | None, cos | None, note)
    with tempfile.TemporaryDirectory() as d:
        onnx_path = None
        if "ORT CUDA EP fp16" in rows_wanted:
            try:
                import onnx

                p = fxc.export_onnx(model, (calib,), Path(d) / "resnet18.onnx")
                if not dry:
                    onnx.save(to_float16(onnx.load(str(p))), str(p))
                onnx_path = p
            except Exception as e:  # noqa: BLE001
                onnx_err = _short(e)
        for bs in batches:
            x = torch.randn(bs, 3, size, size, generator=torch.Generator().manual_seed(2))
            with torch.no_grad():
                ref = model(x)  # fp32 on the CPU
            for row in rows_wanted:
                t0 = time.time()
                try:
                    if row == "torch fp16 eager":
                        t, y = bench.torch_eager(model, x)
                        note = "channels-last, cuDNN" if not dry else "fp32 CPU (dry run)"
                    elif row == "torch fp16 compile":
                        t, y = bench.torch_compile(model, x)
                        note = "channels-last, torch.compile default mode"
                    elif row == "ORT CUDA EP fp16":
                        if onnx_path is None:
                            raise RuntimeError(f"ONNX export failed: {onnx_err}")
                        t, y = bench.ort(onnx_path, x)
                        note = "io_binding, to_float16" if not dry else "CPU EP fp32 (dry run)"
                    else:
                        t, y, note = bench.tvm(quant[row], x)
                    res = (bs, row, t, _cos(y, ref), note)
                except Exception as e:  # noqa: BLE001 - the row keeps its reason
                    res = (bs, row, None, None, _short(e))
                results.append(res)
                print(f"batch {bs} {row}: {res[2].cold if res[2] else '-'} cold, "
                      f"{res[2].hot if res[2] else '-'} hot, cos {res[3]}, {res[4]} ({time.time() - t0:.0f} s)",
                      flush=True)
    device = "CPU (dry run: NOT a GPU result)" if dry else torch.cuda.get_device_name(0)
    lines = [f"# ResNet-18 {size}x{size}: TVM integer convolutions vs torch fp16 vs ORT CUDA EP fp16", "",
             f"Device: {device}.  `python3 tools/bench_cnn_gpu.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
             f"(random weights, {classes} classes).  Cold = each call alone after "
             f"{bench.flush.describe() if bench.flush else 'no flush (dry run)'}; hot = back-to-back.  "
             f"µs, median of {args.reps} repeat medians (min-max).  cos: logits vs the fp32 torch model.", "",
             "| batch | row | cold µs | hot µs | vs torch fp16 eager (cold) | cos vs fp32 | note |",
             "|---|---|---|---|---|---|---|"]
    base = {bs: t for bs, row, t, _, _ in results if row == "torch fp16 eager" and t is not None}
    for bs, row, t, cos, note in results:
        if t is None:
            lines.append(f"| {bs} | {row} | - | - | - | - | not run: {note} |")
            continue
        ratio = f"{t.ratio_to(base[bs]):.2f}x" if bs in base else "-"
        lines.append(f"| {bs} | {row} | {t.cold} | {t.hot} | {ratio} | {cos:.4f} | {note} |")
    lines += ["", f"Timing method: {next((t.method for _, _, t, _, _ in results if t), '-')}; ORT rows: wall clock "
              "around synchronous `run_with_iobinding` (flush + synchronize before each cold call)."]
    print("\n".join(lines))
    write_table(out, lines, time.time() - t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
