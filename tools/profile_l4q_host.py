"""Host time per call of the L4Q layer's pieces (CUDA): how long Python takes to *issue* them.

A training step is host-bound when the host issues a layer's kernels more slowly than the GPU runs them.  Here
each piece is called N times on a tiny batch with no synchronisation in between, so the wall time per call is
the host's issue cost (the GPU work is a few µs).  Compare the L4Q layer (forward + backward) with a plain
LoRA linear of the same shape.

    PYTHONPATH=$PWD python3 tools/profile_l4q_host.py --out tools/results/l4q_host_profile.md
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def per_call_us(fn, n):
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t) / n * 1e6
    torch.cuda.synchronize()
    return host


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out-features", type=int, default=2048)
    ap.add_argument("--in-features", type=int, default=2048)
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--out", default="tools/results/l4q_host_profile.md")
    args = ap.parse_args()
    from fxcompress.quant import l4q_fn, l4q_triton
    from fxcompress.quant.spec import QuantSpec
    from fxcompress.nn import L4QLinear

    dev = "cuda"
    o, i = args.out_features, args.in_features
    w = torch.randn(o, i, device=dev, dtype=torch.bfloat16) * 0.05
    layer = L4QLinear(w, None, QuantSpec(bits=4, granularity="per_group", group_size=128, symmetric=False), 16, 32)
    x = torch.randn(1, 8, i, device=dev, dtype=torch.bfloat16, requires_grad=True)
    wk, ba, s2, o2 = l4q_fn._kernel_inputs(layer.weight, layer.lora_A, layer.lora_B, layer.lora_scale, layer.scale,
                                           layer.offset, 128, True)
    gwq = torch.randn_like(wk)
    lora_a = torch.randn(16, i, device=dev, requires_grad=True)
    lora_b = torch.zeros(o, 16, device=dev, requires_grad=True)

    def lora():
        y = torch.nn.functional.linear(x, w) + torch.nn.functional.linear(
            torch.nn.functional.linear(x, lora_a.to(x.dtype)), lora_b.to(x.dtype)) * 2.0
        y.sum().backward()

    out = torch.empty_like(wk)
    grid, br, bg, nw = l4q_triton._launch(*wk.shape)

    def raw_launch():
        l4q_triton.forward_kernel[grid](wk, ba, s2, o2, out, wk.shape[0], 2.0, 0.0, 15.0, GL=128, BLOCK_R=br,
                                        BLOCK_G=bg, HAS_BA=True, HAS_OFF=True, num_warps=nw, enable_fp_fusion=False)

    rows = [
        ("torch.empty_like (one dispatcher call)", lambda: torch.empty_like(wk)),
        ("Triton forward_kernel[grid](...) alone", raw_launch),
        ("Triton forward weight kernel", lambda: l4q_triton.forward_weight(wk, ba, 2.0, s2, o2, 0, 15,
                                                                          torch.bfloat16)),
        ("Triton backward weight kernel", lambda: l4q_triton.backward_weight(wk, ba, 2.0, s2, o2, gwq, 0.1, 0, 15,
                                                                            True, torch.bfloat16)),
        ("_kernel_inputs (B·A GEMM, views)", lambda: l4q_fn._kernel_inputs(
            layer.weight, layer.lora_A, layer.lora_B, layer.lora_scale, layer.scale, layer.offset, 128, True)),
        ("L4Q layer forward (no grad)", lambda: torch.no_grad()(layer)(x)),
        ("L4Q layer forward + backward", lambda: layer(x).sum().backward()),
        ("LoRA linear forward + backward", lora),
    ]
    lines = [f"| piece ({o}x{i}, x 1x8 tokens, {torch.cuda.get_device_name(0)}, torch {torch.__version__}) | "
             f"host µs per call |", "|---|---:|"]
    print("\n".join(lines), flush=True)
    for name, fn in rows:
        lines.append(f"| {name} | {per_call_us(fn, args.n):.1f} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + f"\n\n(run at {time.strftime('%Y-%m-%d %H:%M')}, {args.n} calls each)\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    prev = Path(args.out).read_text() if Path(args.out).exists() else ""
    Path(args.out).write_text(prev + ("\n" if prev else "") + text)


if __name__ == "__main__":
    main()
