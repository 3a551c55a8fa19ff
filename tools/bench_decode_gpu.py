"""End-to-end decode step on the GPU: torch fp16 (float model) vs TVM CUDA (packed int4 weights, fused decode
GEMV kernels) on a LLaMA-style CausalLM, batch 1, one token.

    PYTHONPATH=/tmp/gpu-site:$PWD python3 tools/bench_decode_gpu.py --out tools/results/decode_gpu.md

Model: ``fxcompress.models.smollm2.CausalLM(hidden 2048, intermediate 5632, 4 layers, 16 heads, 16 kv heads,
vocab 32000, untied head)``, random init (2-D weights scaled by 0.5, as tools/bench_ort_gpu.py, to keep fp16
activations in range).  Integer model: ``prepare_l4q`` (int4, g128, asymmetric, LoRA rank 16) trained for a few
steps toward the float model's logits, then ``convert_l4q`` -> QuantLinear layers with fractional zero points
(the lm_head stays float, as L4Q's default ``exclude``).  The model has no KV cache, so a 1-token forward is the
per-token weight-bound work of a decode step.

Timings (median of repeats, after warm-up):
* torch fp16 eager: the float model in fp16, CUDA events around many calls.
* torch fp16 CUDA graph: the same forward captured once with ``torch.cuda.CUDAGraph`` and replayed (no launch
  overhead: closest to the fp16 kernels' own time).
* TVM: ``fxcompress.compile_tvm(dm, (ids,), target="cuda", dtype=torch.float16)``, timed with
  ``TVMRunner.time_evaluator`` (the Relax VM call: host dispatch included); and, where it builds, the same with
  ``relax.backend.use_cuda_graph`` (Relax captures the static kernel sequence into a CUDA graph).
Parity: max|y - ref| / max|ref| of the logits vs the torch module of the integer model (``dm``) in fp32.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from gpu_timing import cuda_time_us, hbm_peak, write_table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FULL = dict(hidden_size=2048, intermediate_size=5632, num_layers=4, num_heads=16, num_kv_heads=16, vocab_size=32000,
            tie_word_embeddings=False)
SMALL = dict(hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4, num_kv_heads=4, vocab_size=1000,
             tie_word_embeddings=False)


def rel_err(y, ref) -> float:
    y, ref = y.float().cpu(), ref.float().cpu()
    return ((y - ref).abs().max() / ref.abs().max()).item()


def make_models(cfg_kwargs: dict, device: str, steps: int, rtn: bool):
    """(float model fp32 on device, integer model dm fp32 on device, ids, description)."""
    import fxcompress as fxc
    from fxcompress.models.smollm2 import CausalLM, SmolLM2Config

    torch.manual_seed(0)
    model = CausalLM(SmolLM2Config(**cfg_kwargs)).eval()
    with torch.no_grad():
        for p in model.parameters():  # keep random-init activations in a sane range for fp16
            if p.dim() == 2:
                p.mul_(0.5)
    model = model.to(device)
    ids = torch.randint(0, cfg_kwargs["vocab_size"], (1, 1), device=device)
    if rtn:
        gm = fxc.capture(model, (ids,))
        dm = fxc.quantize_rtn(gm, fxc.RTNConfig(bits=4, symmetric=False, granularity="per_group", group_size=128,
                                                exclude=("lm_head",)))
        return model, dm.eval(), ids, "RTN int4 g128 asymmetric (integer zero points)"
    qm = fxc.prepare_l4q(model, (ids,), fxc.L4QConfig(bits=4, group_size=128, symmetric=False, lora_rank=16,
                                                      fused=False))
    opt = torch.optim.Adam(fxc.l4q_param_groups(qm, 2e-3, 1e-4))
    train_ids = torch.randint(0, cfg_kwargs["vocab_size"], (steps, 1, 1), device=device)
    for i in range(steps):  # a few steps: B != 0 and the offsets (zero points) become fractional
        with torch.no_grad():
            target = model(train_ids[i])
        loss = (qm(train_ids[i]) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    dm = fxc.convert_l4q(qm).eval()
    frac = sum(1 for m in dm.modules() if hasattr(m, "quant_weight") and not m.quant_weight.zero_point_is_integer)
    return model, dm, ids, f"L4Q int4 g128 asymmetric, {steps} training steps, convert_l4q ({frac} layers with " \
                           "fractional zero points)"


def kernel_profile(runner, ids, top: int = 12, calls: int = 20) -> list[str]:
    """Markdown lines: the GPU kernels of the TVM decode step by total time (torch.profiler / CUPTI sees every
    kernel in the process, TVM's included), averaged over ``calls`` steps; shows where the step's time goes."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        runner(ids)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            runner(ids)
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", 0.0)
        if t > 0:
            rows.append((e.key, e.count // calls, t / calls))
    total = sum(t for _, _, t in rows) or 1.0
    lines = ["", "## Where the TVM decode step's GPU time goes (torch.profiler over "
             f"{calls} steps, per step)", "",
             f"Kernel time per step: {total:.1f} µs in {sum(c for _, c, _ in rows)} kernel launches (the rest of the "
             "step is launch / VM overhead).", "",
             "| kernel | launches / step | µs / step | share |", "|---|---|---|---|"]
    for name, c, t in sorted(rows, key=lambda r: -r[2])[:top]:
        lines.append(f"| `{name[:70]}` | {c} | {t:.1f} | {t / total * 100:.0f}% |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="tools/results/decode_gpu.md")
    ap.add_argument("--small", action="store_true", help="a tiny config (smoke test)")
    ap.add_argument("--steps", type=int, default=3, help="L4Q training steps before convert_l4q")
    ap.add_argument("--rtn", action="store_true", help="RTN int4 instead of L4Q-converted weights")
    ap.add_argument("--config", default=None, help="a JSON file written by bench_gemv.py --sweep (TVM schedule)")
    ap.add_argument("--no-cuda-graph", action="store_true", help="skip the TVM CUDA-graph build")
    ap.add_argument("--profile", action="store_true", help="add a per-kernel table (Relax VM profiler)")
    args = ap.parse_args(argv)
    import tvm

    import fxcompress as fxc
    from fxcompress.backends import tvm as B

    if not torch.cuda.is_available() or not tvm.cuda(0).exist:
        print("bench_decode_gpu needs a CUDA GPU visible to torch and TVM", file=sys.stderr)
        return 2
    config_note = "fxcompress defaults"
    if args.config:
        import json

        d = json.loads(Path(args.config).read_text())
        bcfg = B.TVMBuildConfig(decode_mode=d.get("decode") or "magic", gemv_cuda=d.get("config"))
        config_note = f"sweep winner {d.get('name')}"
    else:
        bcfg = B.TVMBuildConfig()
    config_note += f" (decode_mode={bcfg.decode_mode!r}, gemv_cuda={dict(bcfg.gemv_cuda or {}) or None})"
    t0 = time.time()
    gpu = torch.cuda.get_device_name(0)
    peak = hbm_peak(gpu)
    cfg = SMALL if args.small else FULL
    model, dm, ids, qdesc = make_models(cfg, "cuda", args.steps, args.rtn)
    t_prep = time.time() - t0
    rows, notes = [], []
    with torch.no_grad():
        ref32 = dm(ids).float()  # the integer model's torch module, fp32
        f16 = __import__("copy").deepcopy(model).half().eval()
        y16 = f16(ids)
        t_eager = cuda_time_us(lambda: f16(ids))
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                f16(ids)
        torch.cuda.current_stream().wait_stream(s)
        with torch.cuda.graph(g):
            yg = f16(ids)
        t_graph = cuda_time_us(g.replay)
        err16 = rel_err(y16, model(ids))
        dm16 = __import__("copy").deepcopy(dm).half().eval()
        t_int_torch = cuda_time_us(lambda: dm16(ids), iters=10, reps=5)
        err_int16 = rel_err(dm16(ids), ref32)
    fp16_bytes = sum(p.numel() * 2 for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n)
    q_bytes = 0
    for m in dm.modules():
        if hasattr(m, "quant_weight"):
            qw = m.quant_weight
            q_bytes += qw.shape[0] * qw.shape[1] * qw.spec.bits // 8 + qw.scale.numel() * 2 \
                + (qw.zero_point.numel() * 2 if bool((qw.zero_point != 0).any()) else 0)
    head = dm.get_submodule("lm_head") if hasattr(dm, "lm_head") else None
    if head is not None and hasattr(head, "weight"):
        q_bytes += head.weight.numel() * 2
    rows.append(("torch fp16 eager (float model)", t_eager, err16, fp16_bytes))
    rows.append(("torch fp16 CUDA graph (float model)", t_graph, rel_err(yg, model(ids)), fp16_bytes))
    rows.append(("torch fp16 eager (integer model: QuantLinear dequantize + F.linear)", t_int_torch, err_int16,
                 None))

    def tvm_row(label, use_graph: bool):
        tb = time.time()
        ctx = tvm.transform.PassContext(config={"relax.backend.use_cuda_graph": True}) if use_graph else None
        # lower from a CPU copy: torch.export of a CUDA model picks the flash-attention SDPA kernel op
        # (_scaled_dot_product_flash_attention), which TVM's importer does not know; on CPU it stays
        # scaled_dot_product_attention.  The runner moves its inputs to the GPU itself.
        dm_cpu, ids_cpu = __import__("copy").deepcopy(dm).cpu(), ids.cpu()
        try:
            if ctx is not None:
                with ctx:
                    r = fxc.compile_tvm(dm_cpu, (ids_cpu,), target="cuda", dtype=torch.float16, config=bcfg)
            else:
                r = fxc.compile_tvm(dm_cpu, (ids_cpu,), target="cuda", dtype=torch.float16, config=bcfg)
            y = r(ids)
            y = y[0] if isinstance(y, (list, tuple)) else y
            t = r.time_evaluator(ids, number=50, repeat=15).median * 1e6
            nk = len(r.build.kernel_names())
            rows.append((label, t, rel_err(y, ref32), q_bytes))
            notes.append(f"{label}: build {time.time() - tb:.0f} s, {nk} CUDA kernels, "
                         f"{len(r.build.info.get('fused_decode_primfuncs', []))} fused decode PrimFuncs")
            print(f"{label}: {t:.1f} us, err {rows[-1][2]:.1e}", flush=True)
            return r
        except Exception as e:  # noqa: BLE001
            notes.append(f"{label}: failed: {type(e).__name__}: {str(e).strip().splitlines()[-1][:160]}")
            print(notes[-1], flush=True)
            return None

    r_vm = tvm_row("TVM CUDA, fp16 activations, packed int4 (Relax VM)", False)
    profile_lines = kernel_profile(r_vm, ids) if (r_vm is not None and args.profile) else []
    if not args.no_cuda_graph:
        tvm_row("TVM CUDA, fp16 activations, packed int4 (Relax VM + CUDA graph)", True)
    total = time.time() - t0
    base = t_eager
    lines = [
        "# Decode step on the GPU: torch fp16 vs TVM (packed int4, fused decode GEMV)", "",
        f"GPU: **{gpu}**; torch {torch.__version__}; tvm {tvm.__version__}; total {total:.0f} s "
        f"(model + L4Q prep {t_prep:.0f} s).", "",
        "Command: `PYTHONPATH=/tmp/gpu-site:$PWD python3 tools/bench_decode_gpu.py "
        + " ".join(argv if argv is not None else sys.argv[1:]) + "`", "",
        f"Model: CausalLM {cfg}, random init, batch 1, 1 token (no KV cache: the whole forward). "
        f"Integer model: {qdesc}; lm_head stays fp16. TVM schedule: {config_note}.", "",
        "err = max|y - ref| / max|ref| of the logits; ref = the float model (fp32) for the float rows, the torch "
        "module of the integer model in fp32 for the integer rows. Weight bytes = 2-D weights read per token "
        "(embedding table excluded: a row gather); int4 rows: packed codes + fp16 scales (+ zero points) + fp16 "
        "lm_head. % HBM = weight bytes / time / peak.", "",
        "| path | µs / token | vs torch fp16 eager | vs torch fp16 CUDA graph | weight MB | % HBM peak | err |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, t, err, nbytes in rows:
        mb = f"{nbytes / 1e6:.0f}" if nbytes else "-"
        pct = f"{nbytes / (t * 1e-6) / peak * 100:.0f}%" if nbytes and peak else "-"
        lines.append(f"| {label} | {t:.1f} | {base / t:.2f}x | {t_graph / t:.2f}x | {mb} | {pct} | {err:.1e} |")
    lines += ["", "Notes:"] + [f"- {n}" for n in notes] + profile_lines
    print("\n".join(lines))
    write_table(args.out, lines, total)
    return 0


if __name__ == "__main__":
    sys.exit(main())
