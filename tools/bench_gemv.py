"""Integer-weight GEMV / low-batch GEMM on the GPU: TVM (dlight, packed uint32 + fused decode) vs torch fp16
(cuBLAS) vs ONNX Runtime CUDA MatMulNBits, in one run.

    PYTHONPATH=/tmp/gpu-site:$PWD python3 tools/bench_gemv.py --out tools/results/gemv_bench.md

Weights are symmetric per-group (g128) codes (no zero-point tensor, as MLC-LLM's q4f16_1), fp16 scales and
activations, fp32 accumulation.  TVM time: ``time_evaluator`` over the fused decode+matmul kernel alone
("kernel") and over the whole Relax VM call ("vm").  torch / ORT: CUDA events / wall clock around many
calls.  Bytes moved = packed weight + scales + activations in + outputs; % of HBM peak from the GPU name.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from gpu_timing import cuda_time_us, hbm_peak, wall_time_us, write_table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = [(4096, 4096), (4096, 11008), (8192, 8192)]  # (K in, N out)
BATCHES = [1, 4, 16]
GROUP = 128


def make_weights(k, n, bits, rng):
    from fxcompress.backends.tvm import pack_words

    qmin = -(2 ** (bits - 1))
    codes = rng.integers(qmin, 2 ** (bits - 1), size=(n, k), dtype=np.int64)
    scale = (rng.random((n, k // GROUP), dtype=np.float32) * 0.02 + 0.001).astype(np.float16)
    return codes, pack_words(codes, bits, qmin), scale, qmin


def build_tvm(k, n, m, bits, words, scale, qmin, target, kernel="dlight", config=None):
    """Relax build of one packed linear; ``kernel="fxc"`` emits the hand-scheduled GEMV where it applies;
    ``config``: a ``TVMBuildConfig`` (decode mode, GEMV tiles; default: fxcompress's defaults)."""
    import tvm
    from tvm import relax

    from fxcompress.backends import tvm as B

    config = config or B.TVMBuildConfig()
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, m, k), "float16"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = B.emit_packed_linear(bb, x, words, scale.astype(np.float32), None, bits=bits, qmin=qmin,
                                     out_features=n, in_features=k, cuda=kernel == "fxc", config=config)
            o = bb.emit_output(y)
        bb.emit_func_output(o)
    build = B.build_tvm(bb.get(), None, target, "dlight", config=config)
    kern = [gv for gv, f in build.scheduled.functions.items()
            if isinstance(f, tvm.tirx.PrimFunc) and ("decode" in gv.name_hint or "fxc_packed" in gv.name_hint)]
    kmod = tvm.compile(tvm.IRModule({"main": build.scheduled[kern[0]].with_attr("global_symbol", "main")}),
                       target=build.target)
    return build, kmod


def rule_used(build, m: int = 1) -> str:
    src = build.device_source()
    if "fxc_packed_mma" in src:
        return "fxc mma (tensor cores)"
    if "fxc_packed_gemv" in src:
        return "fxc gemv"
    if "rf_local" not in src:
        return "matmul"
    return "gemv" if m == 1 else "small-batch gemv"


