"""Integer-weight GEMV / low-batch GEMM on the GPU, weights cold (from HBM): TVM (fxcompress kernels) against
torch fp16 (cuBLAS), torch int4 tinygemm, gemlite and ORT MatMulNBits, all in one run.

    PYTHONPATH=/tmp/gpu-site:$PWD python3 tools/bench_gemv.py --out tools/results/gemv_bench.md
    PYTHONPATH=$PWD python3 tools/bench_gemv.py --dry-run          # CPU smoke run: tiny shape, llvm, no GPU figures

Weights: symmetric per-group g128 codes (no zero-point tensor, as MLC-LLM's q4f16_1), fp16 scales and
activations, fp32 accumulation; shape K (in) x N (out), batch M.  Every peer computes the same dequantized
weight (err columns check it against an fp32 reference).

Timing (tools/gpu_timing.py): **cold** = each call timed alone with CUDA events after an L2 flush (a write of
>= 2x the L2 size) or, with ``--rotate``, on the next of enough weight copies to exceed L2; **hot** =
back-to-back calls on one weight (L2-resident where it fits), beside it.  Each figure: median of the per-repeat
medians over ``--reps`` repeats (spread: min-max of those medians).  Ratios are cold vs cold against torch fp16
of the same run.  ORT runs on its own stream and is timed by wall clock around each synchronous
``run_with_iobinding`` (ORT host overhead included; a lower bound on its speed).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from gpu_timing import (
    L2Flush,
    copies_to_defeat_l2,
    hbm_peak,
    time_cold_hot,
    wall_cold_hot,
    write_table,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = [(4096, 4096), (4096, 11008), (8192, 8192), (8192, 28672)]  # (K in, N out)
BATCHES = [1, 4, 16, 32]
GROUP = 128
PEERS = ("torch_fp16", "tinygemm", "gemlite", "ort")
DRY_SHAPES, DRY_BATCHES = [(256, 512)], [1, 4]


def target(k: int, n: int, m: int, bits: int) -> float | None:
    """Issue 13's cold speedup target vs torch fp16 (int4 g128), or None where it sets none."""
    if bits != 4:
        return None
    large = (k, n) in ((8192, 8192), (8192, 28672))
    if m == 1:
        return 3.3 if large else 2.8 if (k, n) == (4096, 4096) else None
    if m == 16 and large:
        return 2.5
    if m == 32 and large:
        return 1.5
    return None


