"""Training-step time and peak memory: L4Q (fused) vs plain LoRA vs naive fake-quant composition.

Same LLaMA-style model (random weights: timing does not depend on values), same batch, same
rank, bf16 weights and activations, AdamW on the trainable parameters.  Run on a GPU:

    PYTHONPATH=$PWD python tools/bench_l4q_train.py --out tools/results/l4q_train_bench.md

Each method is measured in a fresh model; peak memory is torch.cuda.max_memory_allocated over
the timed steps (weights + activations + optimizer state + temporaries).
"""
from __future__ import annotations

import argparse
import gc
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import fxcompress as fxc
from fxcompress.models.smollm2 import CausalLM, SmolLM2Config
from fxcompress.passes.graph import linear_sites, replace_site


class LoRALinear(nn.Module):
    """The plain LoRA reference: y = x W0ᵀ + s·(x Aᵀ) Bᵀ (+ bias), W0 frozen, no quantization."""

    def __init__(self, weight, bias, rank, alpha):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.lora_A = nn.Parameter(torch.empty(rank, weight.shape[1], dtype=weight.dtype, device=weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(weight.shape[0], rank, dtype=weight.dtype, device=weight.device))
        self.scaling = alpha / rank

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + self.scaling * F.linear(F.linear(x, self.lora_A), self.lora_B)


L4Q_KERNELS = ("forward_kernel", "backward_kernel")  # fxcompress/quant/l4q_triton.py (torch.compile'd: triton_*)
GEMM_MARKERS = ("gemm", "nvjet", "cutlass", "xmma", "cublas", "sm90_", "sm80_")


def kernel_rows(prof):
    """(name, total device µs, calls) of every GPU kernel in a torch.profiler run."""
    rows = []
    for e in prof.key_averages():
        if getattr(e, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        us = getattr(e, "self_device_time_total", None)
        us = e.self_cuda_time_total if us is None else us
        if us > 0:
            rows.append((e.key, us, e.count))
    return rows


def kernel_summary(rows, steps, weight_elems=0):
    """Text: GPU time and launches per step by kind (L4Q weight kernels: the Triton ones, or inductor's triton_*
    under --compile; GEMMs; other) and the top kernels; with ``weight_elems`` (L4Q weight elements), the bandwidth the weight kernels reach
    if they move 8 (forward) + 12 (backward) bytes per element per step, their planned traffic."""
    weight = "weight kernels (L4Q Triton)"
    kinds = {weight: [], "GEMMs (cuBLAS)": [], "other": []}
    for r in rows:
        name = r[0].lower()
        kind = (weight if name in L4Q_KERNELS or name.startswith("triton_")
                else "GEMMs (cuBLAS)" if any(m in name for m in GEMM_MARKERS) else "other")
        kinds[kind].append(r)
    total = sum(r[1] for r in rows) / steps / 1e3
    lines = [f"GPU kernel time per step: {total:.2f} ms",
             "| kind | ms / step | launches / step |", "|---|---:|---:|"]
    for kind, rs in kinds.items():
        lines.append(f"| {kind} | {sum(r[1] for r in rs) / steps / 1e3:.2f} | {sum(r[2] for r in rs) / steps:.0f} |")
    wk = sum(r[1] for r in kinds[weight]) / steps
    if weight_elems and wk > 0:
        gb = weight_elems * 20 / 1e9
        lines.append(f"weight kernels: {wk / 1e3:.2f} ms/step for {weight_elems / 1e6:.1f} M weight elements "
                     f"(~{gb:.2f} GB planned: 8 B/elem forward + 12 B/elem backward) -> {gb / (wk / 1e6):.0f} GB/s "
                     f"(H100 HBM3 peak ~3350 GB/s)")
    lines += ["top kernels:", "| kernel | ms / step | calls / step | µs / call |", "|---|---:|---:|---:|"]
    for name, us, n in sorted(rows, key=lambda r: -r[1])[:12]:
        lines.append(f"| {name[:90]} | {us / steps / 1e3:.2f} | {n / steps:.0f} | {us / n:.1f} |")
    return "\n".join(lines)


def build(method, cfg, args, device):
    torch.manual_seed(0)
    with torch.device(device):
        model = CausalLM(cfg).to(torch.bfloat16).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 16), device=device)
    if method == "lora":
        gm = fxc.capture(model, (ids,))
        for p in gm.parameters():
            p.requires_grad_(False)
        for s in linear_sites(gm):
            if s.name != "lm_head":
                replace_site(gm, s, LoRALinear(s.weight, s.bias, args.rank, 2.0 * args.rank))
        gm.recompile()
        return gm
    l4q_cfg = fxc.L4QConfig(bits=4, group_size=128, lora_rank=args.rank, lora_alpha=2.0 * args.rank,
                            fused=(method == "l4q"))
    return fxc.prepare_l4q(model, (ids,), l4q_cfg)


