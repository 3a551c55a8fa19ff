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

Timing: inputs and outputs bound on the GPU with ``io_binding`` (no host copies); wall clock around many
``run_with_iobinding`` calls (it synchronizes), median of repeats, so ORT's own per-call host overhead is
included.  With ``--cuda-graph`` (default on) ORT captures the session into a CUDA graph
(``enable_cuda_graph``) and each run replays it: launch overhead mostly gone, closest to kernel time.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from gpu_timing import hbm_peak, wall_time_us, write_table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GROUP = 128


def layer_models(k: int, n: int, m: int = 1, seed: int = 0):
    """(fp16 MatMul model, int4 MatMulNBits model, fp32 reference weight [n, k]) as serialized bytes."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    codes = rng.integers(-8, 8, size=(n, k), dtype=np.int64)
    scale = (rng.random((n, k // GROUP), dtype=np.float32) * 0.02 + 0.001).astype(np.float16)
    w = (codes.reshape(n, k // GROUP, GROUP) * scale.astype(np.float32)[..., None]).reshape(n, k)
    u = (codes + 8).astype(np.uint8)
    packed = (u[:, 0::2] | (u[:, 1::2] << 4)).astype(np.uint8).reshape(n, k // GROUP, GROUP // 2)
    a = helper.make_tensor_value_info("A", TensorProto.FLOAT16, [m, k])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT16, [m, n])
    ops = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]

    def model(nodes, inits):
        mp = helper.make_model(helper.make_graph(nodes, "g", [a], [y], inits), opset_imports=ops)
        mp.ir_version = 10  # onnx 1.23 writes a newer IR than onnxruntime 1.31 reads
        return mp.SerializeToString()

    fp16 = model([helper.make_node("MatMul", ["A", "W"], ["Y"])],
                 [numpy_helper.from_array(np.ascontiguousarray(w.T).astype(np.float16), "W")])
    nbits = model([helper.make_node("MatMulNBits", ["A", "B", "scales"], ["Y"], domain="com.microsoft", K=k, N=n,
                                    bits=4, block_size=GROUP, accuracy_level=0)],
                  [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scale.reshape(-1), "scales")])
    return fp16, nbits, w


def decode_models(workdir: Path, cfg_kwargs: dict):
    """Export the fp16 and int4 decode-step models of CausalLM; returns (fp16 path, int4 path, n int4 linears)."""
    import onnx
    import torch

    import fxcompress as fxc
    from fxcompress.models.smollm2 import CausalLM, SmolLM2Config
    from fxcompress.backends.onnx import to_float16

    torch.manual_seed(0)
    model = CausalLM(SmolLM2Config(**cfg_kwargs)).eval()
    ids = torch.randint(0, cfg_kwargs["vocab_size"], (1, 1))
    paths = {}
    with torch.no_grad():
        for p in model.parameters():  # keep random-init activations in a sane range for fp16
            if p.dim() == 2:
                p.mul_(0.5)
    gm = fxc.capture(model, (ids,))
    q = fxc.quantize_rtn(gm, fxc.RTNConfig(bits=4, symmetric=False, granularity="per_group", group_size=GROUP))
    for tag, mod, fmt in (("fp16", gm, "qdq"), ("int4", q, "matmulnbits")):
        p32 = workdir / f"{tag}_fp32.onnx"
        fxc.export_onnx(mod, (ids,), p32, weight_format=fmt, dynamic_batch=False)
        m16 = to_float16(onnx.load(str(p32)))
        p16 = workdir / f"{tag}.onnx"
        onnx.save(m16, str(p16), save_as_external_data=True, location=f"{tag}.onnx.data")
        paths[tag] = p16
    n_nbits = sum(1 for nd in onnx.load(str(paths["int4"]), load_external_data=False).graph.node
                  if nd.op_type == "MatMulNBits")
    with torch.no_grad():
        ref = model(ids).float()
    return paths["fp16"], paths["int4"], n_nbits, ids.numpy(), ref.numpy()


def session(model, cuda_graph: bool):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts = {"device_id": 0}
    if cuda_graph:
        opts["enable_cuda_graph"] = "1"
    src = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(src, so, providers=[("CUDAExecutionProvider", opts)])


def time_session(sess, feeds: dict, iters: int = 200, reps: int = 10):
    """(median µs per run, outputs as numpy) with inputs/outputs bound on the GPU."""
    import onnxruntime as ort

    io = sess.io_binding()
    keep = []
    for name, arr in feeds.items():
        v = ort.OrtValue.ortvalue_from_numpy(arr, "cuda", 0)
        keep.append(v)
        io.bind_ortvalue_input(name, v)
    for o in sess.get_outputs():  # pre-allocated outputs: fixed addresses (needed for CUDA graphs)
        shape = [d if isinstance(d, int) else 1 for d in o.shape]
        dt = np.float16 if "float16" in o.type else np.float32 if "float" in o.type else np.int64
        v = ort.OrtValue.ortvalue_from_shape_and_type(shape, dt, "cuda", 0)
        keep.append(v)
        io.bind_ortvalue_output(o.name, v)
    t = wall_time_us(lambda: sess.run_with_iobinding(io), iters=iters, reps=reps)
    return t, [x.numpy() for x in io.get_outputs()]


def measure(model, feeds, cuda_graph_first: bool, iters: int):
    """Try with a CUDA graph first (if asked), fall back to plain CUDA EP; returns (µs, outputs, mode)."""
    modes = [True, False] if cuda_graph_first else [False]
    err = ""
    for cg in modes:
        try:
            t, outs = time_session(session(model, cg), feeds, iters=iters)
            return t, outs, "cuda graph" if cg else "plain", ""
        except Exception as e:  # noqa: BLE001
            err = " ".join(str(e).split())[-100:]
    return None, None, "failed", err


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="tools/results/ort_gpu.md")
    ap.add_argument("--no-cuda-graph", action="store_true")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--iters", type=int, default=200)
    args = ap.parse_args(argv)
    import onnxruntime as ort
    import torch

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        print(f"bench_ort_gpu needs onnxruntime-gpu (CUDAExecutionProvider); have {ort.get_available_providers()}",
              file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "unknown GPU"
    peak = hbm_peak(gpu)
    cg = not args.no_cuda_graph
    rows = []
    t0 = time.time()
    rng = np.random.default_rng(1)
    for k, n in [(4096, 4096), (8192, 8192)]:
        fp16, nbits, w = layer_models(k, n)
        x = (rng.standard_normal((1, k)) * 0.5).astype(np.float16)
        ref = x.astype(np.float32) @ w.T
        r = {"name": f"linear {k}x{n}, batch 1"}
        for tag, mdl, nbytes in (("fp16", fp16, n * k * 2), ("int4", nbits, n * k // 2 + n * k // GROUP * 2)):
            t, outs, mode, err = measure(mdl, {"A": x}, cg, args.iters)
            r[tag] = t
            r[tag + "_mode"] = mode
            r[tag + "_err"] = (float(np.abs(outs[0].astype(np.float32) - ref).max() / np.abs(ref).max())
                               if outs is not None else err)
            r[tag + "_bw"] = (nbytes / (t * 1e-6) / peak * 100) if (t and peak) else None
        rows.append(r)
        print(r, flush=True)
    cfg = dict(hidden_size=2048, intermediate_size=5632, num_layers=args.layers, num_heads=16, num_kv_heads=16,
               vocab_size=32000, tie_word_embeddings=False)
    with tempfile.TemporaryDirectory() as d:
        p16, p4, n_nbits, ids, ref = decode_models(Path(d), cfg)
        h, f, L, V = 2048, 5632, args.layers, 32000
        lin = L * (4 * h * h + 3 * h * f) + h * V  # weights read per token
        r = {"name": f"CausalLM decode step (h{h}, ffn{f}, {L} layers, vocab {V}), batch 1, 1 token"}
        for tag, path, nbytes in (("fp16", p16, lin * 2), ("int4", p4, lin // 2 + lin // GROUP * 4)):
            t, outs, mode, err = measure(path, {"input_ids": ids}, cg, max(20, args.iters // 4))
            r[tag], r[tag + "_mode"] = t, mode
            r[tag + "_err"] = (float(np.abs(outs[0].astype(np.float32) - ref).max() / np.abs(ref).max())
                               if outs is not None else err)
            r[tag + "_bw"] = (nbytes / (t * 1e-6) / peak * 100) if (t and peak) else None
        r["note"] = f"{n_nbits} MatMulNBits nodes"
        rows.append(r)
        print(r, flush=True)
    total = time.time() - t0
    lines = [
        "# ONNX Runtime CUDA EP: fp16 vs int4 MatMulNBits", "",
        f"GPU: **{gpu}**; onnxruntime {ort.__version__}; torch {torch.__version__}; total {total:.0f} s.", "",
        "Command: `PYTHONPATH=/tmp/gpu-site:$PWD python3 tools/bench_ort_gpu.py --out " + args.out + "`", "",
        "Inputs and outputs bound on the GPU (io_binding); wall clock per `run_with_iobinding` (synchronous), median "
        "of 10 repeats; mode = `cuda graph` when ORT's CUDA-graph capture worked for that model, else `plain` "
        "(launch + ORT host overhead included). int4 = MatMulNBits bits=4 g128, fp16 scales and activations, "
        "accuracy_level 0. err = max|y - ref| / max|ref| vs an fp32 torch reference (the layers: of the "
        "dequantized weight; the decode step: the fp32 float model, so the int4 error includes quantization). "
        "% HBM = weight bytes / time / peak (" + (f"{peak / 1e12} TB/s" if peak else "unknown") + ").", "",
        "| workload | fp16 µs | int4 µs | int4 speedup | fp16 % HBM | int4 % HBM | fp16 err | int4 err | modes | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def f(v, fmt):
        return format(v, fmt) if isinstance(v, float) else (str(v) if v is not None else "-")

    for r in rows:
        sp = f"{r['fp16'] / r['int4']:.2f}x" if r.get("fp16") and r.get("int4") else "-"
        lines.append(f"| {r['name']} | {f(r['fp16'], '.1f')} | {f(r['int4'], '.1f')} | {sp} | "
                     f"{f(r['fp16_bw'], '.0f')}% | {f(r['int4_bw'], '.0f')}% | {f(r['fp16_err'], '.1e')} | "
                     f"{f(r['int4_err'], '.1e')} | {r['fp16_mode']} / {r['int4_mode']} | {r.get('note', '')} |")
    print("\n".join(lines))
    write_table(args.out, lines, total)
    return 0


if __name__ == "__main__":
    sys.exit(main())
