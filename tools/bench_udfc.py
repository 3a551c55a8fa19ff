"""Benchmark the UDFC pass (CPU): pass wall time vs width, and forward latency before / after compression.

    /work/venv/bin/python tools/bench_udfc.py [--widths 32 64 128] [--reps 20]
"""
from __future__ import annotations

import argparse
import platform
import sys
import time

import torch
from torch import nn

import fxcompress as fxc
from fxcompress.models.digits import DigitsResNet, pretrained_digits_resnet
from fxcompress.passes.udfc import UDFCConfig, udfc_pass


def _randomize_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.3)
    return model.eval()


def _latency(fn, x, reps):
    with torch.no_grad():
        fn(x)
        t0 = time.perf_counter()
        for _ in range(reps):
            fn(x)
    return (time.perf_counter() - t0) / reps * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--widths", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=256)
    args = ap.parse_args(argv)
    print(f"CPU: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    x = torch.rand(args.batch, 1, 8, 8)
    print(f"{'model':<22}{'config':<22}{'pass s':>8}{'fp32 ms':>9}{'udfc ms':>9}")
    for w in args.widths:
        model = pretrained_digits_resnet() if w == 32 else _randomize_bn(DigitsResNet(width=w))
        gm = fxc.capture(model, (x[:4],))
        for cfg_name, cfg in (("prune 30% fp32", UDFCConfig(prune_ratio=0.3, quantize=False)),
                              ("prune 30% + 6-bit", UDFCConfig(prune_ratio=0.3, weight_bits=6))):
            t0 = time.perf_counter()
            res = udfc_pass(gm, cfg)
            dt = time.perf_counter() - t0
            out = res.gm.eval()
            print(f"{'digits w=' + str(w):<22}{cfg_name:<22}{dt:>8.2f}{_latency(gm.eval(), x, args.reps):>9.2f}"
                  f"{_latency(out, x, args.reps):>9.2f}")
    print("(QuantConv2d dequantizes in forward on CPU: the torch latency of quantized models is a reference "
          "path, not a deployment number; see the ONNX Runtime / TVM backends.)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
