"""Kernel launches of one TVM decode step, per layer, read from the built module; on a GPU also each kernel's time.

    PYTHONPATH=$PWD python tools/profile_decode_gpu.py --cpu                      # launch lists only (needs nvcc)
    PYTHONPATH=/tmp/gpu-site:$PWD python3 tools/profile_decode_gpu.py            # + per-kernel µs (H100)

Model: the one of tools/bench_decode_gpu.py (``CausalLM`` hidden 2048, intermediate 5632, 4 layers, 16 heads,
vocab 32000, random init), its linears RTN int4 g128 asymmetric (``--l4q``: the bench's L4Q-converted weights)
with q/k/v and gate/up fused (``fuse_linears``); lm_head fp16.  Built with ``build_tvm(..., target="cuda",
dtype=torch.float16)`` twice: ``TVMBuildConfig(fuse_epilogues=False)`` and ``True`` (the default).

Launch list (no GPU needed): the scheduled Relax ``main`` after ``RewriteDataflowReshape`` (the VM turns
reshape-like ``call_tir``s into views, so they launch nothing), one row per ``call_tir`` in program order, times
the number of CUDA kernels its PrimFunc compiled to (``<name>_kernel``, ``<name>_kernel_1``, ... in the device
source: a PrimFunc with several thread-bound loop nests is several launches).  A launch belongs to the layer of
the next quantized linear (``layers.<i>.``); those after the last linear of the last layer are the head (final
norm, lm_head).  Layer 0 also holds the step's prologue (embedding gather, rotary-table slices), so "per layer"
is the count of a middle layer (all middle layers are printed; they are equal).

GPU timing (CUDA visible to torch and TVM): torch.profiler (CUPTI) over ``--steps`` calls of the Relax VM
``main``, each after an L2 flush (tools/gpu_timing.py ``L2Flush``: weights come from HBM, as in a real decode);
each launch's time is the mean over the steps of the kernel at its position.  The whole step (Relax VM, CUDA
events, cold and hot) is printed beside it; tools/bench_decode_gpu.py times it with a CUDA graph too.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FULL = dict(hidden_size=2048, intermediate_size=5632, num_layers=4, num_heads=16, num_kv_heads=16, vocab_size=32000,
            tie_word_embeddings=False)
SMALL = dict(hidden_size=256, intermediate_size=512, num_layers=3, num_heads=4, num_kv_heads=4, vocab_size=1000,
             tie_word_embeddings=False)

# (substring of a kernel's PrimFunc name, what it does), first match wins
_WHAT = [
    ("swiglu", "packed int GEMV + silu(gate) * up epilogue (fused gate/up)"),
    ("fxc_packed_mma", "packed int (int4 / int8) GEMV, tensor cores"),
    ("fxc_packed_gemv", "packed int (int4 / int8) GEMV, CUDA cores"),
    ("decode_matmul", "quantized linear (te decode + matmul, dlight)"),
    ("rsqrt", "RMSNorm"),
    ("negative_concatenate", "rotary embedding (+ transpose)"),
    ("softmax", "softmax (+ SDPA's all-masked guard)"),
    ("logical_not_cast", "SDPA's all-masked-row check (max over the mask)"),
    ("less_equal", "causal mask + add to the scores"),
    ("sigmoid", "silu(gate) * up"),
    ("take", "embedding gather"),
    ("split", "split (one kernel per part)"),
    ("transpose", "transpose / reshape / cast"),
    ("strided_slice", "slice"),
    ("matmul", "float matmul (attention scores / values, or the float lm_head)"),
    ("add", "residual add"),
    ("cast", "cast"),
    ("multiply", "multiply"),
]


def describe(name: str) -> str:
    """What the kernel of PrimFunc ``name`` does (from the op names FuseOps put in it)."""
    for key, what in _WHAT:
        if key in name:
            if "fxc_packed" in name and "_rms" in name:
                what = "RMSNorm prologue + " + what
            if key.startswith("fxc_packed") and name.endswith("_res"):
                return what + " + residual-add epilogue"
            if key.startswith("fxc_packed") and name.endswith("_f32"):
                return what + ", fp32 store (cast epilogue)"
            return what
    return "other"


def launch_list(build) -> list[tuple[str, int]]:
    """[(PrimFunc name, kernels it launches)] in program order, from the scheduled module of ``build``."""
    import tvm
    from tvm import relax

    mod = relax.transform.RewriteDataflowReshape()(build.scheduled)
    src = build.device_source()
    kernels = re.findall(r"__global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(", src)
    per_func: dict[str, int] = {}
    for k in set(kernels):
        m = re.fullmatch(r"(\w+?)_kernel(?:_\d+)?", k)
        if m:
            per_func[m.group(1)] = per_func.get(m.group(1), 0) + 1
    out = []
    for block in mod["main"].body.blocks:
        for b in block.bindings:
            v = b.value
            if isinstance(v, relax.Call) and isinstance(v.op, tvm.ir.Op) and v.op.name in ("relax.call_tir",
                                                                                            "relax.call_tir_inplace"):
                name = v.args[0].name_hint
                out.append((name, per_func.get(name, 1)))
    return out


def per_layer(launches, layer_names: list[str]) -> list[tuple[str, list]]:
    """Split the launch list into [(layer label, [(index, name, kernels)])]: a launch belongs to the layer of the
    next quantized linear (in emission order, ``layer_names``); the rest is the head."""
    gemv = [i for i, (n, _) in enumerate(launches) if "fxc_packed" in n or "decode_matmul" in n]
    labels = []
    for name in layer_names:
        m = re.search(r"layers\.(\d+)\.", name)
        labels.append(f"layer {m.group(1)}" if m else "head")
    groups: list[tuple[str, list]] = []
    start = 0
    for gi, li in enumerate(gemv):
        lab = labels[gi] if gi < len(labels) else "head"
        if lab == "head":
            break
        nxt_lab = labels[gi + 1] if gi + 1 < len(labels) else "head"
        if nxt_lab != lab:  # last linear of this layer
            groups.append((lab, [(i, *launches[i]) for i in range(start, li + 1)]))
            start = li + 1
    groups.append(("head", [(i, *launches[i]) for i in range(start, len(launches))]))
    return groups


def gpu_kernel_times(runner, ids, launches, steps: int, flush) -> list[float] | None:
    """µs per launch position (mean over ``steps`` cold steps), or None when the profile does not line up."""
    from torch.profiler import ProfilerActivity, profile

    names = {n for n, _ in launches}
    total = sum(k for _, k in launches)
    x = runner._to_tvm(ids)
    main = runner.vm["main"]
    for _ in range(3):
        main(x)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            flush()
            main(x)
        torch.cuda.synchronize()
    evs = [e for e in prof.events() if getattr(e, "device_type", None) is not None
           and str(e.device_type).endswith("CUDA")]
    evs = [e for e in evs if re.sub(r"_kernel(_\d+)?$", "", e.name) in names]
    evs.sort(key=lambda e: e.time_range.start)
    if len(evs) != steps * total:
        print(f"profile: {len(evs)} TVM kernels over {steps} steps, expected {steps * total}; no per-launch times",
              file=sys.stderr)
        return None
    per = [0.0] * total
    for s in range(steps):
        for j in range(total):
            tr = evs[s * total + j].time_range
            per[j] += (tr.end - tr.start) / steps
    # fold the kernels of one call_tir back into one row
    out, j = [], 0
    for _, k in launches:
        out.append(sum(per[j:j + k]))
        j += k
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="launch lists only (no GPU timing); needs nvcc")
    ap.add_argument("--small", action="store_true", help="a tiny config (smoke test)")
    ap.add_argument("--l4q", action="store_true", help="the bench's L4Q-converted weights instead of RTN")
    ap.add_argument("--steps", type=int, default=20, help="profiled steps (GPU)")
    ap.add_argument("--out", default=None, help="markdown output (default tools/results/decode_profile.md; --cpu: "
                                                "tools/results/decode_launches.md)")
    args = ap.parse_args(argv)
    from bench_decode_gpu import make_models
    from fxcompress.backends.tvm import TVMBuildConfig, build_tvm
    from fxcompress.passes.fusion import fuse_linears
    from fxcompress.runtime.tvm_runner import TVMRunner

    gpu = not args.cpu and torch.cuda.is_available()
    if not args.cpu and not gpu:
        print("no CUDA GPU visible: use --cpu for the launch lists", file=sys.stderr)
        return 2
    args.out = args.out or ("tools/results/decode_profile.md" if gpu else "tools/results/decode_launches.md")
    cfg = SMALL if args.small else FULL
    t0 = time.time()
    _, dm, ids, qdesc = make_models(cfg, "cpu", 3, rtn=not args.l4q)
    dm = fuse_linears(dm, (ids,), atol=1e-3, rtol=1e-3).eval()
    flush = None
    if gpu:
        from gpu_timing import L2Flush, time_cold_hot

        flush = L2Flush()
    lines = ["# Kernel launches of the TVM decode step, per layer" + (" (and their time on the GPU)" if gpu else ""),
             "", f"Command: `python tools/profile_decode_gpu.py {' '.join(argv if argv is not None else sys.argv[1:])}`"
             f"; device: {torch.cuda.get_device_name(0) if gpu else 'none (launch lists from the built module)'}.", "",
             f"Model: CausalLM {cfg}; {qdesc}; q/k/v and gate/up fused (fuse_linears); lm_head fp16; batch 1, one "
             "token, no KV cache. Built with build_tvm(target='cuda', dtype=torch.float16); a launch = one CUDA "
             "kernel of a call_tir (reshape-like call_tirs are views and launch nothing). A launch belongs to the "
             "layer of the next quantized linear; layer 0 also holds the step's prologue.", ""]
    summary = []
    for fuse in (False, True):
        label = f"fuse_epilogues={fuse}"
        tb = time.time()
        b = build_tvm(dm, (ids,), target="cuda", dtype=torch.float16, config=TVMBuildConfig(fuse_epilogues=fuse))
        launches = launch_list(b)
        groups = per_layer(launches, [layer["name"] for layer in b.info["layers"]])
        times = None
        step = ""
        if gpu:
            r = TVMRunner(b.executable, "cuda", b.info, build=b)
            times = gpu_kernel_times(r, ids.cuda(), launches, args.steps, flush)
            xt = r._to_tvm(ids.cuda())
            t = time_cold_hot(lambda: r.vm["main"](xt), flush=flush, reps=3, calls=args.steps, cuda=True)
            step = f"; whole step (Relax VM, no CUDA graph): cold {t.cold} µs, hot {t.hot.median:.1f} µs"
        total = sum(k for _, k in launches)
        layer_counts = [sum(k for _, _, k in g) for lab, g in groups if lab.startswith("layer")]
        mid = layer_counts[1] if len(layer_counts) > 2 else layer_counts[-1]
        summary.append((label, total, layer_counts, mid, sum(times) if times else None))
        lines += [f"## {label}: {total} launches per step; per layer {layer_counts} (a middle layer: {mid}; "
                  f"issue 13 target <= 8){step}", "", f"Build {time.time() - tb:.0f} s.", ""]
        head = "| # | layer | kernel (PrimFunc) | launches | what it does |" + (" µs, cold |" if times else "")
        lines += [head, "|---|---|---|---|---|" + ("---|" if times else "")]
        for lab, g in groups:
            for i, name, k in g:
                row = f"| {i} | {lab} | `{name[:90]}` | {k} | {describe(name)} |"
                if times:
                    row += f" {times[i]:.1f} |"
                lines.append(row)
        lines.append("")
    lines += ["## Summary", "", "| build | launches / step | per layer | a middle layer | kernel µs / step, cold |",
              "|---|---|---|---|---|"]
    for label, total, counts, mid, tsum in summary:
        lines.append(f"| {label} | {total} | {counts} | {mid} | {f'{tsum:.1f}' if tsum else '-'} |")
    lines.append(f"\nTotal {time.time() - t0:.0f} s.")
    text = "\n".join(lines)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
