"""Where a generated token's time goes: the TVM int4 decode loop of tools/bench_generate.py, taken apart.

    PYTHONPATH=/tmp/gpu-site:$PWD python3 tools/profile_generate.py                 # H100: wide model, int4 g128
    python tools/profile_generate.py --device cpu --tiny                            # smoke run (LLVM, tiny model)

The model, quantization and ``compile_lm(..., backend="tvm", dtype=fp16)`` call are the bench's.  Four views of
the same decode loop (batch 1, after a ``--prompt-len`` prefill):

1. **end to end**: ``lm.generate`` ms/token, as the bench reports it;
2. **the loop, phase by phase** (a device sync after each phase, so each is charged what it costs): the next
   token picked where the logits are, the step queued (``TVMSteps.decode``: ids / position into the step's
   input buffers, then the CUDA-graph replay or the VM call), the wait for the GPU;
3. **the step alone**: ``decode()`` timed between CUDA events, back to back (hot) and after an L2 flush (cold);
4. **kernels** (GPU): torch.profiler (CUPTI sees TVM's kernels, CUDA-graph replays included) over ``--tokens``
   decode steps: launches and µs per token by kernel name, and the host-side CUDA API calls.

Writes ``tools/results/generate_profile.md`` (``--out``).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_generate import LM_HEAD_BITS, head_label, int4, load_model, time_generate  # noqa: E402
from fxcompress.lm import compile_lm  # noqa: E402
from fxcompress.lm.sampling import pick_next  # noqa: E402


def _sync(cuda: bool):
    if cuda:
        torch.cuda.synchronize()


def phase_times(lm, ids, tokens: int, cuda: bool) -> dict:
    """Median µs per decode token of each phase of the generation loop, a device sync after each."""
    from fxcompress.lm.sampling import _prefill

    st = lm.steps
    st.reset()
    logits = _prefill(st, ids, lm.spec.prefill_chunk)
    p = ids.shape[1]
    acc = {k: [] for k in ("pick the token (argmax where the logits are)", "queue the step (decode(): inputs + "
                           "graph replay or VM call)", "wait for the GPU")}
    for i in range(tokens):
        t0 = time.perf_counter()
        nxt = pick_next(logits, 0.0, None, None)
        _sync(cuda)
        t1 = time.perf_counter()
        logits = st.decode(nxt, p + i)
        t2 = time.perf_counter()
        _sync(cuda)
        t3 = time.perf_counter()
        for k, v in zip(acc, (t1 - t0, t2 - t1, t3 - t2)):
            acc[k].append(v * 1e6)
    return {k: statistics.median(v) for k, v in acc.items()}


def step_times(lm, ids, calls: int, cuda: bool) -> tuple[float, float | None]:
    """(hot µs, cold µs) of the decode step alone, ``decode()`` at one position (cold: an L2 flush before each
    call; GPU only)."""
    st = lm.steps
    st.reset()
    nxt = ids[:, 0]
    for _ in range(3):
        st.decode(nxt, 0)
    _sync(cuda)
    if not cuda:
        t = time.perf_counter()
        for _ in range(calls):
            st.decode(nxt, 0)
        return (time.perf_counter() - t) / calls * 1e6, None
    from gpu_timing import L2Flush

    flush = L2Flush()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(calls):
        st.decode(nxt, 0)
    e.record()
    torch.cuda.synchronize()
    hot = s.elapsed_time(e) * 1e3 / calls
    cold = []
    for _ in range(calls):
        flush()
        s.record()
        st.decode(nxt, 0)
        e.record()
        torch.cuda.synchronize()
        cold.append(s.elapsed_time(e) * 1e3)
    return hot, statistics.median(cold)


def kernel_table(lm, ids, tokens: int) -> tuple[list, list, float]:
    """([(kernel, launches/token, µs/token)], [(CUDA API call, calls/token, host µs/token)], kernel µs/token)."""
    from torch.profiler import ProfilerActivity, profile

    lm.generate(ids, max_new_tokens=4)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        phase_times(lm, ids, tokens, True)
    kern: dict[str, list] = {}
    api: dict[str, list] = {}
    for ev in prof.events():
        dt = str(getattr(ev, "device_type", ""))
        dur = ev.time_range.end - ev.time_range.start
        if dt.endswith("CUDA"):
            kern.setdefault(ev.name, []).append(dur)
        elif ev.name.startswith(("cuda", "cu")) and not ev.name.startswith("cudaLaunchKernel"):
            api.setdefault(ev.name, []).append(dur)
        elif ev.name.startswith("cudaLaunchKernel"):
            api.setdefault(ev.name, []).append(dur)
    # the profiled loop also ran its prefill (one call): per token = total / tokens, an upper bound for the decode
    rows = sorted(((k, len(v) / tokens, sum(v) / tokens) for k, v in kern.items()), key=lambda r: -r[2])
    apis = sorted(((k, len(v) / tokens, sum(v) / tokens) for k, v in api.items()), key=lambda r: -r[2])
    return rows, apis, sum(r[2] for r in rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="a small random model (smoke run)")
    ap.add_argument("--model", default="wide", choices=["wide", "smollm2", "tiny"])
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--lm-head-bits", type=int, default=None, choices=LM_HEAD_BITS,
                    help="quantize the lm_head too (8: int8 per channel; 4: int4 per group)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=64, help="decode tokens per measurement")
    ap.add_argument("--max-seq-len", type=int, default=384, help="the static cache (the bench: prompt + 256)")
    ap.add_argument("--no-cuda-graph", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    cuda = a.device == "cuda"
    if a.tiny:
        a.model, a.prompt_len, a.tokens, a.max_seq_len, a.group = "tiny", 12, 8, 32, 64
    if cuda and not torch.cuda.is_available():
        print("no CUDA GPU visible; use --device cpu --tiny for a smoke run", file=sys.stderr)
        return 2
    t0 = time.time()
    model = load_model(a.model)
    q = int4(model, a.group, a.lm_head_bits)
    chunk = min(128, a.prompt_len)
    lm = compile_lm(q, "tvm", device=a.device, max_seq_len=a.max_seq_len, dtype=torch.float16 if cuda else None,
                    prefill_chunk=chunk, cuda_graph=not a.no_cuda_graph)
    tb = time.time() - t0
    ids = torch.randint(0, model.config.vocab_size, (1, a.prompt_len), generator=torch.Generator().manual_seed(0))
    new = min(a.tokens, a.max_seq_len - a.prompt_len)
    _, ttft, ms = time_generate(lm, ids, new)
    phases = phase_times(lm, ids, new - 1, cuda)
    hot, cold = step_times(lm, ids, 50 if cuda else 5, cuda)
    dev = torch.cuda.get_device_name() if cuda else "cpu (LLVM; smoke run, not a GPU figure)"
    argv_s = " ".join(argv if argv is not None else sys.argv[1:])
    lines = [f"# Where a generated token's time goes: TVM int4 decode loop ({dev})", "",
             f"`python tools/profile_generate.py {argv_s}`; model {a.model}, int4 g{a.group} RTN asymmetric "
             f"(lm_head {head_label(a.lm_head_bits, a.group)}), compile_lm(backend='tvm', dtype={'fp16' if cuda else 'fp32'}, cuda_graph="
             f"{not a.no_cuda_graph}), static cache {a.max_seq_len}, prompt {a.prompt_len}, {new} new tokens; "
             f"build {tb:.0f} s; decode CUDA graph: {lm.steps.graph_status}.", "",
             f"1. End to end (`lm.generate`): TTFT {ttft:.1f} ms, decode **{ms * 1e3:.1f} µs/token**.", "",
             "2. The loop, phase by phase (median µs per token, a device sync after each phase):", "",
             "| phase | µs / token |", "|---|---:|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in phases.items()]
    lines += [f"| sum | {sum(phases.values()):.1f} |", "",
              f"3. The decode step alone (decode(), 50 calls): hot {hot:.1f} µs"
              + (f", cold (L2 flushed before each) {cold:.1f} µs." if cold is not None else "."), ""]
    if cuda:
        rows, apis, ksum = kernel_table(lm, ids, new - 1)
        lines += [f"4. Kernels (torch.profiler over {new - 1} decode tokens; the profiled loop's prefill is included "
                  f"in the totals, divided over the tokens): {ksum:.1f} µs of kernel time per token.", "",
                  "| kernel | launches / token | µs / token |", "|---|---:|---:|"]
        lines += [f"| `{k[:100]}` | {n:.1f} | {us:.1f} |" for k, n, us in rows[:40]]
        lines += ["", "Host-side CUDA API calls (µs of host time per token):", "",
                  "| call | calls / token | µs / token |", "|---|---:|---:|"]
        lines += [f"| `{k[:80]}` | {n:.1f} | {us:.1f} |" for k, n, us in apis[:15]]
    lines.append(f"\nTotal {time.time() - t0:.0f} s.")
    text = "\n".join(lines)
    print(text)
    out = a.out or ("tools/results/generate_profile.md" if cuda else "/tmp/generate_profile_cpu.md")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
