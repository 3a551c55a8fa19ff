"""The timing helpers and the --dry-run (CPU) paths of the GPU benches that measure fused / int4 models."""
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))

import gpu_timing


def test_spread_timing_and_cpu_path():
    s = gpu_timing.Spread.of([3.0, 1.0, 2.0])
    assert (s.median, s.lo, s.hi) == (2.0, 1.0, 3.0) and str(s) == "2.00 (1.00-3.00)"
    calls = []
    t = gpu_timing.time_cold_hot(lambda: calls.append(1), reps=2, calls=3, hot_iters=4, warmup=1, cuda=False)
    assert len(calls) == 1 + 1 + 2 * (3 + 4) and "dry run" in t.method
    fast = gpu_timing.Timing(gpu_timing.Spread(1.0, 1.0, 1.0), s, "x")
    slow = gpu_timing.Timing(gpu_timing.Spread(4.0, 4.0, 4.0), s, "x")
    assert fast.ratio_to(slow) == 4.0
    with pytest.raises(ValueError, match="flush= or rotate="):
        gpu_timing.time_cold_hot(lambda: None, cuda=True)
    assert gpu_timing.copies_to_defeat_l2(10**12) == 2 and gpu_timing.copies_to_defeat_l2(1, cap=8) == 8


def test_bench_ort_dry_run_has_fused_decode_row(tmp_path):
    import bench_ort_gpu

    out = tmp_path / "ort.md"
    assert bench_ort_gpu.main(["--dry-run", "--out", str(out)]) == 0
    text = out.read_text()
    assert "DRY RUN" in text and "MatMulNBits nodes: int4 15, fused 9" in text  # 2 layers: 7 -> 4 each, + head
    rows = {r.split(" | ")[1]: r.split(" | ") for r in text.splitlines() if r.startswith("| CausalLM")}
    assert set(rows) == {"fp16", "int4", "int4 fused"}
    assert float(rows["int4"][8]) == pytest.approx(float(rows["int4 fused"][8]), rel=1e-3, abs=1e-6)  # fused == plain
    layers = {r.split(" | ")[1]: r.split(" | ") for r in text.splitlines() if r.startswith("| linear")}
    assert set(layers) == {"fp16", "int4", "int8", "int8 qdq"}  # the int8 default (MatMulNBits 8-bit) beside QDQ
    assert all(float(r[8]) < 2e-2 for r in layers.values())  # each format computes its own weight's product


def test_bench_gemv_dry_run_peers_agree(tmp_path):
    import bench_gemv

    out = tmp_path / "gemv.md"
    assert bench_gemv.main(["--dry-run", "--out", str(out), "--peers", "torch_fp16,tinygemm"]) == 0
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| 256x512")]
    assert len(rows) == 2 and "wrong output" not in text  # TVM and tinygemm (CPU twin) match the reference
    assert all(float(r.split(" | ")[17]) < 1e-2 for r in rows)
    assert bench_gemv.target(8192, 8192, 1, 4) == 3.3 and bench_gemv.target(4096, 11008, 16, 4) is None
    assert all(r.split(" | ")[8] != "-" for r in rows)  # tinygemm ran (torch's CPU twin of the CUDA op)
