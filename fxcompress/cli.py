"""The ``fxcompress`` command line."""
from __future__ import annotations

import argparse
import sys
import time


def _cmd_demo(args) -> int:
    import torch

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
    print()
    print(fxc.report(last.gm))
    print()
    print(f"{'model':<26}{'bits':>5}{'top-1 %':>10}{'bytes':>10}")
    for name, bits, acc, nbytes in rows:
        print(f"{name:<26}{bits:>5}{acc:>10.2f}{nbytes:>10}")
    print(f"(test set: {len(yte)} real handwritten digits; {time.perf_counter() - t0:.1f} s)")
    if args.out:
        fxc.save(last.gm, args.out)
        print(f"saved the int{args.bits[-1]} model to {args.out} (try: fxcompress report {args.out})")
    assert torch.is_tensor(xte)
    return 0


def _cmd_report(args) -> int:
    import fxcompress as fxc

    gm = fxc.load(args.dir)
    print(fxc.report(gm))
    return 0


def _cmd_quantize(args) -> int:
    import fxcompress as fxc

    gm = fxc.load(args.dir)
    cfg = fxc.RTNConfig(bits=args.bits, symmetric=args.symmetric, granularity=args.granularity,
                        group_size=args.group_size)
    res = fxc.quantize_rtn(gm, cfg, progress=True)
    fxc.save(res.gm, args.out)
    print(res.report)
    return 0


def _not_yet(name: str):
    def run(args) -> int:
        print(f"fxcompress {name}: not available in this version yet", file=sys.stderr)
        return 2

    return run


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

    for name, helptext in [("l4q", "quantization-aware LoRA fine-tuning (L4Q)"),
                           ("udfc", "data-free pruning + quantization with compensation (UDFC)"),
                           ("export", "export a saved model to ONNX (QDQ) or TVM"),
                           ("bench", "benchmark a deployed model")]:
        s = sub.add_parser(name, help=helptext)
        s.set_defaults(fn=_not_yet(name))
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
