"""Fashion-MNIST test accuracy of the compressed CNNs (issue 12, item 1 (b) and item 2's accuracy target).

Loads the weights written by ``tools/train_fashion_cnn.py`` (``--weights DIR``: ``resnet18_fashion`` and
``mobilenet_v2_fashion`` safetensors) and measures test-set top-1 accuracy (all 10000 images, or the
first ``--limit N``) of each model under:

* float: torch, and the exported fp32 ONNX model in ONNX Runtime CPU;
* RTN per-channel weights at 8 / 6 / 4 bits (weight-only; accuracy from torch);
* 8-bit weights + 8-bit activations, ranges from BatchNorm statistics (``ranges="bn"``, data-free) and from
  calibration (``ranges="calibrate"``, ``--calib-batches`` training batches): exported with
  ``fxc.export_onnx`` (activation QDQ), accuracy from ONNX Runtime CPU, and the optimized ORT graph must
  contain ``QLinearConv`` (else the row fails with that reason);
* UDFC prune 10 / 30 / 50 % x weights 8 / 6 / 4 bits, and 8-bit weights + activations (bn ranges) on top;
* baselines: L1 pruning + RTN without compensation (UDFC's code path with ``compensate=False``),
  torch-pruning (DepGraph, L1 importance) of the same producer convs at the same ratio + RTN, and DFQ
  (``fxc.dfq``: cross-layer equalization + bias correction) + RTN, and DFQ + 8-bit activations.

Columns: accuracy, delta vs the float torch accuracy (points), Conv/Linear weight count, FLOPs (2 x the
multiply-accumulates of every Conv2d / Linear, per image), ORT CPU latency at batch 1 (``--threads``
intra-op threads, median of ``--iters`` runs) of the exported model.  A row whose pass or export raises
keeps the exception as its note.  The table states the target (8-bit w+a within 1 point of float with
data-free ranges) and whether it holds for each model.

    PYTHONPATH=$PWD /work/venv/bin/python tools/eval_fashion_cnn.py --weights /work/fashion_weights
    PYTHONPATH=$PWD /work/venv/bin/python tools/eval_fashion_cnn.py --weights /tmp/fw --limit 500 --prunes 0.3 --bits 8
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import platform
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import fxcompress as fxc
from fxcompress.nn import QuantConv2d, QuantLinear
from fxcompress.passes.udfc import UDFCConfig

OUT = Path(__file__).parent / "results" / "fashion_cnn_eval.md"
TARGET_POINTS = 1.0  # issue 12: 8-bit w+a within 1 point of float, data-free ranges


def _load_train_module():
    spec = importlib.util.spec_from_file_location("train_fashion_cnn", Path(__file__).with_name("train_fashion_cnn.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


tfc = _load_train_module()


# ----------------------------------------------------------------------------------------------
# Measurements (every row goes through these)

@torch.no_grad()
def accuracy_torch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    """Top-1 accuracy (%) of ``model`` (eval mode) on ``x``, ``y``."""
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        correct += int((model(x[i:i + batch].contiguous()).argmax(1) == y[i:i + batch]).sum())
    return 100.0 * correct / len(x)


def accuracy_ort(runner, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    """Top-1 accuracy (%) of an ORT runner (``fxcompress.runtime.ort.OrtRunner``) on ``x``, ``y``."""
    correct = 0
    for i in range(0, len(x), batch):
        correct += int((runner.run(x[i:i + batch].contiguous())[0].argmax(1) == y[i:i + batch]).sum())
    return 100.0 * correct / len(x)


def params_and_flops(model: nn.Module, x1: torch.Tensor) -> tuple[int, int]:
    """(Conv/Linear weight count, FLOPs = 2 x multiply-accumulates of every Conv2d / Linear) for one image."""
    macs = [0]
    hooks = []
    n_params = 0

    def shape_of(m):
        return tuple(m.weight_shape) if hasattr(m, "weight_shape") else tuple(m.weight.shape)

    def hook(m, inp, out):
        per_out = math.prod(shape_of(m)[1:])  # in/groups x kh x kw (conv) or in (linear)
        macs[0] += out.numel() // out.shape[0] * per_out  # output elements per image

    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear, QuantConv2d, QuantLinear)):
            hooks.append(m.register_forward_hook(hook))
            n_params += math.prod(shape_of(m))
    try:
        with torch.no_grad():
            model.eval()(x1[:1].contiguous())
    finally:
        for h in hooks:
            h.remove()
    return n_params, 2 * macs[0]


def ort_latency_ms(runner, x1: torch.Tensor, iters: int) -> float:
    """Median wall time (ms) of ``iters`` batch-1 runs after 3 warm-up runs."""
    xb = x1[:1].contiguous()
    for _ in range(3):
        runner.run(xb)
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        runner.run(xb)
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts)


# ----------------------------------------------------------------------------------------------
# Compressed variants (each returns a new module; the float model is never modified)

def rtn(model: nn.Module, x1: torch.Tensor, bits: int) -> nn.Module:
    """Per-channel symmetric RTN of every Conv2d / Linear (UDFC's quantizer, pruning and compensation off;
    it supports 6 bits in an 8-bit container, which ``fxc.quantize_rtn`` does not).  Without compensation
    the cross-channel model only feeds the report's error estimate, so the cheap "independent" one is used."""
    return fxc.udfc(model, (x1[:1],), UDFCConfig(prune=False, compensate=False, weight_bits=bits, skip=(),
                                                 correlation="independent"))


