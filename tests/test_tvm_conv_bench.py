"""tools/bench_cnn_gpu.py --dry-run (CPU, llvm): the table is written, the TVM int8 rows (fp16 activations, as on the
GPU) run and agree with torch, and a row that cannot run keeps its reason."""
import sys
from pathlib import Path

import pytest

pytest.importorskip("tvm")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import bench_cnn_gpu  # noqa: E402


def test_bench_cnn_gpu_dry_run(tmp_path):
    out = tmp_path / "cnn.md"
    rc = bench_cnn_gpu.main(["--dry-run", "--batches", "1", "--size", "16", "--out", str(out),
                             "--rows", "torch fp16 eager,torch fp16 compile,TVM int8 w8a8,TVM int8 weight-only"])
    assert rc == 0
    text = out.read_text()
    assert "NOT a GPU result" in text
    rows = {line.split("|")[2].strip(): line for line in text.splitlines() if line.startswith("| 1 |")}
    assert "not run: RuntimeError: skipped in --dry-run" in rows["torch fp16 compile"]
    tvm_row = rows["TVM int8 w8a8"].split("|")
    assert "20 convs: int8xint8" in tvm_row[7]
    assert float(tvm_row[6]) > 0.99  # cos of the int8 logits vs the fp32 model
    wo_row = rows["TVM int8 weight-only"].split("|")  # fp16 activations + BatchNorm (was a CallTIRRewrite error)
    assert "20 convs: weight_only_int8" in wo_row[7], wo_row
    assert float(wo_row[6]) > 0.999


def test_bench_cnn_gpu_rejects_unknown_rows(capsys):
    assert bench_cnn_gpu.main(["--dry-run", "--rows", "TVM int4"]) == 2
    assert "unknown --rows" in capsys.readouterr().err