def ort_model(k, n, m, codes, scale, bits):
    """MatMulNBits (com.microsoft) model bytes: fp16 A (m, k), packed uint8 B (n, k/g, g*bits/8), fp16 scales."""
    import onnx
    from onnx import TensorProto, helper

    blocks = k // GROUP
    u = (codes + 2 ** (bits - 1)).astype(np.uint8)  # offset binary, zero point 2^(b-1) (ORT's default)
    if bits == 4:
        packed = (u[:, 0::2] | (u[:, 1::2] << 4)).astype(np.uint8).reshape(n, blocks, GROUP // 2)
    elif bits == 8:
        packed = u.reshape(n, blocks, GROUP)
    else:
        raise ValueError(f"MatMulNBits bits={bits} not benchmarked")
    node = helper.make_node("MatMulNBits", ["A", "B", "scales"], ["Y"], domain="com.microsoft", K=k, N=n,
                            bits=bits, block_size=GROUP, accuracy_level=0)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT16, [m, k])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT16, [m, n])],
                          [onnx.numpy_helper.from_array(packed, "B"),
                           onnx.numpy_helper.from_array(scale.reshape(-1).astype(np.float16), "scales")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    # onnx 1.23 writes IR version 12+, which onnxruntime 1.31 rejects ("model.cc: Unsupported model IR version");
    # opset 21 needs IR 10 (as fxcompress.backends.onnx writes it)
    model.ir_version = 10
    return model.SerializeToString()


def ort_session(k, n, m, codes, scale, bits, providers=("CUDAExecutionProvider",)):
    import onnxruntime as ort

    if providers[0] not in ort.get_available_providers():
        return None, f"no {providers[0]}"
    if bits not in (4, 8):
        return None, f"MatMulNBits bits={bits} not benchmarked"
    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        sess = ort.InferenceSession(ort_model(k, n, m, codes, scale, bits), so, providers=list(providers))
    except Exception as e:  # noqa: BLE001
        return None, "ORT: " + " ".join(str(e).split())[-120:]
    return sess, ""


def ort_time_us(sess, x_np, iters=200, reps=10):
    import onnxruntime as ort

    io = sess.io_binding()
    xv = ort.OrtValue.ortvalue_from_numpy(x_np, "cuda", 0)
    io.bind_ortvalue_input("A", xv)
    io.bind_output("Y", "cuda", 0)
    t = wall_time_us(lambda: sess.run_with_iobinding(io), iters=iters, reps=reps)
    return t, io.copy_outputs_to_cpu()[0]


# batch-1 schedule variants tried by --sweep: (name, decode mode, TVMBuildConfig.gemv_cuda)
VARIANTS = [
    ("dlight, I2F decode", "convert", None),
    ("dlight, magic decode", "magic", None),
    ("TS4 TR32", "magic", dict(TS=4, TR=32)),
    ("TS8 TR32", "magic", dict(TS=8, TR=32)),
    ("TS16 TR16", "magic", dict(TS=16, TR=16)),
    ("TS4 TR64", "magic", dict(TS=4, TR=64)),
    ("TS16 TR32 TILE_R16", "magic", dict(TS=16, TR=32, TILE_R=16, VEC_C=8)),
    ("TS4 TR32 TILE_R16", "magic", dict(TS=4, TR=32, TILE_R=16, VEC_C=8)),
]
SWEEP_CASES = [(4096, 4096, 4), (8192, 8192, 4), (4096, 11008, 4), (4096, 4096, 8), (4096, 4096, 3)]


def make_config(decode: str | None, cfg: dict | None, base=None):
    """A ``TVMBuildConfig`` with this decode mode (None: keep ``base``'s) and dlight GEMV overrides."""
    import dataclasses

    from fxcompress.backends.tvm import TVMBuildConfig

    base = base or TVMBuildConfig()
    return dataclasses.replace(base, decode_mode=decode or base.decode_mode, gemv_cuda=dict(cfg) if cfg else None)


def load_config(path) -> tuple[str | None, dict | None, str]:
    """(decode mode, GEMV config, name) from a --sweep JSON file (written by sweep())."""
    import json

    d = json.loads(Path(path).read_text())
    return d.get("decode"), d.get("config"), d.get("name", "")


def sweep(out_md: str, out_json: str) -> dict:
    """Time every VARIANTS entry on SWEEP_CASES (batch 1, kernel only); the fastest by geometric mean wins."""
    import json
    import math

    import tvm

    dev = tvm.cuda(0)
    gpu = torch.cuda.get_device_name(0)
    peak = hbm_peak(gpu)
    rng = np.random.default_rng(0)
    cases = []
    for k, n, bits in SWEEP_CASES:
        codes, words, scale, qmin = make_weights(k, n, bits, rng)
        x = torch.randn(1, 1, k, device="cuda", dtype=torch.float16) * 0.5
        wref = torch.from_numpy((codes.reshape(n, k // GROUP, GROUP).astype(np.float32)
                                 * scale.astype(np.float32)[..., None]).reshape(n, k)).to("cuda")
        w16 = wref.half()
        cases.append(dict(k=k, n=n, bits=bits, words=words, scale=scale, qmin=qmin, x=x,
                          ref=torch.nn.functional.linear(x.float(), wref),
                          torch=cuda_time_us(lambda: torch.nn.functional.linear(x, w16), iters=100, warmup=10)))  # noqa: B023
    res = []
    for name, decode, cfg in VARIANTS:
        vcfg = make_config(decode, cfg)
        times, errs = [], []
        for c in cases:
            try:
                build, kmod = build_tvm(c["k"], c["n"], 1, c["bits"], c["words"], c["scale"], c["qmin"], "cuda",
                                        config=vcfg)
                xt = tvm.runtime.from_dlpack(c["x"])
                yk = tvm.runtime.empty((1, 1, c["n"]), "float16", dev)
                f = getattr(kmod, "mod", kmod)
                args = (xt, tvm.runtime.tensor(c["words"], dev), tvm.runtime.tensor(c["scale"], dev), yk)
                f["main"](*args)
                y = torch.from_dlpack(yk).float()
                errs.append(((y - c["ref"]).abs().max() / c["ref"].abs().max()).item())
                times.append(f.time_evaluator("main", dev, number=200, repeat=9)(*args).median * 1e6)
            except Exception as e:  # noqa: BLE001
                print(f"  {name}: {c['k']}x{c['n']} int{c['bits']} failed: {str(e).splitlines()[-1][:100]}")
                times.append(float("inf"))
                errs.append(float("nan"))
        ok = all(math.isfinite(t) for t in times) and max(errs) < 5e-3
        geo = math.exp(sum(math.log(c["torch"] / t) for c, t in zip(cases, times)) / len(times)) if ok else 0.0
        res.append(dict(name=name, decode=decode, config=cfg, times=times, errs=errs, geo=geo))
        print(f"{name:>24}: " + "  ".join(f"{t:7.2f}" for t in times) + f"  | geo-mean speedup {geo:.2f}x"
              f"  max err {max(errs):.1e}", flush=True)
    best = max(res, key=lambda r: r["geo"])
    best["build_config"] = make_config(best["decode"], best["config"])
    hdr = " | ".join(f"{c['k']}x{c['n']} int{c['bits']} µs" for c in cases)
    lines = ["# Batch-1 GEMV schedule sweep (TVM fused decode kernel, `time_evaluator` median)", "",
             f"GPU: **{gpu}**; torch fp16 (cuBLAS) µs: " + ", ".join(
                 f"{c['k']}x{c['n']}: {c['torch']:.2f}" for c in cases if c["bits"] == 4 or c is cases[0]), "",
             f"| variant | decode | config | {hdr} | geo-mean speedup vs torch fp16 | max err |",
             "|---|---|---|" + "---|" * len(cases) + "---|---|"]
    for r in res:
        lines.append(f"| {r['name']}{' (best)' if r is best else ''} | {r['decode']} | {r['config'] or 'dlight'} | "
                     + " | ".join(f"{t:.2f}" for t in r["times"]) + f" | {r['geo']:.2f}x | {max(r['errs']):.1e} |")
    pct = []
    for c, t in zip(cases, best["times"]):
        q = c["words"].nbytes + c["scale"].nbytes + c["k"] * 2 + c["n"] * 2
        pct.append(f"{c['k']}x{c['n']} int{c['bits']}: {q / t / 1e3:.0f} GB/s"
                   + (f" = {q / (t * 1e-6) / peak * 100:.0f}% of HBM peak" if peak else ""))
    lines += ["", "Best: " + "; ".join(pct)]
    Path(out_md).parent.mkdir(parents=True, exist_ok=True)
    Path(out_md).write_text("\n".join(lines) + "\n")
    Path(out_json).write_text(json.dumps({"name": best["name"], "decode": best["decode"], "config": best["config"],
                                          "gpu": gpu}))
    print(f"best: {best['name']} ({best['geo']:.2f}x geo-mean); wrote {out_md} and {out_json}")
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="tools/results/gemv_bench.md")
    ap.add_argument("--bits", default="4,8,3", help="comma list of 2/3/4/8")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    ap.add_argument("--quick", action="store_true", help="4096x4096 only")
    ap.add_argument("--sweep", default=None, metavar="MD",
                    help="time the batch-1 schedule VARIANTS first (table to MD), then bench with the fastest")
    ap.add_argument("--sweep-json", default=None, help="where --sweep writes the winning config (MD + .json)")
    ap.add_argument("--config", default=None, help="a JSON file written by --sweep: decode mode + GEMV config")
    ap.add_argument("--decode", default=None, choices=["magic", "convert"], help="TVMBuildConfig.decode_mode")
    args = ap.parse_args(argv)
    config_note = "fxcompress defaults"
    bcfg = make_config(None, None)
    if args.config:
        dec, cfg, name = load_config(args.config)
        bcfg = make_config(dec, cfg)
        config_note = f"{name}: decode {dec}, GEMV config {cfg}"
    if args.decode:
        bcfg = make_config(args.decode, bcfg.gemv_cuda, bcfg)
    import tvm

    if not torch.cuda.is_available() or not tvm.cuda(0).exist:
        print("bench_gemv needs a CUDA GPU visible to torch and TVM", file=sys.stderr)
        return 2
    if args.sweep:
        best = sweep(args.sweep, args.sweep_json or args.sweep + ".json")
        config_note = f"sweep winner {best['name']}: decode {best['decode']}, GEMV config {best['config']}"
        bcfg = best["build_config"]
    from fxcompress.backends import tvm as B

    config_note += f" (decode_mode={bcfg.decode_mode!r}, gemv_cuda={dict(bcfg.gemv_cuda or {}) or None})"
    t_start = time.time()
    gpu = torch.cuda.get_device_name(0)
    peak = hbm_peak(gpu)
    dev = tvm.cuda(0)
    rng = np.random.default_rng(0)
    shapes = SHAPES[:1] if args.quick else SHAPES
    bits_list = [int(b) for b in args.bits.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    try:
        import onnxruntime as ort
        ort_ver = ort.__version__
    except ImportError:
        ort_ver = None
    rows = []
    for k, n in shapes:
        w16 = None
        for bits in bits_list:
            codes, words, scale, qmin = make_weights(k, n, bits, rng)
            wref = torch.from_numpy((codes.reshape(n, k // GROUP, GROUP).astype(np.float32)
                                     * scale.astype(np.float32)[..., None]).reshape(n, k)).to("cuda", torch.float16)
            if w16 is None:
                w16 = wref.clone()
            for m in batches:
                x = torch.randn(1, m, k, device="cuda", dtype=torch.float16) * 0.5
                ref = torch.nn.functional.linear(x.float(), wref.float())
                t_torch = cuda_time_us(lambda: torch.nn.functional.linear(x, w16), iters=100, warmup=10)  # noqa: B023
                act = m * k * 2 + m * n * 2
                fp16_bytes = n * k * 2 + act
                xt = tvm.runtime.from_dlpack(x)
                from tvm import relax

                kern, errs, t_vm, rule = {}, {}, None, ""
                for kind in ("fxc", "dlight"):
                    if kind == "fxc" and B.fxc_kind(m, k, n, bits, GROUP, "float16", bcfg) is None:
                        continue
                    build, kmod = build_tvm(k, n, m, bits, words, scale, qmin, "cuda", kernel=kind,
                                            config=bcfg)
                    vm = relax.VirtualMachine(build.executable, dev)
                    y = torch.from_dlpack(vm["main"](xt)).float()
                    errs[kind] = ((y - ref).abs().max() / ref.abs().max()).item()
                    yk = tvm.runtime.empty((1, m, n), "float16", dev)
                    fk = getattr(kmod, "mod", kmod).time_evaluator("main", dev, number=100, repeat=15)
                    wk = B.pack_mma_words(codes, qmin, bits) if rule_used(build, m).startswith("fxc mma") else words
                    kern[kind] = fk(xt, tvm.runtime.tensor(wk, dev), tvm.runtime.tensor(scale, dev), yk).median * 1e6
                    if t_vm is None:  # the default path (fxc where it applies, else dlight)
                        t_vm = vm.time_evaluator("main", dev, number=100, repeat=15)(xt).median * 1e6
                        rule = rule_used(build, m)
                    del vm, build, kmod
                best = min(kern, key=kern.get)
                t_kern, err = kern[best], errs[best]
                q_bytes = words.nbytes + scale.nbytes + act
                t_ort, ort_note = None, ""
                if ort_ver is not None and bits in (4, 8):
                    sess, ort_note = ort_session(k, n, m, codes, scale, bits)
                    if sess is not None:
                        try:
                            t_ort, yo = ort_time_us(sess, x.reshape(m, k).cpu().numpy())
                            oerr = float(np.abs(yo.astype(np.float32) - ref.reshape(m, n).cpu().numpy()).max()
                                         / ref.abs().max().item())
                            ort_note = f"err {oerr:.1e}"
                        except Exception as e:  # noqa: BLE001
                            ort_note = f"ORT run: {str(e).splitlines()[0][:60]}"
                rows.append(dict(shape=f"{k}x{n}", m=m, bits=bits, torch=t_torch, kern=t_kern, vm=t_vm, ort=t_ort,
                                 fxc=kern.get("fxc"), dlight=kern.get("dlight"), errs=errs,
                                 err=err, rule=rule, gbs=q_bytes / t_kern / 1e3,
                                 pct=(q_bytes / (t_kern * 1e-6) / peak * 100) if peak else None,
                                 torch_gbs=fp16_bytes / t_torch / 1e3, ort_note=ort_note,
                                 ort_gbs=(q_bytes / t_ort / 1e3) if t_ort else None))
                r = rows[-1]
                print(f"{r['shape']:>10} M={m:<3} int{bits}: tvm fxc {kern.get('fxc', float('nan')):8.2f} us, "
                      f"dlight {kern['dlight']:8.2f} us (vm {t_vm:8.2f}) "
                      f"{r['gbs']:7.0f} GB/s | torch fp16 {t_torch:8.2f} us | ort {t_ort if t_ort else float('nan'):8.2f} us"
                      f" | speedup {t_torch / t_kern:5.2f}x | err {err:.1e} [{r['rule']}] {ort_note}", flush=True)
            torch.cuda.empty_cache()
    total = time.time() - t_start
    lines = [
        "# Integer-weight GEMV / low-batch GEMM: TVM (hand-scheduled fxc kernels, dlight) vs torch fp16 vs ORT "
        "MatMulNBits", "",
        f"GPU: **{gpu}**; HBM peak used for %: {peak / 1e12 if peak else 'unknown'} TB/s; torch {torch.__version__}; "
        f"tvm {tvm.__version__}; onnxruntime {ort_ver or 'not importable'}; total bench time {total:.0f} s.", "",
        "Command: `PYTHONPATH=/tmp/gpu-site:$PWD python3 tools/bench_gemv.py " + " ".join(argv or sys.argv[1:])
        + "`", "", f"Schedule: {config_note}.", "",
        "Weights: symmetric per-group g128 codes packed into uint32 words along K (int4: 8/word, int8: 4/word, "
        "int3: 10/word), fp16 scales, fp16 activations, fp32 accumulation; shape is K(in) x N(out), batch M. "
        "TVM fxc = `time_evaluator` of the hand-scheduled kernel (fxcompress/backends/tvm/kernels/: the CUDA-core "
        "packed GEMV, bits 2/4/8, or the int4 / int8 tensor-core kernel, see rule); TVM dlight = the fused te decode+matmul kernel scheduled by dlight; best = the faster of the "
        "two; TVM vm = the whole Relax VM call of the default path (adds host dispatch). torch fp16 = `F.linear` (cuBLAS), CUDA events. ORT = MatMulNBits on the CUDA EP "
        "through io_binding, wall clock (includes host overhead). GB/s = (packed weight + scales + activations "
        "in/out) / best TVM kernel time. Speedup = torch fp16 / best TVM kernel. err = max|y - ref| / max|ref| vs an "
        "fp32 reference of the dequantized weight (fxc / dlight). rule = the kernel of the default path.", "",
        "| K x N | M | bits | TVM fxc µs | TVM dlight µs | TVM vm µs | best GB/s | % HBM peak | torch fp16 µs | "
        "torch GB/s | ORT µs | speedup vs torch | err fxc / dlight | rule | ORT note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        pct = f"{r['pct']:.0f}%" if r["pct"] is not None else "n/a"
        t_ort = f"{r['ort']:.2f}" if r["ort"] else "-"
        fxc = f"{r['fxc']:.2f}" if r["fxc"] else "-"
        errs = " / ".join(f"{r['errs'][k]:.1e}" if k in r["errs"] else "-" for k in ("fxc", "dlight"))
        lines.append(f"| {r['shape']} | {r['m']} | int{r['bits']} | {fxc} | {r['dlight']:.2f} | {r['vm']:.2f} | "
                     f"{r['gbs']:.0f} | {pct} | {r['torch']:.2f} | {r['torch_gbs']:.0f} | {t_ort} | "
                     f"{r['torch'] / r['kern']:.2f}x | {errs} | {r['rule']} | {r['ort_note']} |")
    write_table(args.out, lines, total)
    return 0


if __name__ == "__main__":
    sys.exit(main())
