"""ONNX Runtime on the GPU (CUDA EP): fp16 vs int4 MatMulNBits, single layers and a LLaMA-style decode step.

    PYTHONPATH=/tmp/gpu-site:$PWD python3 tools/bench_ort_gpu.py --out tools/results/ort_gpu.md

* Single layers (K x N = 4096x4096, 8192x8192, batch 1): fp16 ``MatMul`` with an fp16 weight vs
  ``com.microsoft.MatMulNBits`` (4-bit, g128, fp16 scales, fp16 activations).
* Decode step: ``fxcompress.models.smollm2.CausalLM`` (hidden 2048, intermediate 5632, 4 layers, 16 heads,
  vocab 32000, untied head), random init, one token at batch 1 (the model has no KV cache, so one token is
  the whole forward).  fp16: the float model exported with ``fxcompress.export_onnx`` and converted to fp16
  (``fxcompress.backends.onnx.to_float16``); int4: ``quantize_rtn(bits=4, per_group 128, asymmetric)``
  exported with ``weight_format="matmulnbits"`` and converted the same way (fp16 activations and scales).
  The embedding table stays fp16 in both (it is a Gather, not a matmul).

* Fused: the int4 model after ``fxcompress.passes.fusion.fuse_linears`` (q/k/v and gate/up each one
  MatMulNBits: 7 -> 4 per layer), exported the same way.

Timing (tools/gpu_timing.py ``wall_cold_hot``): inputs and outputs bound on the GPU with ``io_binding`` (no host
copies); **cold** = each ``run_with_iobinding`` (synchronous) timed alone by wall clock after an L2 flush (a write
of >= 2x the L2 size) and a device synchronize, so weights come from HBM; **hot** = back-to-back runs, beside it.
Median of per-repeat medians, spread = their min-max; ORT's own per-call host overhead is included.  With CUDA
graphs (default on) ORT captures the session (``enable_cuda_graph``) and each run replays it: launch overhead
mostly gone.  ``--dry-run``: tiny shapes on the CPU EP in fp32 (a smoke run of the code, not a GPU result).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from gpu_timing import L2Flush, Timing, hbm_peak, time_cold_hot, wall_cold_hot, write_table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GROUP = 128


def layer_models(k: int, n: int, m: int = 1, seed: int = 0, half: bool = True):
    """(fp16 MatMul model, int4 MatMulNBits model, fp32 reference weight [n, k]) as serialized bytes
    (``half=False``: fp32 activations, weights and scales, for the CPU dry run)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    codes = rng.integers(-8, 8, size=(n, k), dtype=np.int64)
    scale = (rng.random((n, k // GROUP), dtype=np.float32) * 0.02 + 0.001).astype(np.float16)
    w = (codes.reshape(n, k // GROUP, GROUP) * scale.astype(np.float32)[..., None]).reshape(n, k)
    u = (codes + 8).astype(np.uint8)
    packed = (u[:, 0::2] | (u[:, 1::2] << 4)).astype(np.uint8).reshape(n, k // GROUP, GROUP // 2)
    ft, fnp = (TensorProto.FLOAT16, np.float16) if half else (TensorProto.FLOAT, np.float32)
    a = helper.make_tensor_value_info("A", ft, [m, k])
    y = helper.make_tensor_value_info("Y", ft, [m, n])
    ops = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]

    def model(nodes, inits):
        mp = helper.make_model(helper.make_graph(nodes, "g", [a], [y], inits), opset_imports=ops)
        mp.ir_version = 10  # onnx 1.23 writes a newer IR than onnxruntime 1.31 reads
        return mp.SerializeToString()

    fp16 = model([helper.make_node("MatMul", ["A", "W"], ["Y"])],
                 [numpy_helper.from_array(np.ascontiguousarray(w.T).astype(fnp), "W")])
    nbits = model([helper.make_node("MatMulNBits", ["A", "B", "scales"], ["Y"], domain="com.microsoft", K=k, N=n,
                                    bits=4, block_size=GROUP, accuracy_level=0)],
                  [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scale.reshape(-1).astype(fnp), "scales")])
    return fp16, nbits, w


def decode_models(workdir: Path, cfg_kwargs: dict, half: bool = True):
    """Export the fp16, int4 and fused int4 decode-step models of CausalLM.

    Returns ({tag: path}, {tag: number of MatMulNBits nodes}, ids, fp32 reference logits)."""
    import onnx
    import torch

    import fxcompress as fxc
    from fxcompress.models.smollm2 import CausalLM, SmolLM2Config
    from fxcompress.passes.fusion import fuse_linears
    from fxcompress.backends.onnx import to_float16

    torch.manual_seed(0)
    model = CausalLM(SmolLM2Config(**cfg_kwargs)).eval()
    ids = torch.randint(0, cfg_kwargs["vocab_size"], (1, 1))
    paths, n_nbits = {}, {}
    with torch.no_grad():
        for p in model.parameters():  # keep random-init activations in a sane range for fp16
            if p.dim() == 2:
                p.mul_(0.5)
    gm = fxc.capture(model, (ids,))
    q = fxc.quantize_rtn(gm, fxc.RTNConfig(bits=4, symmetric=False, granularity="per_group", group_size=GROUP))
    qf = fuse_linears(q, (ids,), atol=1e-3, rtol=1e-3)
    for tag, mod, fmt in (("fp16", gm, "qdq"), ("int4", q, "matmulnbits"), ("int4 fused", qf, "matmulnbits")):
        p32 = workdir / f"{tag.replace(' ', '_')}_fp32.onnx"
        fxc.export_onnx(mod, (ids,), p32, weight_format=fmt, dynamic_batch=False)
        if half:
            m16 = to_float16(onnx.load(str(p32)))
            p16 = workdir / f"{tag.replace(' ', '_')}.onnx"
            onnx.save(m16, str(p16), save_as_external_data=True, location=p16.name + ".data")
            paths[tag] = p16
        else:
            paths[tag] = p32
        n_nbits[tag] = sum(1 for nd in onnx.load(str(paths[tag]), load_external_data=False).graph.node
                           if nd.op_type == "MatMulNBits")
    with torch.no_grad():
        ref = model(ids).float()
    return paths, n_nbits, ids.numpy(), ref.numpy()


def session(model, cuda_graph: bool, device: str = "cuda"):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    src = model if isinstance(model, bytes) else str(model)
    if device != "cuda":
        return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    opts = {"device_id": 0}
    if cuda_graph:
        opts["enable_cuda_graph"] = "1"
    return ort.InferenceSession(src, so, providers=[("CUDAExecutionProvider", opts)])


def time_session(sess, feeds: dict, flush, reps: int, calls: int, device: str = "cuda"):
    """(Timing, outputs as numpy) with inputs/outputs bound on the device."""
    import onnxruntime as ort

    io = sess.io_binding()
    keep = []
    for name, arr in feeds.items():
        v = ort.OrtValue.ortvalue_from_numpy(arr, device, 0)
        keep.append(v)
        io.bind_ortvalue_input(name, v)
    for o in sess.get_outputs():  # pre-allocated outputs: fixed addresses (needed for CUDA graphs)
        shape = [d if isinstance(d, int) else 1 for d in o.shape]
        dt = np.float16 if "float16" in o.type else np.float32 if "float" in o.type else np.int64
        v = ort.OrtValue.ortvalue_from_shape_and_type(shape, dt, device, 0)
        keep.append(v)
        io.bind_ortvalue_output(o.name, v)

    def run():
        sess.run_with_iobinding(io)

    if device == "cuda":
        t = wall_cold_hot(run, flush=flush, reps=reps, calls=calls)
    else:
        t = time_cold_hot(run, reps=reps, calls=calls, cuda=False)
    return t, [x.numpy() for x in io.get_outputs()]


def measure(model, feeds, cuda_graph_first: bool, flush, reps: int, calls: int, device: str):
    """Try with a CUDA graph first (if asked), fall back to plain CUDA EP; returns (Timing, outputs, mode, err)."""
    modes = [True, False] if (cuda_graph_first and device == "cuda") else [False]
    err = ""
    for cg in modes:
        try:
            t, outs = time_session(session(model, cg, device), feeds, flush, reps, calls, device)
            return t, outs, "cuda graph" if cg else ("plain" if device == "cuda" else "cpu (dry run)"), ""
        except Exception as e:  # noqa: BLE001
            err = " ".join(str(e).split())[-100:]
    return None, None, "failed", err


TAGS = ("fp16", "int4", "int4 fused")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="default tools/results/ort_gpu.md (dry run: /tmp/ort_gpu_dry_run.md)")
    ap.add_argument("--no-cuda-graph", action="store_true")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU EP, fp32: not a GPU result")
    args = ap.parse_args(argv)
    argv = list(argv if argv is not None else sys.argv[1:])
    import onnxruntime as ort
    import torch

    dry = args.dry_run
    if not dry and "CUDAExecutionProvider" not in ort.get_available_providers():
        print(f"bench_ort_gpu needs onnxruntime-gpu (CUDAExecutionProvider); have {ort.get_available_providers()} "
              "(or --dry-run)", file=sys.stderr)
        return 2
    args.out = args.out or ("/tmp/ort_gpu_dry_run.md" if dry else "tools/results/ort_gpu.md")
    device = "cpu" if dry else "cuda"
    if dry:
        args.reps, args.calls = min(args.reps, 2), min(args.calls, 3)
    gpu = "CPU (dry run)" if dry else (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "unknown GPU")
    peak = None if dry else hbm_peak(gpu)
    flush = None if dry or not torch.cuda.is_available() else L2Flush()
    if not dry and flush is None:
        print("bench_ort_gpu needs torch with CUDA for the L2 flush", file=sys.stderr)
        return 2
    cg = not args.no_cuda_graph
    rows = []
    t0 = time.time()
    rng = np.random.default_rng(1)
    half = not dry
    for k, n in ([(256, 512)] if dry else [(4096, 4096), (8192, 8192)]):
        fp16, nbits, w = layer_models(k, n, half=half)
        x = (rng.standard_normal((1, k)) * 0.5).astype(np.float16 if half else np.float32)
        ref = x.astype(np.float32) @ w.T
        r = {"name": f"linear {k}x{n}, batch 1"}
        for tag, mdl, nbytes in (("fp16", fp16, n * k * 2), ("int4", nbits, n * k // 2 + n * k // GROUP * 2)):
            t, outs, mode, err = measure(mdl, {"A": x}, cg, flush, args.reps, args.calls, device)
            r[tag], r[tag + "_mode"] = t, mode
            r[tag + "_err"] = (float(np.abs(outs[0].astype(np.float32) - ref).max() / np.abs(ref).max())
                               if outs is not None else err)
            r[tag + "_bw"] = (nbytes / (t.cold.median * 1e-6) / peak * 100) if (t and peak) else None
        rows.append(r)
        print(r, flush=True)
    if dry:
        h, f, L, V, heads = 256, 512, 2, 1000, 4
    else:
        h, f, L, V, heads = 2048, 5632, args.layers, 32000, 16
    cfg = dict(hidden_size=h, intermediate_size=f, num_layers=L, num_heads=heads, num_kv_heads=heads,
               vocab_size=V, tie_word_embeddings=False)
    with tempfile.TemporaryDirectory() as d:
        paths, n_nbits, ids, ref = decode_models(Path(d), cfg, half=half)
        lin = L * (4 * h * h + 3 * h * f) + h * V  # weights read per token
        r = {"name": f"CausalLM decode step (h{h}, ffn{f}, {L} layers, vocab {V}), batch 1, 1 token"}
        for tag in TAGS:
            nbytes = lin * 2 if tag == "fp16" else lin // 2 + lin // GROUP * 4
            t, outs, mode, err = measure(paths[tag], {"input_ids": ids}, cg, flush, args.reps, args.calls, device)
            r[tag], r[tag + "_mode"] = t, mode
            r[tag + "_err"] = (float(np.abs(outs[0].astype(np.float32) - ref).max() / np.abs(ref).max())
                               if outs is not None else err)
            r[tag + "_bw"] = (nbytes / (t.cold.median * 1e-6) / peak * 100) if (t and peak) else None
        r["note"] = f"MatMulNBits nodes: int4 {n_nbits['int4']}, fused {n_nbits['int4 fused']}"
        rows.append(r)
        print(r, flush=True)
    total = time.time() - t0
    how = ("DRY RUN on the CPU EP in fp32 (wall clock, no flush): exercises the code, NOT a GPU result" if dry else
           f"cold = {flush.describe()} + synchronize, then one synchronous run timed by wall clock")
    lines = [
        "# ONNX Runtime CUDA EP, weights cold: fp16 vs int4 MatMulNBits (plain and fused linears)", "",
        f"GPU: **{gpu}**; onnxruntime {ort.__version__}; torch {torch.__version__}; total {total:.0f} s.", "",
        "Command: `PYTHONPATH=/tmp/gpu-site:$PWD python3 tools/bench_ort_gpu.py " + " ".join(argv) + "`", "",
        f"Timing: {how}; hot = back-to-back runs. Figures: median of {args.reps} per-repeat medians ({args.calls} runs "
        "each) with the spread (min-max of those medians); speedups cold vs cold against fp16 of the same run. Inputs "
        "and outputs bound on the GPU (io_binding); mode = `cuda graph` when ORT's CUDA-graph capture worked, else "
        "`plain` (launch + ORT host overhead included). int4 = MatMulNBits bits=4 g128, fp16 scales and activations, "
        "accuracy_level 0; int4 fused = the same after fuse_linears (q/k/v and gate/up one MatMulNBits each). err = "
        "max|y - ref| / max|ref| vs an fp32 torch reference (the layers: of the dequantized weight; the decode step: "
        "the fp32 float model, so the int4 error includes quantization). % HBM = weight bytes / cold time / peak ("
        + (f"{peak / 1e12} TB/s" if peak else "unknown") + ").", "",
        "| workload | fp16 cold µs (spread) | fp16 hot | int4 cold µs (spread) | int4 hot | int4 fused cold µs | "
        "int4 fused hot | int4 vs fp16, cold | fused vs fp16, cold | fp16 % HBM | int4 % HBM | fused % HBM | "
        "fp16 / int4 / fused err | modes | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def c(r, tag, spread=True):
        t = r.get(tag)
        return "-" if not isinstance(t, Timing) else (str(t.cold) if spread else f"{t.cold.median:.1f}")

    def h_(r, tag):
        t = r.get(tag)
        return f"{t.hot.median:.1f}" if isinstance(t, Timing) else "-"

    def sp(r, tag):
        a, b = r.get("fp16"), r.get(tag)
        return f"{b.ratio_to(a):.2f}x" if isinstance(a, Timing) and isinstance(b, Timing) else "-"

    def pc(r, tag):
        v = r.get(tag + "_bw")
        return f"{v:.0f}%" if isinstance(v, float) else "-"

    def e(r, tag):
        v = r.get(tag + "_err")
        return f"{v:.1e}" if isinstance(v, float) else (str(v) if v else "-")

    for r in rows:
        lines.append(f"| {r['name']} | {c(r, 'fp16')} | {h_(r, 'fp16')} | {c(r, 'int4')} | {h_(r, 'int4')} | "
                     f"{c(r, 'int4 fused')} | {h_(r, 'int4 fused')} | {sp(r, 'int4')} | {sp(r, 'int4 fused')} | "
                     f"{pc(r, 'fp16')} | {pc(r, 'int4')} | {pc(r, 'int4 fused')} | "
                     f"{e(r, 'fp16')} / {e(r, 'int4')} / {e(r, 'int4 fused')} | "
                     + " / ".join(r.get(t + "_mode", "-") for t in TAGS if t + "_mode" in r)
                     + f" | {r.get('note', '')} |")
    print("\n".join(lines))
    write_table(args.out, lines, total)
    return 0


if __name__ == "__main__":
    sys.exit(main())