def make_weights(k, n, bits, rng):
    from fxcompress.backends.tvm import pack_words

    qmin = -(2 ** (bits - 1))
    codes = rng.integers(qmin, 2 ** (bits - 1), size=(n, k), dtype=np.int64)
    scale = (rng.random((n, k // GROUP), dtype=np.float32) * 0.02 + 0.001).astype(np.float16)
    return codes, pack_words(codes, bits, qmin), scale, qmin


def build_tvm(k, n, m, bits, words, scale, qmin, target_name, kernel="fxc"):
    """Relax build of one packed linear; ``kernel="fxc"`` emits the hand-scheduled kernel where it applies.
    Returns (build, compiled kernel-only module, kernel name)."""
    import tvm
    from tvm import relax

    from fxcompress.backends import tvm as B

    cfg = B.TVMBuildConfig(gemv_kernel=kernel)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, m, k), "float16"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = B.emit_packed_linear(bb, x, words, scale.astype(np.float32), None, bits=bits, qmin=qmin,
                                     out_features=n, in_features=k, cuda=target_name == "cuda" and kernel == "fxc",
                                     config=cfg)
            o = bb.emit_output(y)
        bb.emit_func_output(o)
    build = B.build_tvm(bb.get(), None, target_name, "dlight", config=cfg)
    kern = [gv for gv, f in build.scheduled.functions.items()
            if isinstance(f, tvm.tirx.PrimFunc) and ("decode" in gv.name_hint or "fxc_packed" in gv.name_hint)]
    kmod = tvm.compile(tvm.IRModule({"main": build.scheduled[kern[0]].with_attr("global_symbol", "main")}),
                       target=build.target)
    return build, getattr(kmod, "mod", kmod), kern[0].name_hint


def rule_used(build, m: int = 1) -> str:
    src = build.device_source() if build.target.kind.name == "cuda" else ""
    if not src:
        return "llvm (dry run)"
    if "fxc_packed_mma_batch" in src:
        return "fxc mma batch (tensor cores)"
    if "fxc_packed_mma" in src:
        return "fxc mma (tensor cores)"
    if "fxc_packed_gemv" in src:
        return "fxc gemv"
    if "rf_local" not in src:
        return "matmul"
    return "gemv" if m == 1 else "small-batch gemv"


# ------------------------------------------------------------------------------------------------ peers
class Skip(Exception):
    """A peer that cannot run here; the message says why (it goes in the table)."""


def tinygemm_weights(codes, scale, device):
    """torch's int4 tinygemm operands: (packed int32 weight, bf16 scales-and-zeros [K/g, N, 2]).

    tinygemm dequantizes ``(q - 8) * scale + zero`` with ``q`` in [0, 15]; symmetric codes ``c`` in [-8, 7]
    are ``q = c + 8`` with zero 0.  ``_convert_weight_to_int4pack`` takes uint8 [N, K/2] with the even-K
    code in the high nibble (torch >= 2.5, as torch.testing._internal.common_quantization packs it).
    """
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm"):
        raise Skip(f"torch {torch.__version__} has no aten._weight_int4pack_mm")
    q = torch.from_numpy(codes + 8).to(device=device, dtype=torch.int32)
    s = torch.from_numpy(scale.astype(np.float32)).to(device)  # [N, K/g]
    sz = torch.stack([s, torch.zeros_like(s)], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    if device != "cuda":  # the dry run: torch's CPU twin (int32 codes, same scales-and-zeros layout)
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 8), sz
    u8 = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8)
    return torch.ops.aten._convert_weight_to_int4pack(u8, 8), sz


def tinygemm_fn(codes, scale, x, device):
    wp, sz = tinygemm_weights(codes, scale, device)
    xb = x.to(torch.bfloat16)
    op = torch.ops.aten._weight_int4pack_mm if device == "cuda" else torch.ops.aten._weight_int4pack_mm_for_cpu
    return lambda: op(xb, wp, GROUP, sz)


def gemlite_fn(codes, scale, x, bits, device):
    """gemlite's Triton kernel (W_q in [0, 2^b), dequant ``(W_q - zero) * scale``), fp16 in and out."""
    try:
        import gemlite
    except Exception as e:
        raise Skip(f"gemlite not importable ({type(e).__name__}: {str(e)[:60]})") from e
    if device != "cuda":
        raise Skip("gemlite runs on CUDA only")
    cls = getattr(gemlite, "GemLiteLinear", None) or __import__("gemlite.core", fromlist=["x"]).GemLiteLinearTriton
    dtype_enum = getattr(gemlite, "DType", None) or __import__("gemlite.core", fromlist=["x"]).DType
    n, k = codes.shape
    lin = cls(bits, group_size=GROUP, in_features=k, out_features=n, input_dtype=dtype_enum.FP16,
              output_dtype=dtype_enum.FP16)
    off = 2 ** (bits - 1)
    wq = torch.from_numpy(codes + off).to(device=device, dtype=torch.uint8)
    s = torch.from_numpy(scale).to(device=device, dtype=torch.float16)
    lin.pack(wq, s, torch.full_like(s, off), None)
    x2 = x.reshape(-1, k)
    return lambda: lin(x2)


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
        raise Skip(f"MatMulNBits bits={bits} not benchmarked")
    node = helper.make_node("MatMulNBits", ["A", "B", "scales"], ["Y"], domain="com.microsoft", K=k, N=n,
                            bits=bits, block_size=GROUP, accuracy_level=0)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT16, [m, k])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT16, [m, n])],
                          [onnx.numpy_helper.from_array(packed, "B"),
                           onnx.numpy_helper.from_array(scale.reshape(-1).astype(np.float16), "scales")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10  # onnx 1.23 writes IR 12+, which onnxruntime 1.31 rejects; opset 21 needs IR 10
    return model.SerializeToString()


def ort_fn(k, n, m, codes, scale, bits, x, device):
    """A synchronous MatMulNBits call with input and output bound on the device, and its output getter."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise Skip("onnxruntime not importable") from e
    prov = "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"
    if prov not in ort.get_available_providers():
        raise Skip(f"no {prov} (onnxruntime-gpu not installed)")
    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        sess = ort.InferenceSession(ort_model(k, n, m, codes, scale, bits), so, providers=[prov])
    except Exception as e:
        raise Skip("ORT: " + " ".join(str(e).split())[-100:]) from e
    io = sess.io_binding()
    xv = ort.OrtValue.ortvalue_from_numpy(x.reshape(m, k).cpu().numpy(), "cuda" if device == "cuda" else "cpu", 0)
    yv = ort.OrtValue.ortvalue_from_shape_and_type([m, n], np.float16, "cuda" if device == "cuda" else "cpu", 0)
    io.bind_ortvalue_input("A", xv)
    io.bind_ortvalue_output("Y", yv)
    keep = (sess, xv, yv)

    def run():
        keep[0].run_with_iobinding(io)

    return run, lambda: torch.from_numpy(yv.numpy())


# ------------------------------------------------------------------------------------------------ bench
def rel_err(y, ref) -> float:
    y, ref = y.float().reshape(ref.shape).cpu(), ref.float().cpu()
    return ((y - ref).abs().max() / ref.abs().max()).item()


def run_case(k, n, m, bits, codes, words, scale, qmin, wref, args, dev, flush, out_rows):
    """Time TVM and every peer on one (shape, batch); append a row dict."""
    import tvm

    device = "cpu" if args.dry_run else "cuda"
    tgt = "llvm" if args.dry_run else "cuda"
    timing = dict(reps=args.reps, calls=args.calls, cuda=not args.dry_run, flush=flush)
    x = torch.randn(1, m, k, device=device, dtype=torch.float16) * 0.5
    ref = torch.nn.functional.linear(x.float(), wref.float())
    w_bytes_int = words.nbytes + scale.nbytes
    act = m * k * 2 + m * n * 2
    rot = args.rotate and not args.dry_run
    copies = {"torch_fp16": copies_to_defeat_l2(n * k * 2) if rot else 1,  # each path by its own bytes
              "tvm": copies_to_defeat_l2(w_bytes_int) if rot else 1}
    row = dict(shape=f"{k}x{n}", k=k, n=n, m=m, bits=bits, t={}, err={}, note={}, copies=copies)

    def record(name, fn, rotate=None, out=None, wall=False):
        try:
            if wall:
                t = wall_cold_hot(fn, flush=flush, reps=args.reps, calls=args.calls)
            else:
                t = time_cold_hot(fn, rotate=rotate, **timing)
            row["t"][name] = t
            y = out() if out is not None else fn()
            row["err"][name] = rel_err(y, ref)
        except Skip as e:
            row["note"][name] = str(e)
        except Exception as e:  # noqa: BLE001 - a peer failing is a table entry, not a crash
            row["note"][name] = f"failed: {type(e).__name__}: {' '.join(str(e).split())[:90]}"

    # torch fp16 (cuBLAS): the baseline of every ratio
    w16 = wref.to(device=device, dtype=torch.float16)
    w16s = [w16] + [w16.clone() for _ in range(copies["torch_fp16"] - 1)]
    record("torch_fp16", lambda: torch.nn.functional.linear(x, w16),
           rotate=[(lambda w=w: torch.nn.functional.linear(x, w)) for w in w16s] if len(w16s) > 1 else None)
    del w16s
    # TVM: the kernel alone (fxc where it applies, else dlight), and the whole Relax VM call
    try:
        from tvm import relax

        build, kmod, kname = build_tvm(k, n, m, bits, words, scale, qmin, tgt, kernel=args.tvm_kernel)
        row["rule"] = rule_used(build, m)
        wk = words
        if row["rule"].startswith("fxc mma"):
            from fxcompress.backends.tvm.packing import pack_mma_words

            wk = pack_mma_words(codes, qmin, bits)
        xt = tvm.runtime.from_dlpack(x)
        yk = tvm.runtime.empty((1, m, n), "float16", dev)
        kargs = [(tvm.runtime.tensor(wk, dev), tvm.runtime.tensor(scale, dev)) for _ in range(copies["tvm"])]
        f = kmod["main"]
        record("tvm", lambda: f(xt, *kargs[0], yk), out=lambda: torch.from_dlpack(yk),
               rotate=[(lambda a=a: f(xt, *a, yk)) for a in kargs] if len(kargs) > 1 else None)
        vm = relax.VirtualMachine(build.executable, dev)
        record("tvm_vm", lambda: vm["main"](xt), out=lambda: torch.from_dlpack(vm["main"](xt)))
    except Exception as e:  # noqa: BLE001
        row["note"]["tvm"] = f"build failed: {type(e).__name__}: {' '.join(str(e).split())[-120:]}"
        row["rule"] = "-"
    for peer in args.peers:
        if peer == "torch_fp16":
            continue
        try:
            if peer == "tinygemm":
                if bits != 4:
                    raise Skip("int4 only")
                record("tinygemm", tinygemm_fn(codes, scale, x.reshape(m, k), device))
            elif peer == "gemlite":
                record("gemlite", gemlite_fn(codes, scale, x, bits, device))
            elif peer == "ort":
                run, out = ort_fn(k, n, m, codes, scale, bits, x, device)
                record("ort", run, out=out, wall=not args.dry_run)
        except Skip as e:
            row["note"][peer] = str(e)
        except Exception as e:  # noqa: BLE001
            row["note"][peer] = f"failed: {type(e).__name__}: {' '.join(str(e).split())[:90]}"
    row["q_bytes"] = w_bytes_int + act
    out_rows.append(row)
    t = row["t"]
    msg = "  ".join(f"{name} {t[name].cold.median:.2f}/{t[name].hot.median:.2f}" for name in t)
    print(f"{row['shape']:>11} M={m:<3} int{bits}: cold/hot µs  {msg}  [{row.get('rule')}] "
          + "; ".join(f"{p}: {v}" for p, v in row["note"].items()), flush=True)


def table(rows, args, gpu, peak, flush, total, argv) -> list[str]:
    import tvm

    try:
        import onnxruntime as ort
        ort_ver = ort.__version__
    except ImportError:
        ort_ver = "not importable"
    try:
        import gemlite
        gl_ver = getattr(gemlite, "__version__", "importable")
    except Exception:  # noqa: BLE001
        gl_ver = "not importable"
    if args.dry_run:
        how = "DRY RUN on the CPU (llvm target, wall clock, no flush): exercises the code, NOT a GPU result"
    elif args.rotate:
        how = ("cold = torch fp16 and TVM weights rotated through enough copies to exceed 2x L2 (copies per row "
               f"below), the other paths {flush.describe()}")
    else:
        how = f"cold = {flush.describe()}"
    lines = [
        "# Integer-weight GEMV / low-batch GEMM, weights cold: TVM vs torch fp16, tinygemm, gemlite, ORT", "",
        f"GPU: **{gpu}**; HBM peak used for %: {peak / 1e12 if peak else 'unknown'} TB/s; torch {torch.__version__}; "
        f"tvm {tvm.__version__}; onnxruntime {ort_ver}; gemlite {gl_ver}; total bench time {total:.0f} s.", "",
        "Command: `PYTHONPATH=/tmp/gpu-site:$PWD python3 tools/bench_gemv.py " + " ".join(argv) + "`", "",
        f"Timing: {how}; each call timed alone (CUDA events); hot = back-to-back calls on one weight. "
        f"Figures: median of {args.reps} per-repeat medians ({args.calls} calls each), spread = min-max of those "
        "medians. Ratios: torch fp16 cold / path cold, same run. ORT: wall clock around each synchronous "
        "`run_with_iobinding` (host overhead included).", "",
        "Weights: symmetric per-group g128 codes, fp16 scales and activations (tinygemm: bf16), fp32 accumulation; "
        "K (in) x N (out), batch M. TVM = the kernel alone (`" + args.tvm_kernel + "` where it applies, else dlight; "
        "rule column); TVM vm = the whole Relax VM call. % HBM = (packed weight + scales + activations) / TVM "
        "cold time / peak. err = max|y - ref| / max|ref| vs an fp32 reference of the dequantized weight. Target = "
        "issue 13's cold ratio vs torch fp16 (int4 g128: batch 1 >= 3.3x on 8192x8192 and 8192x28672, >= 2.8x at "
        "4096x4096; batch 16 >= 2.5x and batch 32 >= 1.5x on the two large shapes); every row is also compared "
        "with the fastest peer.", "",
        "| K x N | M | bits | TVM cold µs (spread) | TVM hot µs | TVM vm cold µs | torch fp16 cold µs (spread) | "
        "torch fp16 hot µs | tinygemm cold µs | gemlite cold µs | ORT cold µs | TVM vs fp16 cold (hot) | "
        "fastest peer, cold | TVM vs fastest peer | target | met | TVM % HBM cold | err TVM | rule |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for r in rows:
        t = r["t"]

        def c(name, spread=False):
            if name not in t:
                return "-"
            return str(t[name].cold) if spread else f"{t[name].cold.median:.2f}"

        tv, base = t.get("tvm"), t.get("torch_fp16")
        ratio = f"{tv.ratio_to(base):.2f}x ({base.hot.median / tv.hot.median:.2f}x)" if tv and base else "-"
        peers = {p: t[p] for p in ("torch_fp16", "tinygemm", "gemlite", "ort")
                 if p in t and r["err"].get(p, 1.0) < 1e-2}
        fastest = min(peers, key=lambda p: peers[p].cold.median) if peers else None
        vs_peer = f"{peers[fastest].cold.median / tv.cold.median:.2f}x" if (tv and fastest) else "-"
        tg = target(r["k"], r["n"], r["m"], r["bits"])
        met = "-"
        if tv and base:
            ok_t = tg is None or tv.ratio_to(base) >= tg
            ok_p = fastest is None or tv.cold.median <= peers[fastest].cold.median
            met = ("yes" if ok_t and ok_p else "no: " + ", ".join(
                ([f"{tv.ratio_to(base):.2f}x < {tg}x"] if not ok_t else [])
                + ([f"{fastest} faster"] if not ok_p else [])))
        pct = f"{r['q_bytes'] / (tv.cold.median * 1e-6) / peak * 100:.0f}%" if (tv and peak) else "-"
        fp = f"{fastest} {peers[fastest].cold.median:.2f}" if fastest else "-"
        lines.append(f"| {r['shape']} | {r['m']} | int{r['bits']} | {c('tvm', True)} | "
                     f"{t['tvm'].hot.median:.2f} | {c('tvm_vm')} | {c('torch_fp16', True)} | "
                     f"{t['torch_fp16'].hot.median if base else float('nan'):.2f} | {c('tinygemm')} | {c('gemlite')} | "
                     f"{c('ort')} | {ratio} | {fp} | {vs_peer} | {f'>= {tg}x' if tg else '-'} | {met} | {pct} | "
                     f"{r['err'].get('tvm', float('nan')):.1e} | {r.get('rule', '-')} |"
                     if tv else
                     f"| {r['shape']} | {r['m']} | int{r['bits']} | - | - | - | {c('torch_fp16', True)} | - | "
                     f"{c('tinygemm')} | {c('gemlite')} | {c('ort')} | - | {fp} | - | - | - | - | - | - |")
        for p, v in r["note"].items():
            notes.append(f"{r['shape']} M={r['m']} int{r['bits']} {p}: {v}")
        for p, e in r["err"].items():
            if e >= 1e-2:
                notes.append(f"{r['shape']} M={r['m']} int{r['bits']} {p}: wrong output (err {e:.1e}), not compared")
        if max(r["copies"].values()) > 1:
            notes.append(f"{r['shape']} M={r['m']}: rotated weight copies: "
                         + ", ".join(f"{p} {c}" for p, c in r["copies"].items()))
    uniq = list(dict.fromkeys(n.split(": ", 1)[1] if "not importable" in n or "no CUDAExecutionProvider" in n
                              or "CUDA only" in n else n for n in notes))
    if uniq:
        lines += ["", "Notes:"] + [f"- {n}" for n in uniq]
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="markdown table (default tools/results/gemv_bench.md; dry run: "
                                                "/tmp/gemv_bench_dry_run.md)")
    ap.add_argument("--bits", default="4", help="comma list of 4 / 8 / 3 (peers other than torch fp16: int4)")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    ap.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES), help="KxN comma list")
    ap.add_argument("--peers", default=",".join(PEERS), help=f"comma list of {','.join(PEERS)}")
    ap.add_argument("--tvm-kernel", default="fxc", choices=["fxc", "dlight"],
                    help="TVMBuildConfig.gemv_kernel: fxcompress's hand-scheduled kernels or dlight's")
    ap.add_argument("--rotate", action="store_true", help="cold by rotating weight copies instead of an L2 flush")
    ap.add_argument("--flush", default="write", choices=["write", "read"], help="how the L2 flush evicts (read: "
                    "clean lines left, as after other layers' weight reads; write: dirty lines, whose write-back "
                    "slows the timed call; tools/gpu_timing.py L2Flush)")
    ap.add_argument("--reps", type=int, default=5, help="repeats per figure (spread = min-max of their medians)")
    ap.add_argument("--calls", type=int, default=20, help="timed calls per repeat")
    ap.add_argument("--dry-run", action="store_true", help="CPU smoke run: a tiny shape on llvm, no GPU needed")
    args = ap.parse_args(argv)
    argv = list(argv if argv is not None else sys.argv[1:])
    args.peers = [p for p in args.peers.split(",") if p]
    bad = [p for p in args.peers if p not in PEERS]
    if bad:
        ap.error(f"unknown peers {bad}; choose from {PEERS}")
    import tvm

    if args.dry_run:
        shapes, batches, dev, gpu, peak, flush = DRY_SHAPES, DRY_BATCHES, tvm.cpu(0), "CPU (dry run)", None, None
        args.out = args.out or "/tmp/gemv_bench_dry_run.md"
        args.reps, args.calls = min(args.reps, 2), min(args.calls, 3)
    else:
        if not torch.cuda.is_available() or not tvm.cuda(0).exist:
            print("bench_gemv needs a CUDA GPU visible to torch and TVM (or --dry-run)", file=sys.stderr)
            return 2
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
        batches = [int(b) for b in args.batches.split(",")]
        dev, gpu = tvm.cuda(0), torch.cuda.get_device_name(0)
        peak, flush = hbm_peak(gpu), L2Flush(mode=args.flush)  # with --rotate: for the paths that have one weight copy
        args.out = args.out or "tools/results/gemv_bench.md"
    t_start = time.time()
    rng = np.random.default_rng(0)
    rows = []
    for k, n in shapes:
        for bits in [int(b) for b in args.bits.split(",")]:
            codes, words, scale, qmin = make_weights(k, n, bits, rng)
            wref = torch.from_numpy((codes.reshape(n, k // GROUP, GROUP).astype(np.float32)
                                     * scale.astype(np.float32)[..., None]).reshape(n, k))
            wref = wref.to("cpu" if args.dry_run else "cuda")
            for m in batches:
                run_case(k, n, m, bits, codes, words, scale, qmin, wref, args, dev, flush, rows)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        partial = time.time() - t_start  # the table so far, in case a time limit stops the run
        write_table(args.out, table(rows, args, gpu, peak, flush, partial, argv), partial)
    total = time.time() - t_start
    write_table(args.out, table(rows, args, gpu, peak, flush, total, argv), total)
    return 0


if __name__ == "__main__":
    sys.exit(main())