def udfc(model: nn.Module, x1: torch.Tensor, prune: float, bits: int, **kw) -> nn.Module:
    """``fxc.udfc`` with every layer eligible (``skip=()``: the classifier is quantized too)."""
    return fxc.udfc(model, (x1[:1],), UDFCConfig(prune_ratio=prune, weight_bits=bits, skip=(), **kw))


def pruned_producers(gm: nn.Module) -> list[str]:
    """The layers UDFC pruned (from its report), depthwise convs that follow a producer left out."""
    return [r.layer for r in fxc.report(gm) if r.action.startswith("pruned") and "depthwise" not in r.note]


def l1_prune_rtn(model: nn.Module, x1: torch.Tensor, prune: float, bits: int) -> nn.Module:
    """L1 filter pruning + RTN, no compensation (UDFC's code path with ``compensate=False``)."""
    return udfc(model, x1, prune, bits, criterion="l1", compensate=False, correlation="independent")


def torch_pruning_l1(model: nn.Module, x1: torch.Tensor, producers: list[str], ratio: float) -> nn.Module:
    """DepGraph (torch-pruning) L1 pruning of the ``producers`` convs at ``ratio``, no compensation (as in
    tools/eval_udfc_cnn.py: a ratio per producer, global ratio 0, only Linear layers ignored)."""
    import torch_pruning as tp

    if not producers:
        raise ValueError("no producer layers to prune (UDFC pruned none at this ratio)")
    m = copy.deepcopy(model).eval()
    named = dict(m.named_modules())
    ignored = [mod for mod in m.modules() if isinstance(mod, nn.Linear)]
    pruner = tp.pruner.MetaPruner(m, x1[:1].contiguous(), importance=tp.importance.MagnitudeImportance(p=1),
                                  pruning_ratio=0.0, pruning_ratio_dict={named[p]: ratio for p in producers},
                                  ignored_layers=ignored)
    pruner.step()
    return m


def quantize_wa(model: nn.Module, x1: torch.Tensor, ranges: str, calibration=None) -> tuple[nn.Module, str]:
    """8-bit weights (per channel, BN folded) + uint8 activations; returns (model, how the ranges were set).

    ``ranges="bn"``: from BatchNorm statistics, the network input's from the preprocessing (``input_range``);
    a tensor without either falls back to calibration on the one example image ``x1`` -- the pass's
    documented default -- and the note counts them.  ``ranges="calibrate"``: min/max over ``calibration`` batches.
    """
    # data-free: the network input's range follows from the preprocessing (pixels in [0, 1], normalized)
    input_range = ((0.0 - tfc.MEAN) / tfc.STD, (1.0 - tfc.MEAN) / tfc.STD) if ranges == "bn" else None
    cfg = fxc.ActivationConfig(bits=8, ranges=ranges, calibration=tuple(calibration) if calibration else None,
                               input_range=input_range)
    q = fxc.quantize_activations(model, (x1[:1].contiguous(),), cfg)
    acts = [r for r in fxc.report(q) if r.op == "activation"]
    n_bn = sum(r.action == "quantized" and "BN:" in r.note for r in acts)
    n_cal = sum(r.action == "quantized" and "calibrated" in r.note for r in acts)
    n_float = sum(r.action != "quantized" for r in acts)
    how = f"act ranges: {n_bn} BN, {n_cal} calibrated" + (f", {n_float} left float" if n_float else "")
    return q, how