def measure(method, cfg, args, device):
    model = build(method, cfg, args, device)
    if args.compile:  # the whole forward (and through AOTAutograd the backward) compiled, for every method alike
        model = torch.compile(model)
    del_params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(del_params, lr=1e-4)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), device=device)

    def step():
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, cfg.vocab_size), ids[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
        print(f"--- profile of 3 steps: {method} ---")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25), flush=True)
        from fxcompress.nn import L4QLinear
        elems = sum(m.weight.numel() for m in model.modules() if isinstance(m, L4QLinear))
        print(f"--- kernel summary per step: {method} ---")
        print(kernel_summary(kernel_rows(prof), 3, elems), flush=True)
        if method == "l4q":
            from fxcompress.quant import l4q_fn
            layer = next(m for m in model.modules() if isinstance(m, L4QLinear))
            fwd = l4q_fn._kernels(layer.weight, layer.group_size, True)[0]
            print(f"L4Q weight kernels: {fwd.__module__}.{fwd.__name__}", flush=True)
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    peak = torch.cuda.max_memory_allocated() / 2**20
    # where the peak is: after the forward (activations saved) vs during backward + optimizer step
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() / 2**20
    logits = model(ids[:, :-1])
    loss = F.cross_entropy(logits.float().reshape(-1, cfg.vocab_size), ids[:, 1:].reshape(-1))
    del logits
    fwd_peak = torch.cuda.max_memory_allocated() / 2**20
    torch.cuda.reset_peak_memory_stats()
    loss.backward()
    bwd_peak = torch.cuda.max_memory_allocated() / 2**20
    opt.zero_grad(set_to_none=True)
    print(f"{method}: resident {base:.0f} MiB, forward peak {fwd_peak:.0f} MiB, backward peak {bwd_peak:.0f} MiB",
          flush=True)
    ntrain = sum(p.numel() for p in del_params)
    del model, opt, ids
    gc.collect()
    torch.cuda.empty_cache()
    return statistics.median(times), peak, ntrain


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=5632)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3, help="runs per method (fresh model each), interleaved")
    ap.add_argument("--no-naive", action="store_true", help="skip the naive-composition row")
    ap.add_argument("--profile", action="store_true", help="print the top CUDA kernels of 3 steps per method")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the model (every method): no per-layer Python on the host")
    ap.add_argument("--out", default="tools/results/l4q_train_bench.md")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_l4q_train.py needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = True
    cfg = SmolLM2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
                        num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.heads,
                        max_position_embeddings=max(2048, args.seq + 1), tie_word_embeddings=False)
    dev = torch.device("cuda")
    rows = {}
    methods = ("lora", "l4q") if args.no_naive else ("lora", "l4q", "naive")
    runs = {m: [] for m in methods}
    for rep in range(args.repeats):  # methods interleaved, a fresh model each time: drift hits all alike
        for method in methods:
            runs[method].append(measure(method, cfg, args, dev))
            print(f"repeat {rep}: {method} {runs[method][-1]}", flush=True)
    for m in methods:
        ts = [r[0] for r in runs[m]]
        rows[m] = (statistics.median(ts), max(r[1] for r in runs[m]), runs[m][0][2], min(ts), max(ts))
    name = torch.cuda.get_device_name(0)
    lt, lm, _, _, _ = rows["lora"]
    ratios = {m: [a[0] / b[0] for a, b in zip(runs[m], runs["lora"])] for m in methods}
    lines = [
        "# L4Q training step: time and peak memory vs plain LoRA and naive fake-quant",
        "",
        f"Device: {name}, torch {torch.__version__}. Model: LLaMA-style, {args.layers} layers, hidden {args.hidden}, "
        f"FFN {args.ffn}, {args.heads} heads, vocab {args.vocab}, bf16; batch {args.batch} x seq {args.seq}; "
        f"LoRA rank {args.rank} on all q/k/v/o/gate/up/down projections (lm_head frozen); L4Q 4-bit g128; "
        f"AdamW; per run the median of {args.iters} steps after {args.warmup} warm-up steps; {args.repeats} runs per "
        f"method, interleaved, each in a fresh model; step ms = median over runs [min-max]; the ratio columns "
        f"pair each run with the LoRA run of the same repeat.",
        "",
        f"Command: `PYTHONPATH=$PWD python tools/bench_l4q_train.py --layers {args.layers} --hidden {args.hidden} "
        f"--ffn {args.ffn} --batch {args.batch} --seq {args.seq} --rank {args.rank} --warmup {args.warmup} "
        f"--iters {args.iters} --repeats {args.repeats}{' --no-naive' if args.no_naive else ''}"
        f"{' --compile' if args.compile else ''}`",
        "",
        "| method | step ms [min-max] | vs LoRA, median [min-max] of runs | peak MiB | vs LoRA | trainable params |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    labels = {"lora": "LoRA (bf16, no quantization)", "l4q": "L4Q fused autograd (ours)",
              "naive": "L4Q naive composition (autograd through fake quant)"}
    for m, (t, pk, n, tmin, tmax) in rows.items():
        rs = ratios[m]
        lines.append(f"| {labels[m]}{', torch.compile' if args.compile else ''} | {t:.2f} [{tmin:.2f}-{tmax:.2f}] | {statistics.median(rs):.2f}x "
                     f"[{min(rs):.2f}-{max(rs):.2f}] | {pk:.0f} | {pk / lm:.2f}x | {n:,} |")
    lines.append("")
    text = "\n".join(lines)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    prev = Path(args.out).read_text() if Path(args.out).exists() else ""
    Path(args.out).write_text((prev + "\n" if prev else "") + text + f"\n(run at {time.strftime('%Y-%m-%d %H:%M')})\n")


if __name__ == "__main__":
    main()
