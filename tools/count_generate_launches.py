"""Kernel launches of the cached TVM decode step that generation runs, per layer (CPU; needs nvcc).

    PYTHONPATH=$PWD python tools/count_generate_launches.py            # writes tools/results/generate_launches.md

The decode step is built as ``compile_lm(model, backend="tvm", device="cuda", dtype=torch.float16)`` builds it
(``fxcompress.lm.tvm_steps.build_steps_tvm``): the 4-layer 2048-wide model of tools/bench_generate.py, int4 RTN
g128 (lm_head fp16), cached steps over ``--max-seq-len`` slots, q/k/v and gate/up fused, caches donated (written
in place), each attention one fused kernel that also writes the caches (``with_fused_decode_attention``), the
backend's default ``TVMBuildConfig`` (fused epilogues).  A launch is one CUDA kernel of a
``call_tir`` / ``call_tir_inplace`` in the scheduled module (reshape-like calls are views and launch nothing);
rows are grouped per layer as in tools/profile_decode_gpu.py.  On the GPU the step runs as one CUDA graph
(tools/profile_generate.py times it).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_generate import LM_HEAD_BITS, head_label, int4, load_model  # noqa: E402
from profile_decode_gpu import describe, launch_list, per_layer  # noqa: E402

from fxcompress.backends.tvm import build_tvm  # noqa: E402
from fxcompress.lm.attention import with_fused_decode_attention  # noqa: E402
from fxcompress.lm.compiled import _fuse_linears  # noqa: E402
from fxcompress.lm.steps import build_steps, example_inputs  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="wide", choices=["wide", "smollm2", "tiny"])
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--lm-head-bits", type=int, default=None, choices=LM_HEAD_BITS,
                    help="quantize the lm_head too (8: int8 per channel; 4: int4 per group)")
    ap.add_argument("--max-seq-len", type=int, default=384)
    ap.add_argument("--out", default="tools/results/generate_launches.md")
    a = ap.parse_args(argv)
    t0 = time.time()
    q = int4(load_model(a.model), a.group, a.lm_head_bits)
    _, dec, spec = build_steps(q, batch=1, max_seq_len=a.max_seq_len, prefill_chunk=min(64, a.max_seq_len),
                               dtype=torch.float16)
    dec = _fuse_linears({"decode": dec}, spec)["decode"]
    dec, _ = with_fused_decode_attention(dec, spec.input_names[2:])  # as build_steps_tvm does
    b = build_tvm(dec, example_inputs(spec, 1), target="cuda", dtype=torch.float16, donate=spec.input_names[2:])
    launches = launch_list(b)
    groups = per_layer(launches, [layer["name"] for layer in b.info["layers"]])
    counts = [sum(k for _, _, k in g) for lab, g in groups if lab.startswith("layer")]
    mid = counts[1] if len(counts) > 2 else counts[-1]
    total = sum(k for _, k in launches)
    argv_s = " ".join(argv if argv is not None else sys.argv[1:])
    lines = [f"# Kernel launches of the cached TVM decode step (generation), {a.model} model", "",
             f"`PYTHONPATH=$PWD python tools/count_generate_launches.py{' ' + argv_s if argv_s else ''}`; built on the CPU with nvcc "
             f"({time.time() - t0:.0f} s); int4 RTN g{a.group} (lm_head {head_label(a.lm_head_bits, a.group)}), cache {a.max_seq_len} slots, fp16.", "",
             f"**{total} launches per decode step; per layer {counts} (a middle layer: {mid}; issue 13 target "
             "<= 8).**", "", "| # | layer | kernel (PrimFunc) | launches | what it does |", "|---|---|---|---|---|"]
    for lab, g in groups:
        for i, name, k in g:
            what = ("KV-cache write in place (donated cache)" if name.startswith("fxc_kv_write") else
                    "attention, split over the slots: K/V cache write in place + each split's partial softmax state"
                    if name.startswith("fxc_decode_attention_split") else
                    "attention: merges the splits' partial states (rescaled by exp(m_i - max m)), writes the output"
                    if name.startswith("fxc_decode_attention_combine") else
                    "attention: K/V cache write in place + scores, softmax, P.V (one kernel)"
                    if name.startswith("fxc_decode_attention") else describe(name))
            lines.append(f"| {i} | {lab} | `{name[:90]}` | {k} | {what} |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