# ----------------------------------------------------------------------------------------------
# Rows

@dataclass
class Row:
    model: str
    method: str
    prune: float = 0.0
    wbits: int | None = None  # None: float weights
    abits: int | None = None  # None: float activations
    runtime: str = "torch"  # where the accuracy was computed: "torch" or "ORT CPU"
    acc: float | None = None
    params: int | None = None
    flops: int | None = None
    latency_ms: float | None = None
    note: str = ""


@dataclass
class Evaluator:
    """Runs one model's rows: ``x``/``y`` test images and labels (already preprocessed), ``x1`` one example image."""

    name: str
    x: torch.Tensor
    y: torch.Tensor
    x1: torch.Tensor
    workdir: Path
    iters: int = 20
    threads: int = 2  # ORT intra-op threads for the latency column
    eval_threads: int = 1  # ORT intra-op threads for the accuracy runs (1: robust on a shared machine)
    latency: str = "ort"  # latency column for: "ort" (rows whose accuracy is from ORT), "all" (every row), "none"
    rows: list = field(default_factory=list)
    float_acc: float | None = None
    on_row: object = None  # callback(row) after each row (progress / partial table)
    deadline: float | None = None  # time.time() after which rows are listed as not run (the time budget)
    accuracy_in: str = "torch"  # where rows that do not say compute accuracy: "torch" or "ort" (exported model)
    check_n: int = 1000  # w8a8 rows: also ORT vs torch fake-quant accuracy on the first check_n images (0: off)

    def __post_init__(self):
        if self.latency not in ("ort", "all", "none"):
            raise ValueError(f"Evaluator.latency must be 'ort', 'all' or 'none', got {self.latency!r}")
        if self.accuracy_in not in ("torch", "ort"):
            raise ValueError(f"Evaluator.accuracy_in must be 'torch' or 'ort', got {self.accuracy_in!r}")

    def _export(self, model: nn.Module, tag: str) -> Path:
        path = self.workdir / f"{self.name}_{len(self.rows)}_{tag}.onnx"
        return fxc.export_onnx(model, (self.x1[:1].contiguous(),), path, low_bit_container="int8")

    def add(self, method: str, build, *, prune: float = 0.0, wbits=None, abits=None, ort_accuracy: bool | None = None,
            require_qlinear: bool = False, latency: bool = True, note: str = "") -> Row:
        """Build a variant with ``build()`` (-> module, or (module, note)) and measure it; a failure becomes the note.

        ``ort_accuracy``: accuracy from the exported model in ONNX Runtime CPU (True), from torch (False), or
        where ``self.accuracy_in`` says (None).  ``require_qlinear``: the optimized ORT graph must contain
        QLinearConv.  ``latency=False``: no latency for this row (e.g. same shapes as another row).
        """
        from fxcompress.runtime.ort import load_ort

        if ort_accuracy is None:
            ort_accuracy = self.accuracy_in == "ort"
        row = Row(self.name, method, prune, wbits, abits, "ORT CPU" if ort_accuracy else "torch", note=note)
        t0 = time.perf_counter()
        if self.deadline is not None and time.time() > self.deadline:
            row.note = "not run: the time budget (--max-minutes) was spent"
            self.rows.append(row)
            return row
        try:
            built = build()
            model, extra = built if isinstance(built, tuple) else (built, "")
            notes = [n for n in (note, extra) if n]
            row.params, row.flops = params_and_flops(model, self.x1)
            path = None
            timed = latency and (self.latency == "all" or (self.latency == "ort" and ort_accuracy))
            if ort_accuracy or require_qlinear or timed:
                path = self._export(model, method.split()[0].lower())
                runner = load_ort(path, intra_op_num_threads=self.eval_threads)
            if require_qlinear:
                ops = runner.optimized_op_types()
                if not ops.get("QLinearConv"):
                    raise RuntimeError("the optimized ORT graph has no QLinearConv (ops: "
                                       f"{', '.join(f'{k} {v}' for k, v in ops.most_common(6))})")
                notes.append("ORT ops: " + ", ".join(f"{k} {v}" for k, v in sorted(ops.items())
                                                     if k.startswith("QLinear")))
            if ort_accuracy:
                row.acc = accuracy_ort(runner, self.x, self.y)
                if abits is not None and self.check_n:  # the same graph in torch (fake-quant), for comparison
                    n = min(self.check_n, len(self.x))
                    notes.append(f"first {n} images: ORT {accuracy_ort(runner, self.x[:n], self.y[:n]):.2f}%, torch "
                                 f"fake-quant {accuracy_torch(model, self.x[:n], self.y[:n]):.2f}%")
            else:
                row.acc = accuracy_torch(model, self.x, self.y)
            if timed:
                row.latency_ms = ort_latency_ms(load_ort(path, intra_op_num_threads=self.threads), self.x1, self.iters)
            row.note = "; ".join(notes)
        except Exception as e:  # noqa: BLE001 - a failing row keeps its reason in the table, not fatal
            row.note = (f"{note}; " if note else "") + f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            row.note = row.note[:220]
        self.rows.append(row)
        print(f"{self.name:22s} {method:34s} p{prune:.0%} w{wbits} a{abits} {row.runtime:7s} "
              f"acc {_fmt(row.acc, '.2f')}  params {_fmt(row.params)}  FLOPs {_fmt(row.flops)}  "
              f"ORT {_fmt(row.latency_ms, '.2f')} ms  ({time.perf_counter() - t0:.0f} s)  {row.note}", flush=True)
        if self.on_row is not None:
            self.on_row(row)
        return row


