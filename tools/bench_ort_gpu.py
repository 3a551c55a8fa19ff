"""ONNX Runtime on the GPU (CUDA EP), weights cold: fp16 vs int4 / int8 MatMulNBits (what ``export_onnx`` writes
by default) vs int8 QDQ, single layers and a LLaMA-style decode step.

    PYTHONPATH=/tmp/gpu-site:$PWD python3 tools/bench_ort_gpu.py --out tools/results/ort_gpu.md   # ~2-3 min, H100
    PYTHONPATH=$PWD python tools/bench_ort_gpu.py --dry-run          # CPU EP smoke run of the code (not a result)

* Single layers (K x N = 4096x4096, 8192x8192, batch 1): fp16 ``MatMul`` with an fp16 weight vs
  ``com.microsoft.MatMulNBits`` 4-bit g128 and 8-bit (per-channel scales repeated over blocks of 128) and vs int8
  ``DequantizeLinear`` + ``MatMul`` (fp16 scales and activations).  The nodes carry ``accuracy_level=4`` as the
  export default does; the CUDA EP's MatMulNBits kernel does not read that attribute (it matters on CPU).
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
    """({tag: serialized model}, {tag: weight bytes read}, fp32 reference weight [n, k] per tag) for one
    linear (``half=False``: fp32 activations, weights and scales, for the CPU dry run).

    Tags: ``fp16`` (MatMul, fp16 weight); ``int4`` (MatMulNBits bits=4 g128, signed codes offset by 8, no zero
    point: what ``export_onnx`` writes for symmetric int4 g128); ``int8`` (MatMulNBits bits=8, per-channel
    scales repeated over blocks of 128: what ``export_onnx`` now writes by default for int8 per-channel);
    ``int8 qdq`` (int8 ``DequantizeLinear`` axis=1 + MatMul: the ``weight_format="qdq"`` export)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    ft, fnp = (TensorProto.FLOAT16, np.float16) if half else (TensorProto.FLOAT, np.float32)
    a = helper.make_tensor_value_info("A", ft, [m, k])
    y = helper.make_tensor_value_info("Y", ft, [m, n])
    ops = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]

    def model(nodes, inits):
        mp = helper.make_model(helper.make_graph(nodes, "g", [a], [y], inits), opset_imports=ops)
        mp.ir_version = 10  # onnx 1.23 writes a newer IR than onnxruntime 1.31 reads
        return mp.SerializeToString()

    # int4 g128
    codes = rng.integers(-8, 8, size=(n, k), dtype=np.int64)
    scale = (rng.random((n, k // GROUP), dtype=np.float32) * 0.02 + 0.001).astype(np.float16)
    w4 = (codes.reshape(n, k // GROUP, GROUP) * scale.astype(np.float32)[..., None]).reshape(n, k)
    u = (codes + 8).astype(np.uint8)
    packed = (u[:, 0::2] | (u[:, 1::2] << 4)).astype(np.uint8).reshape(n, k // GROUP, GROUP // 2)
    # int8 per-channel
    c8 = rng.integers(-127, 128, size=(n, k), dtype=np.int64)
    s8 = (rng.random(n, dtype=np.float32) * 0.0015 + 0.0001).astype(np.float16)
    w8 = c8 * s8.astype(np.float32)[:, None]
    models = {
        "fp16": model([helper.make_node("MatMul", ["A", "W"], ["Y"])],
                      [numpy_helper.from_array(np.ascontiguousarray(w4.T).astype(fnp), "W")]),
        "int4": model([helper.make_node("MatMulNBits", ["A", "B", "scales"], ["Y"], domain="com.microsoft", K=k, N=n,
                                        bits=4, block_size=GROUP, accuracy_level=4)],
                      [numpy_helper.from_array(packed, "B"),
                       numpy_helper.from_array(scale.reshape(-1).astype(fnp), "scales")]),
        "int8": model([helper.make_node("MatMulNBits", ["A", "B", "scales"], ["Y"], domain="com.microsoft", K=k, N=n,
                                        bits=8, block_size=GROUP, accuracy_level=4)],
                      [numpy_helper.from_array((c8 + 128).astype(np.uint8).reshape(n, k // GROUP, GROUP), "B"),
                       numpy_helper.from_array(np.repeat(s8, k // GROUP).astype(fnp), "scales")]),
        "int8 qdq": model([helper.make_node("DequantizeLinear", ["Q", "s"], ["W"], axis=1),
                           helper.make_node("MatMul", ["A", "W"], ["Y"])],
                          [numpy_helper.from_array(np.ascontiguousarray(c8.T).astype(np.int8), "Q"),
                           numpy_helper.from_array(s8.astype(fnp), "s")]),
    }
    nbytes = {"fp16": n * k * 2, "int4": n * k // 2 + n * k // GROUP * 2, "int8": n * k + n * k // GROUP * 2,
              "int8 qdq": n * k + n * 2}
    refs = {"fp16": w4, "int4": w4, "int8": w8, "int8 qdq": w8}
    return models, nbytes, refs


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
        models, nbytes, refs = layer_models(k, n, half=half)
        x = (rng.standard_normal((1, k)) * 0.5).astype(np.float16 if half else np.float32)
        r = {"name": f"linear {k}x{n}, batch 1", "tags": list(models)}
        for tag, mdl in models.items():
            ref = x.astype(np.float32) @ refs[tag].T
            t, outs, mode, err = measure(mdl, {"A": x}, cg, flush, args.reps, args.calls, device)
            r[tag], r[tag + "_mode"] = t, mode
            r[tag + "_err"] = (float(np.abs(outs[0].astype(np.float32) - ref).max() / np.abs(ref).max())
                               if outs is not None else err)
            r[tag + "_bw"] = (nbytes[tag] / (t.cold.median * 1e-6) / peak * 100) if (t and peak) else None
        rows.append(r)
        print({k_: str(v) for k_, v in r.items()}, flush=True)
    if dry:
        h, f, L, V, heads = 256, 512, 2, 1000, 4
    else:
        h, f, L, V, heads = 2048, 5632, args.layers, 32000, 16
    cfg = dict(hidden_size=h, intermediate_size=f, num_layers=L, num_heads=heads, num_kv_heads=heads,
               vocab_size=V, tie_word_embeddings=False)
    with tempfile.TemporaryDirectory() as d:
        paths, n_nbits, ids, ref = decode_models(Path(d), cfg, half=half)
        lin = L * (4 * h * h + 3 * h * f) + h * V  # weights read per token
        r = {"name": f"CausalLM decode step (h{h}, ffn{f}, {L} layers, vocab {V}), batch 1, 1 token",
             "tags": list(TAGS)}
        for tag in TAGS:
            nbytes = lin * 2 if tag == "fp16" else lin // 2 + lin // GROUP * 4
            t, outs, mode, err = measure(paths[tag], {"input_ids": ids}, cg, flush, args.reps, args.calls, device)
            r[tag], r[tag + "_mode"] = t, mode
            r[tag + "_err"] = (float(np.abs(outs[0].astype(np.float32) - ref).max() / np.abs(ref).max())
                               if outs is not None else err)
            r[tag + "_bw"] = (nbytes / (t.cold.median * 1e-6) / peak * 100) if (t and peak) else None
        r["note"] = f"MatMulNBits nodes: int4 {n_nbits['int4']}, fused {n_nbits['int4 fused']}"
        rows.append(r)
        print({k_: str(v) for k_, v in r.items()}, flush=True)
    total = time.time() - t0
    how = ("DRY RUN on the CPU EP in fp32 (wall clock, no flush): exercises the code, NOT a GPU result" if dry else
           f"cold = {flush.describe()} + synchronize, then one synchronous run timed by wall clock")
    lines = [
        "# ONNX Runtime CUDA EP, weights cold: fp16 vs int4 / int8 MatMulNBits and int8 QDQ", "",
        f"GPU: **{gpu}**; onnxruntime {ort.__version__}; torch {torch.__version__}; total {total:.0f} s.", "",
        "Command: `PYTHONPATH=/tmp/gpu-site:$PWD python3 tools/bench_ort_gpu.py " + " ".join(argv) + "`", "",
        f"Timing: {how}; hot = back-to-back runs. Figures: median of {args.reps} per-repeat medians ({args.calls} runs "
        "each) with the spread (min-max of those medians); speedups cold vs cold against fp16 of the same run. Inputs "
        "and outputs bound on the GPU (io_binding); mode = `cuda graph` when ORT's CUDA-graph capture worked, else "
        "`plain` (launch + ORT host overhead included). int4 = MatMulNBits bits=4 g128; int8 = MatMulNBits bits=8 "
        "(per-channel scales over blocks of 128); int8 qdq = int8 DequantizeLinear + MatMul; fp16 scales and "
        "activations, accuracy_level 4 as export_onnx writes by default (the CUDA kernel ignores it); int4 fused = "
        "int4 after fuse_linears (q/k/v and gate/up one MatMulNBits each). err = "
        "max|y - ref| / max|ref| vs an fp32 torch reference (the layers: of the dequantized weight; the decode step: "
        "the fp32 float model, so the int4 error includes quantization). % HBM = weight bytes / cold time / peak ("
        + (f"{peak / 1e12} TB/s" if peak else "unknown") + ").", "",
        "| workload | weights / format | mode | cold µs (spread) | hot µs (spread) | speed vs fp16, cold | "
        "speed vs fp16, hot | % HBM (cold) | err | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = r.get("fp16")
        for tag in r["tags"]:
            t = r.get(tag)
            ok = isinstance(t, Timing)
            vs_c = f"{t.ratio_to(base):.2f}x" if ok and isinstance(base, Timing) else "-"
            vs_h = f"{base.hot.median / t.hot.median:.2f}x" if ok and isinstance(base, Timing) else "-"
            bw = r.get(tag + "_bw")
            err = r.get(tag + "_err")
            lines.append(f"| {r['name']} | {tag} | {r.get(tag + '_mode', '-')} | {t.cold if ok else '-'} | "
                         f"{t.hot if ok else '-'} | {vs_c} | {vs_h} | {f'{bw:.0f}%' if isinstance(bw, float) else '-'} | "
                         f"{f'{err:.1e}' if isinstance(err, float) else (err or '-')} | "
                         f"{r.get('note', '') if tag == r['tags'][0] else ''} |")
    print("\n".join(lines))
    write_table(args.out, lines, total)
    return 0


if __name__ == "__main__":
    sys.exit(main())
