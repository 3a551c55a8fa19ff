"""FSDP2 on 2 GPUs: tokens/s and peak memory per GPU, 1 GPU (unsharded) vs 2 GPUs (fully_shard),
L4Q vs plain LoRA under the same sharding, on a LLaMA-style 1.1B random-init bf16 model; then a
torch.distributed.checkpoint save / resume and the conversion of the gathered result.

Run on a host with 2 GPUs (it launches the 1-GPU run and ``torchrun --nproc-per-node 2`` itself):

    PYTHONPATH=/tmp/gpu-site:$PWD python3 tools/l4q_fsdp.py --out tools/results/l4q_fsdp.md

Weak scaling: every GPU processes ``--batch`` x ``--seq`` tokens per step, so 2 GPUs process twice
the tokens of 1; tokens/s counts all GPUs.  Same model, data sizes, rank and optimizer (AdamW) for
both methods; each method in a fresh model.  A training step streams GBs of weights and
activations, far beyond the 50 MB L2, so no cache flushing is needed between timed steps.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def model_config(args):
    from fxcompress.models.smollm2 import SmolLM2Config
    return SmolLM2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
                         num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.kv_heads,
                         max_position_embeddings=max(2048, args.seq + 1), tie_word_embeddings=False)


def shard(model, method, units, reshard_after_forward=True):
    from torch.distributed.fsdp import fully_shard
    from bench_l4q_train import LoRALinear
    from fxcompress.distributed import default_mp_policy, fsdp_units, shard_l4q
    if method == "l4q":
        return shard_l4q(model, units=units, reshard_after_forward=reshard_after_forward)
    for group in fsdp_units(model, LoRALinear, units):  # the same units and policy as shard_l4q
        fully_shard(group if len(group) > 1 else group[0], mp_policy=default_mp_policy(),
                    reshard_after_forward=reshard_after_forward)
    fully_shard(model, mp_policy=default_mp_policy(), reshard_after_forward=reshard_after_forward)
    return model


def loss_of(model, ids, vocab):
    logits = model(ids[:, :-1])
    return F.cross_entropy(logits.float().reshape(-1, vocab), ids[:, 1:].reshape(-1))


def measure(method, cfg, args, dev, sharded, rank, world):
    import torch.distributed as dist
    from bench_l4q_train import build
    t0 = time.time()
    model = build(method, cfg, args, dev)
    if sharded:
        shard(model, method, args.units, args.reshard_after_forward)
    prep_s = time.time() - t0
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator(device=dev).manual_seed(1000 + rank)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), device=dev, generator=g)

    def step():
        loss = loss_of(model, ids, cfg.vocab_size)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t0 = time.time()
    for _ in range(args.warmup):
        step()
    sync()
    warm_s = time.time() - t0
    if args.profile and cuda:  # every rank runs the profiled steps (their collectives pair up); rank 0 prints
        print_profile(step, f"{method}, {world} GPU(s), rank 0", sync, show=rank == 0)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.iters):
        if sharded:
            dist.barrier()
        t0 = time.perf_counter()  # host clock around a synchronised step: the whole step incl. comms
        step()
        sync()
        times.append((time.perf_counter() - t0) * 1000)
    ms = statistics.median(times)
    if sharded:  # the slowest rank sets the pace
        t = torch.tensor([ms], device=dev)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        ms = float(t)
    res = dict(method=method, world=world, step_ms=ms, step_ms_min=min(times), step_ms_max=max(times),
               tokens_per_s=world * args.batch * args.seq / (ms / 1000),
               peak_mib=torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan"), prep_s=prep_s,
               warmup_s=warm_s)
    return model, opt, ids, res


def print_profile(step, label, sync, steps=2, show=True):
    """Where a step's time goes on this rank: wall, GPU kernel time by kind (NCCL / GEMM / other), top kernels."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        wall = (time.perf_counter() - t0) / steps * 1000
    if not show:
        return
    kinds = {"nccl": 0.0, "gemm": 0.0, "other": 0.0}
    rows = []
    for e in prof.key_averages():
        if getattr(e, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        us = getattr(e, "self_device_time_total", 0) / steps
        name = e.key.lower()
        kind = "nccl" if "nccl" in name else "gemm" if any(k in name for k in ("gemm", "nvjet", "xmma")) else "other"
        kinds[kind] += us
        rows.append((us, e.count // steps, e.key[:80]))
    print(f"--- profile {label}: wall {wall:.1f} ms/step (under the profiler); GPU kernel ms/step: "
          + ", ".join(f"{k} {v / 1e3:.1f}" for k, v in kinds.items()), flush=True)
    for us, n, name in sorted(rows, reverse=True)[:12]:
        print(f"    {us / 1e3:8.2f} ms  {n:5d}x  {name}", flush=True)
    cpu = sorted((e for e in prof.key_averages() if getattr(e, "device_type", None) == torch.autograd.DeviceType.CPU),
                 key=lambda e: -e.self_cpu_time_total)[:8]
    print("    top host (self CPU ms/step): " + "; ".join(f"{e.key[:40]} {e.self_cpu_time_total / steps / 1e3:.1f}"
                                                      for e in cpu), flush=True)


def checkpoint_resume_convert(model, opt, ids, cfg, args, dev, rank):
    """DCP save -> fresh sharded model -> load -> same loss; then gather and convert on rank 0."""
    import torch.distributed as dist
    import fxcompress as fxc
    from bench_l4q_train import build
    from fxcompress.distributed import gather_l4q_state, load_l4q_checkpoint, save_l4q_checkpoint, shard_l4q
    out = {}
    ckpt = args.ckpt_dir
    t0 = time.time()
    save_l4q_checkpoint(model, opt, ckpt)
    out["save_s"] = time.time() - t0
    with torch.no_grad():
        before = loss_of(model, ids, cfg.vocab_size).item()
    t0 = time.time()
    full = gather_l4q_state(model)
    out["gather_s"] = time.time() - t0
    del model, opt
    m2 = shard_l4q(build("l4q", cfg, args, dev))
    opt2 = torch.optim.AdamW([p for p in m2.parameters() if p.requires_grad], lr=1e-4)
    t0 = time.time()
    load_l4q_checkpoint(m2, opt2, ckpt)
    out["load_s"] = time.time() - t0
    with torch.no_grad():
        after = loss_of(m2, ids, cfg.vocab_size).item()
    out["loss_before"], out["loss_resumed"] = before, after
    loss = loss_of(m2, ids, cfg.vocab_size)  # and the resumed model trains on
    loss.backward()
    opt2.step()
    out["resumed_step_ok"] = bool(torch.isfinite(loss).item())
    del m2, opt2
    if rank == 0:
        t0 = time.time()
        plain = build("l4q", cfg, args, dev)
        plain.load_state_dict({k: v.to(plain.state_dict()[k].dtype) for k, v in full.items()})
        dm = fxc.convert_l4q(plain)
        with torch.no_grad():
            short = ids[:1, :129]
            fq, cv = plain(short).float(), dm(short).float()
        out["convert_s"] = time.time() - t0
        out["convert_max_abs_diff"] = float((fq - cv).abs().max())
        out["logit_max_abs"] = float(fq.abs().max())
    dist.barrier()
    return out


def role_main(args):
    import torch.distributed as dist
    sharded = args.role == "fsdp"
    cuda = args.device == "cuda"
    if sharded:
        dist.init_process_group("nccl" if cuda else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    else:
        rank, world = 0, 1
    dev = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    cfg = model_config(args)
    results = []
    for method in ("lora", "l4q"):
        model, opt, ids, res = measure(method, cfg, args, dev, sharded, rank, world)
        if rank == 0:
            print(json.dumps(res), flush=True)
        if sharded and method == "l4q" and args.ckpt_dir:
            res["checkpoint"] = checkpoint_resume_convert(model, opt, ids, cfg, args, dev, rank)
            if rank == 0:
                print(json.dumps(res["checkpoint"]), flush=True)
        results.append(res)
        del model, opt
        if cuda:
            torch.cuda.empty_cache()
    if rank == 0:
        Path(args.json).write_text(json.dumps(results))
    if sharded:
        dist.destroy_process_group()


def launch(args):
    if args.device == "cuda" and torch.cuda.device_count() < 2:
        raise SystemExit(f"tools/l4q_fsdp.py needs 2 GPUs, found {torch.cuda.device_count()}")
    common = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
              ("hidden", "ffn", "layers", "heads", "kv_heads", "vocab", "batch", "seq", "rank", "warmup", "iters",
               "device", "units", "reshard_after_forward")] + (["--profile"] if args.profile else [])
    t_start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        single, fsdp = os.path.join(tmp, "single.json"), os.path.join(tmp, "fsdp.json")
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=os.environ.get("CUDA_VISIBLE_DEVICES", "0,1").split(",")[0])
        subprocess.run([sys.executable, __file__, "--role", "single", "--json", single, *common], check=True, env=env)
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        __file__, "--role", "fsdp", "--json", fsdp, "--ckpt-dir", os.path.join(tmp, "ckpt"), *common],
                       check=True)
        rows = json.loads(Path(single).read_text()) + json.loads(Path(fsdp).read_text())
    total = time.time() - t_start
    by = {(r["method"], r["world"]): r for r in rows}
    n_params = None
    try:
        from fxcompress.models.smollm2 import CausalLM
        with torch.device("meta"):
            n_params = sum(p.numel() for p in CausalLM(model_config(args)).parameters())
    except Exception:  # noqa: BLE001 - the count is only descriptive
        pass
    device = torch.cuda.get_device_name(0) + " x 2 (NCCL)" if args.device == "cuda" else "CPU (gloo; smoke run)"
    lines = [
        "# L4Q under FSDP2: 1 GPU vs 2 GPUs, L4Q vs plain LoRA",
        "",
        f"Device: {device}, torch {torch.__version__}; total wall {total:.0f} s.",
        f"Model: LLaMA-style random init, {args.layers} layers, hidden {args.hidden}, FFN {args.ffn}, {args.heads} "
        f"heads ({args.kv_heads} KV), vocab {args.vocab}"
        + (f", {n_params / 1e9:.2f} B parameters" if n_params else "") + ", bf16 weights and activations. "
        f"LoRA rank {args.rank} on every q/k/v/o/gate/up/down projection (lm_head, embeddings frozen); L4Q 4-bit g128 "
        f"(frozen W0 bf16, trainable A, B, step sizes and offsets fp32). Per GPU {args.batch} x {args.seq} tokens "
        f"a step (weak scaling), AdamW; median of {args.iters} steps after {args.warmup} warm-up steps (2 GPUs: the "
        f"slower rank). 2 GPUs: `fully_shard` per {'decoder block (its adapted linears as one unit)' if args.units == 'block' else 'adapted linear'} and then the root "
        f"(`fxcompress.distributed.shard_l4q(units={args.units!r})`; LoRA sharded the same way), no parameter cast, fp32 gradient reduction.",
        "",
        f"Command: `PYTHONPATH=/tmp/gpu-site:$PWD python3 tools/l4q_fsdp.py --layers {args.layers} "
        f"--batch {args.batch} --seq {args.seq} --iters {args.iters} --units {args.units} "
        f"--reshard-after-forward {args.reshard_after_forward}`",
        "",
        "| method | GPUs | step ms [min-max] | tokens/s | tokens/s vs 1 GPU | step vs LoRA | peak MiB per GPU | "
        "memory vs LoRA |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (method, world), r in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        lo = by[("lora", world)]
        one = by.get((method, 1))
        lines.append(f"| {'L4Q' if method == 'l4q' else 'LoRA'} | {world} | {r['step_ms']:.1f} "
                     f"[{r['step_ms_min']:.1f}-{r['step_ms_max']:.1f}] | {r['tokens_per_s']:,.0f} | "
                     f"{r['tokens_per_s'] / one['tokens_per_s']:.2f}x | {r['step_ms'] / lo['step_ms']:.2f}x | "
                     f"{r['peak_mib']:.0f} | {r['peak_mib'] / lo['peak_mib']:.2f}x |")
    ck = by[("l4q", 2)].get("checkpoint")
    if ck:
        lines += ["", "Checkpoint (2 GPUs, L4Q, after the timed steps): `save_l4q_checkpoint` (torch.distributed."
                  f"checkpoint) {ck['save_s']:.1f} s; a fresh sharded model loaded it in {ck['load_s']:.1f} s; loss "
                  f"on the same batch before {ck['loss_before']:.6f}, after resume {ck['loss_resumed']:.6f}; the "
                  f"resumed model took a training step: {'ok' if ck['resumed_step_ok'] else 'NOT FINITE'}. Gathered "
                  f"state ({ck['gather_s']:.1f} s) loaded into an unsharded copy and converted with `convert_l4q` "
                  f"({ck.get('convert_s', float('nan')):.1f} s): converted vs fake-quant logits max |diff| "
                  f"{ck.get('convert_max_abs_diff', float('nan')):.4f} "
                  f"(logits up to {ck.get('logit_max_abs', 0):.2f})."]
    lines += ["", "Targets (issue 15): >= 1.7x tokens/s on 2 GPUs; L4Q <= 1.3x LoRA step time, <= 1.1x memory per GPU.",
              f"(run at {time.strftime('%Y-%m-%d %H:%M')})", ""]
    text = "\n".join(lines)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--role", choices=("launch", "single", "fsdp"), default="launch")
    ap.add_argument("--json", default="")
    ap.add_argument("--ckpt-dir", default="")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=5632)
    ap.add_argument("--layers", type=int, default=22)  # TinyLlama-1.1B's shape
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--units", choices=("block", "linear"), default="block",
                    help="FSDP2 units: one per decoder block (default) or one per adapted linear")
    ap.add_argument("--reshard-after-forward", type=lambda v: v.lower() in ("1", "true", "yes"), default=True,
                    help="false: keep each unit's gathered weights from forward to backward (one all-gather a step)")
    ap.add_argument("--profile", action="store_true", help="print where rank 0's step time goes (2 steps)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: a gloo smoke run of the script")
    ap.add_argument("--out", default="tools/results/l4q_fsdp.md")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("tools/l4q_fsdp.py needs CUDA GPUs (or --device cpu for a smoke run)")
    launch(args) if args.role == "launch" else role_main(args)


if __name__ == "__main__":
    main()