def run_rows(ev: Evaluator, model: nn.Module, *, bits=(8, 6, 4), prunes=(0.1, 0.3, 0.5), calibration=None,
             skip: tuple = (), stage: str = "all") -> list[Row]:
    """The table's rows for one model; returns ``ev.rows``.

    ``stage``: "core" (float, ORT float, w8a8 with both range modes, RTN, DFQ), "prune" (UDFC and the
    pruning baselines; needs the core rows first) or "all".  ``skip``: method-name prefixes to leave out.
    """
    if stage not in ("all", "core", "prune"):
        raise ValueError(f"stage must be 'all', 'core' or 'prune', got {stage!r}")
    model = model.eval()

    def want(method):
        return not any(method.startswith(s) for s in skip)

    if stage in ("all", "core"):
        _core_rows(ev, model, bits, calibration, want)
    if stage in ("all", "prune"):
        if not any(r.method == "float" for r in ev.rows):
            raise ValueError("run the core rows (the float reference) before stage='prune'")
        _prune_rows(ev, model, bits, prunes, want)
    return ev.rows


def _core_rows(ev: Evaluator, model: nn.Module, bits, calibration, want) -> None:
    x1 = ev.x1
    flt = ev.add("float", lambda: model, ort_accuracy=False, latency=False)
    ev.float_acc = flt.acc
    ev.add("float", lambda: model, ort_accuracy=True)
    if want("w8a8"):
        ev.add("w8a8 bn ranges (data-free)", lambda: quantize_wa(model, x1, "bn"), wbits=8, abits=8,
               ort_accuracy=True, require_qlinear=True)
        if calibration:
            ev.add("w8a8 calibrated ranges", lambda: quantize_wa(model, x1, "calibrate", calibration), wbits=8,
                   abits=8, ort_accuracy=True, require_qlinear=True,
                   note=f"{len(calibration)} training batches of {len(calibration[0])}")
    for b in bits:
        if want("RTN"):
            ev.add("RTN per channel", lambda b=b: rtn(model, x1, b), wbits=b)
    if want("DFQ"):  # data-free baseline: cross-layer equalization + bias correction (fxc.dfq), then RTN
        for b in bits:
            ev.add("DFQ + RTN per channel", lambda b=b: fxc.dfq(model, (x1[:1],), fxc.DFQConfig(weight_bits=b)),
                   wbits=b)
        if want("w8a8"):
            ev.add("DFQ + w8a8 bn ranges", lambda: quantize_wa(fxc.dfq(model, (x1[:1],), fxc.DFQConfig(
                weight_bits=None)), x1, "bn"), wbits=8, abits=8, ort_accuracy=True, require_qlinear=True)


