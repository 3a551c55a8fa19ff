"""UDFC on a ResNet-18-sized network (CPU): pass wall time, parameter count, ONNX Runtime latency.

ResNet-18 layout (7x7 stem, 4 stages of 2 basic blocks, 64-512 channels, 1000 classes, 11.7 M
parameters) with random weights and randomised BatchNorm statistics: the wall time and sizes
do not depend on trained values (accuracy is measured on the digits ResNet in eval_udfc.py).

    python tools/bench_udfc_resnet18.py --out tools/results/udfc_resnet18_bench.md
"""
from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import fxcompress as fxc
from fxcompress.models.digits import BasicBlock
from fxcompress.passes.udfc import UDFCConfig, udfc_pass


class ResNet18(nn.Module):
    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths, cin, stages = (64, 128, 256, 512), 64, []
        for i, w in enumerate(widths):
            stages.append(nn.Sequential(BasicBlock(cin, w, 1 if i == 0 else 2), BasicBlock(w, w)))
            cin = w
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def randomized_resnet18() -> ResNet18:
    torch.manual_seed(0)
    m = ResNet18()
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.normal_(0, 0.2)
            mod.running_var.uniform_(0.5, 1.5)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.normal_(0, 0.3)
    return m.eval()


def ort_latency_ms(gm, x, path, reps):
    fxc.export_onnx(gm, (x,), path)
    runner = fxc.runtime.load_runner(str(path), backend="ort", device="cpu")
    runner(x)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        runner(x)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), Path(path).stat().st_size


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default="tools/results/udfc_resnet18_bench.md")
    args = ap.parse_args()
    torch.set_num_threads(2)
    x = torch.randn(1, 3, 224, 224)
    model = randomized_resnet18()
    gm = fxc.capture(model, (x,))
    nparams = sum(p.numel() for p in gm.parameters())
    rows = []
    with tempfile.TemporaryDirectory() as d:
        base_ms, base_bytes = ort_latency_ms(gm, x, Path(d) / "fp32.onnx", args.reps)
        rows.append(("original fp32", "-", nparams, base_ms, base_bytes))
        for name, cfg in (("prune 30%, fp32", UDFCConfig(prune_ratio=0.3, quantize=False)),
                          ("prune 30% + 6-bit", UDFCConfig(prune_ratio=0.3, weight_bits=6)),
                          ("6-bit only", UDFCConfig(prune=False, weight_bits=6))):
            t0 = time.perf_counter()
            res = udfc_pass(gm, cfg)
            dt = time.perf_counter() - t0
            n = sum(p.numel() for p in res.gm.parameters()) + sum(
                m.quant_weight.codes().numel() for m in res.gm.modules() if hasattr(m, "quant_weight"))
            ms, nbytes = ort_latency_ms(res.gm, x, Path(d) / "c.onnx", args.reps)
            rows.append((name, f"{dt:.2f}", n, ms, nbytes))
            print(rows[-1], flush=True)
    lines = [
        "# UDFC on a ResNet-18-sized network (random weights, randomised BN statistics)",
        "",
        f"Device: {platform.processor() or platform.machine()}, 2 torch threads, torch {torch.__version__}; "
        f"input 1x3x224x224; ONNX Runtime CPU latency: median of {args.reps} runs.",
        "",
        "Command: `python tools/bench_udfc_resnet18.py`",
        "",
        "| model | UDFC pass s | weights (count) | ORT CPU ms | .onnx bytes |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, dt, n, ms, nbytes in rows:
        lines.append(f"| {name} | {dt} | {n:,} | {ms:.1f} | {nbytes:,} |")
    lines += ["", "Pruning removes only channels that no residual add ties (the first conv of each basic block); "
              "6-bit weights are stored in 8-bit ONNX containers (int8 DequantizeLinear), and ORT runs the "
              "weight-only QDQ convolutions unfused, so quantized latency is not lower than fp32 here."]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
