"""Hand-written quantized-linear kernels against MetaSchedule-tuned alternatives (``tune="meta_schedule"`` on CUDA).

For each distinct hand-kernel layer signature ``(rows, K, N, bits, group_size)`` of a build: the te fused
decode+matmul of that layer (the kernel dlight would otherwise schedule) is tuned standalone with MetaSchedule
(``trials`` trials; records in ``<records dir>/compete/``), then the hand-written kernel and the tuned kernel are
built alone and timed on the GPU in this process (``time_evaluator``, same inputs, L2-hot for both).  The hand
kernel is kept unless the tuned one measured at least ``MARGIN`` faster; the choice and both times are stored in
``<records dir>/fxc_choices.json`` and reused by later builds for the same target (no re-measuring).  Without a GPU
nothing is measured and the hand kernels stay.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .base import require_tvm

__all__ = ["compete_hand_kernels", "MARGIN"]

MARGIN = 0.97  # the tuned kernel must take < 97% of the hand kernel's time (timing noise is a few %)


def _signature(layer: dict) -> tuple:
    n, k = layer["shape"]
    gs = layer["group_size"] or k
    scale_rows = 1 if layer["granularity"] == "per_tensor" else n
    return (int(layer["rows"]), int(k), int(n), int(layer["bits"]), int(gs), layer["zero_point"] != "none", scale_rows)


def _weights(sig, rng):
    _, k, n, bits, gs, zp, srows = sig
    qmin = -(1 << (bits - 1))
    codes = rng.integers(qmin, 1 << (bits - 1), size=(n, k))
    scale = rng.uniform(0.005, 0.02, size=(srows, k // gs)).astype(np.float16)
    zero = rng.integers(-2, 3, size=(srows, k // gs)).astype(np.float16) if zp else None
    return codes, qmin, scale, zero


def _te_func(sig, codes, qmin, scale, zero, config):
    from tvm import relax

    from .emit import emit_packed_linear
    from .packing import pack_words

    rows, k, n, bits = sig[:4]
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((rows, k), "float16"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = emit_packed_linear(bb, x, pack_words(codes, bits, qmin), scale, zero, bits=bits, qmin=qmin,
                                   out_features=n, in_features=k, cuda=False, config=config)
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    mod = bb.get()
    import tvm

    (func,) = [f for f in mod.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
    return func.with_attr("global_symbol", "main")


def _hand_func(sig, kind, qmin, config):
    from .kernels.cuda_core_gemv import packed_gemv_primfunc, tile_for
    from .kernels.mma_batch import packed_mma_batch_primfunc
    from .kernels.mma_gemv import packed_mma_primfunc

    rows, k, n, bits, gs, zp, srows = sig
    common = dict(m=rows, k=k, n=n, qmin=qmin, group_size=gs, scale_rows=srows, has_zero_point=zp, has_bias=False,
                  bits=bits, name="main")
    if kind == "fxc_mma":
        return packed_mma_primfunc(**common, tiles=config.mma_tiles)
    if kind == "fxc_mma_batch":
        return packed_mma_batch_primfunc(**common, tiles=config.mma_batch_tiles)
    return packed_gemv_primfunc(**common, tile=tile_for(rows, k, n, config.tiles))


def _time_us(func, target, arrays) -> float:
    import tvm

    lib = tvm.compile(tvm.IRModule({"main": func}), target=target)
    lib = getattr(lib, "mod", lib)  # the runtime module of an Executable (time_evaluator lives there)
    dev = tvm.cuda(0)
    args = [tvm.runtime.tensor(a, dev) for a in arrays]
    lib["main"](*args)
    return float(lib.time_evaluator("main", dev, number=100, repeat=7)(*args).median * 1e6)


def compete_hand_kernels(layers: list[dict], target, records: Path, trials: int, config, tune_fn) -> tuple:
    """``(signatures whose tuned kernel won, stats)`` for the hand-kernel layers in ``layers`` (build info dicts).
    ``tune_fn(prim_func, log_dir, database)`` tunes one standalone workload."""
    tvm = require_tvm()
    from tvm.s_tir import meta_schedule as ms

    from .base import cuda_available
    from .emit import MMA_KINDS
    from .packing import pack_mma_words, pack_words

    hand = {}
    for layer in layers:
        if str(layer.get("kernel", "")).startswith("fxc_") and int(layer.get("rows", 0)) > 0:
            hand.setdefault(_signature(layer), layer["kernel"])
    if not hand:
        return frozenset(), {}
    path = records / "fxc_choices.json"
    choices = json.loads(path.read_text()) if path.is_file() else {}
    if not cuda_available():
        known = {s for s in hand if choices.get(repr(s), {}).get("winner") == "tuned"}
        return frozenset(s[:5] for s in known), {"compete": "no GPU to measure: stored choices only", "choices": choices}
    cdir = records / "compete"
    cdir.mkdir(parents=True, exist_ok=True)
    db = ms.database.JSONDatabase(path_workload=str(cdir / "database_workload.json"),
                                  path_tuning_record=str(cdir / "database_tuning_record.json"), allow_missing=True)
    rng = np.random.default_rng(0)
    for sig, kind in hand.items():
        if repr(sig) in choices:
            continue
        codes, qmin, scale, zero = _weights(sig, rng)
        te = _te_func(sig, codes, qmin, scale, zero, config)
        if trials > 0:
            tune_fn(te, cdir, db)
        sch = ms.tir_integration.compile_tir(db, te, target)
        rows, k, n, bits = sig[:4]
        x = (rng.standard_normal((rows, k)) * 0.5).astype(np.float16)
        y = np.zeros((rows, n), np.float16)
        extra = [zero] if zero is not None else []
        hand_words = pack_mma_words(codes, qmin, bits) if kind in MMA_KINDS else pack_words(codes, bits, qmin)
        hand_us = _time_us(_hand_func(sig, kind, qmin, config), target, [x, hand_words, scale, *extra, y])
        tuned_us = None
        if sch is not None:
            tuned_us = _time_us(sch.mod["main"].with_attr("global_symbol", "main"), target,
                                [x, pack_words(codes, bits, qmin), scale, *extra, y])
        winner = "tuned" if tuned_us is not None and tuned_us < MARGIN * hand_us else "hand"
        choices[repr(sig)] = {"kernel": kind, "hand_us": hand_us, "tuned_us": tuned_us, "winner": winner,
                              "target": str(target)}
    path.write_text(json.dumps(choices, indent=1, sort_keys=True) + "\n")
    won = frozenset(s[:5] for s in hand if choices[repr(s)]["winner"] == "tuned")
    del tvm
    return won, {"compete": "measured", "choices": {repr(s): choices[repr(s)] for s in hand}}