def _prune_rows(ev: Evaluator, model: nn.Module, bits, prunes, want) -> None:
    x1 = ev.x1
    for p in prunes:
        producers: list[str] = []
        for b in bits:
            if want("UDFC"):
                def build_udfc(p=p, b=b, producers=producers):
                    gm = udfc(model, x1, p, b)
                    producers[:] = pruned_producers(gm)
                    return gm, gm.meta["udfc_summary"].split(";")[0]
                ev.add("UDFC", build_udfc, prune=p, wbits=b)
            if want("L1"):
                ev.add("L1 prune + RTN (no comp.)", lambda p=p, b=b: l1_prune_rtn(model, x1, p, b), prune=p, wbits=b,
                       latency=False, note="ORT latency: as UDFC (same shapes)" if ev.latency == "all" else "")
            if want("torch-pruning"):
                def build_tp(p=p, b=b, producers=producers):
                    names = producers or pruned_producers(udfc(model, x1, p, 8))
                    return rtn(torch_pruning_l1(model, x1, names, p), x1, b)
                ev.add("torch-pruning L1 + RTN", build_tp, prune=p, wbits=b)
        if want("UDFC"):
            ev.add("UDFC 8-bit + w8a8 bn ranges", lambda p=p: quantize_wa(udfc(model, x1, p, 8), x1, "bn"),
                   prune=p, wbits=8, abits=8, ort_accuracy=True, require_qlinear=True)


# ----------------------------------------------------------------------------------------------
# Table

def _fmt(v, spec: str = "") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec) if spec else str(v)


def target_lines(evaluators: list[Evaluator]) -> list[str]:
    out = []
    for ev in evaluators:
        r = next((r for r in ev.rows if r.method.startswith("w8a8 bn")), None)
        if r is None:  # e.g. the pruning rows' evaluator on a test subset (--prune-limit)
            continue
        if r.acc is None or ev.float_acc is None:
            out.append(f"- **{ev.name}**: not measured ({r.note if r else 'row missing'})")
            continue
        d = r.acc - ev.float_acc
        ok = d >= -TARGET_POINTS
        out.append(f"- **{ev.name}**: float {ev.float_acc:.2f}%, w8a8 data-free (ORT CPU) {r.acc:.2f}% "
                   f"({d:+.2f} points): **{'holds' if ok else 'MISSED'}**")
    return out


def render(evaluators: list[Evaluator], header: list[str], done: bool = True) -> str:
    target = (f"**Target (issue 12, item 2)**: 8-bit weights + 8-bit activations with data-free (BatchNorm) ranges "
              f"within {TARGET_POINTS:g} point of float.")
    columns = ("| model | method | prune | w bits | a bits | accuracy from | top-1 % | delta vs float (pts) | "
               "params (M) | MFLOPs | ORT ms (b1) | note |")
    lines = ["# Fashion-MNIST: accuracy of the compressed CNNs (UDFC, RTN, integer activations)", "", *header,
             "", target, "", *target_lines(evaluators), "", columns, "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for ev in evaluators:
        for r in ev.rows:
            d = r.acc - ev.float_acc if r.acc is not None and ev.float_acc is not None else None
            lines.append(f"| {r.model} | {r.method} | {r.prune:.0%} | {_fmt(r.wbits) if r.wbits else 'fp32'} | "
                         f"{_fmt(r.abits) if r.abits else 'fp32'} | {r.runtime} | {_fmt(r.acc, '.2f')} | "
                         f"{_fmt(d, '+.2f')} | {_fmt(r.params and r.params / 1e6, '.3f')} | "
                         f"{_fmt(r.flops and r.flops / 1e6, '.1f')} | {_fmt(r.latency_ms, '.2f')} | "
                         f"{r.note.replace('|', '/')} |")
    if not done:
        lines += ["", "**Partial**: the run was still going when this file was written (rewritten after every row)."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------

def load_models(weights: Path) -> dict[str, tuple[nn.Module, bool]]:
    """name -> (model with the trained weights, rgb input); safetensors only (loading runs no code)."""
    from safetensors.torch import load_file

    weights = Path(weights)
    out = {}
    for name, (model, rgb) in tfc.make_models().items():
        f = weights / f"{name}.safetensors"
        if not f.is_file():
            raise FileNotFoundError(f"{f} is missing: train it with tools/train_fashion_cnn.py --out {weights}")
        model.load_state_dict(load_file(str(f)), strict=True)
        out[name] = (model.eval(), rgb)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", type=Path, required=True, help="directory written by tools/train_fashion_cnn.py")
    ap.add_argument("--data", type=Path, default=tfc.DATA_DIR)
    ap.add_argument("--limit", type=int, default=None, help="first N test images (default: all 10000)")
    ap.add_argument("--prune-limit", type=int, default=None,
                    help="evaluate the pruning rows (UDFC, L1, torch-pruning) on the first N test images only, "
                         "beside a float row on the same images (to fit a time budget)")
    ap.add_argument("--stages", nargs="+", choices=("core", "prune"), default=["core", "prune"],
                    help="core: float, w8a8, RTN rows; prune: UDFC and the pruning baselines (with their float row)")
    ap.add_argument("--models", nargs="+", default=None, help="subset of the model names")
    ap.add_argument("--prunes", type=float, nargs="+", default=[0.1, 0.3, 0.5])
    ap.add_argument("--bits", type=int, nargs="+", default=[8, 6, 4])
    ap.add_argument("--calib-batches", type=int, default=8)
    ap.add_argument("--calib-batch-size", type=int, default=32)
    ap.add_argument("--iters", type=int, default=20, help="ORT latency runs (batch 1), median")
    ap.add_argument("--threads", type=int, default=2, help="ORT intra-op threads for the latency column")
    ap.add_argument("--eval-threads", type=int, default=1,
                    help="torch / ORT threads for the accuracy runs (1 avoids thread thrashing on a shared machine)")
    ap.add_argument("--latency", choices=("ort", "all", "none"), default="ort",
                    help="ORT latency column for the rows evaluated in ORT (default), for every row (weight-only "
                         "rows exported only to be timed; slower), or none")
    ap.add_argument("--accuracy-in", choices=("ort", "torch"), default="ort",
                    help="where the weight-only rows' accuracy is computed: the exported model in ONNX Runtime CPU "
                         "(default; several times faster than torch on CPU for MobileNetV2) or the torch module "
                         "(the float reference row is always torch, the w8a8 rows always ORT)")
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="time budget: rows not started by then are listed as not run (the core rows of every "
                         "model come first, then the pruning rows)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.eval_threads)
    torch.manual_seed(0)
    t_start = time.time()
    xtr, _, xte, yte = tfc.load_fashion_mnist(args.data)
    if args.limit is not None:
        xte, yte = xte[:args.limit], yte[:args.limit]
    models = load_models(args.weights)
    if args.models:
        unknown = set(args.models) - set(models)
        if unknown:
            ap.error(f"unknown --models {sorted(unknown)}; choose from {sorted(models)}")
        models = {k: v for k, v in models.items() if k in args.models}
    metrics_file = args.weights / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    g = torch.Generator().manual_seed(0)
    calib_idx = torch.randperm(len(xtr), generator=g)[:args.calib_batches * args.calib_batch_size]
    cmd = shlex.join(["python", "tools/eval_fashion_cnn.py", *(sys.argv[1:] if argv is None else argv)])
    run = metrics.get("_run", {})
    trained = ", ".join(f"{k} {v['test_top1']:.2f}%" for k, v in metrics.items()
                        if isinstance(v, dict) and "test_top1" in v)
    import onnxruntime

    header = [(f"Generated by `PYTHONPATH=$PWD {cmd}` on {platform.machine()} CPU, torch {torch.__version__}, "
               f"onnxruntime {onnxruntime.__version__}."),
              (f"Test images: {len(xte)} of the 10000 Fashion-MNIST test images"
               + (" (**--limit**: a subset)" if len(xte) < 10000 else "") + f"; weights: `{args.weights}` "
               + (f"(trained by `{run['command']}` on {run['device']})" if run else
                  "(metrics.json has no command record)") + f"; accuracy recorded at training time: {trained}."),
              ("Accuracy from `torch`: the compressed nn.Module in torch; from `ORT CPU`: the `fxc.export_onnx` graph "
              "in onnxruntime (1 thread; weight-only rows: integer weights + DequantizeLinear; w8a8 rows: activation "
              "QDQ, checked to run QLinearConv, with ORT vs torch fake-quant accuracy on the first 1000 images in "
              "the note). delta: points vs the float torch row. params: Conv/Linear weights; "
              "MFLOPs: 2 x Conv/Linear MACs per image; ORT ms: batch 1, median of "
              f"{args.iters} runs, {args.threads} intra-op threads, exported graph (weight-only rows: "
              "`load_ort` dequantizes the integer conv weights once at load, so they run at fp32 speed). UDFC and its baselines use `skip=()` (the "
              "classifier is quantized too); torch-pruning prunes the producer convs UDFC pruned, same ratio."),
              "The machine is shared with other jobs: latencies are noisy, compare within a model."]
    evaluators: list[Evaluator] = []

    def write(done: bool) -> None:
        text = render(evaluators, header + [f"Wall time: {time.time() - t_start:.0f} s."], done)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)

    deadline = t_start + 60 * args.max_minutes if args.max_minutes else None
    with tempfile.TemporaryDirectory() as d:
        plan = []
        for name, (model, rgb) in models.items():
            size = 64 if rgb else 28
            if name in metrics and isinstance(metrics[name], dict):
                size = int(metrics[name].get("input_size", size))
            x = tfc.to_input(xte, size, rgb)
            calib = [tfc.to_input(xtr[calib_idx[i:i + args.calib_batch_size]], size, rgb).contiguous()
                     for i in range(0, len(calib_idx), args.calib_batch_size)]
            x1 = tfc.to_input(xtr[calib_idx[-1:]], size, rgb).contiguous()  # the example image: a training image
            ev = Evaluator(name, x, yte, x1, Path(d), iters=args.iters, threads=args.threads,
                           eval_threads=args.eval_threads, latency=args.latency,
                           on_row=lambda r: write(done=False), deadline=deadline, accuracy_in=args.accuracy_in)
            evaluators.append(ev)
            plan.append((ev, model, calib))
        kw = {"bits": tuple(args.bits), "prunes": tuple(args.prunes)}
        for ev, model, calib in plan:  # every model's core rows (the target) first
            if "core" in args.stages:
                run_rows(ev, model, calibration=calib, stage="core", **kw)
            elif args.prune_limit is None:  # pruning rows only: their float reference
                run_rows(ev, model, calibration=calib, stage="core", skip=("w8a8", "RTN", "DFQ"), **kw)
        for ev, model, calib in plan:
            if "prune" not in args.stages:
                break
            if args.prune_limit is not None and args.prune_limit < len(ev.x):
                # the pruning rows on a test subset, with their own float reference on the same images
                n = args.prune_limit
                sub = Evaluator(f"{ev.name} (first {n} test images)", ev.x[:n], ev.y[:n], ev.x1, ev.workdir,
                                iters=ev.iters, threads=ev.threads, eval_threads=ev.eval_threads, latency=ev.latency,
                                on_row=ev.on_row, deadline=ev.deadline, accuracy_in=ev.accuracy_in)
                evaluators.append(sub)
                run_rows(sub, model, calibration=calib, stage="core", skip=("w8a8", "RTN", "DFQ"), **kw)
                ev = sub
            run_rows(ev, model, calibration=calib, stage="prune", **kw)
    write(done=True)
    print("\n".join(target_lines(evaluators)))
    print(f"wrote {args.out} ({time.time() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
