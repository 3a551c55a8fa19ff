"""tools/eval_fashion_cnn.py: the row functions on a tiny random-weight CNN and a few random images (not the
real Fashion-MNIST weights): the table is produced, a failing pass keeps its reason, and every row's accuracy
comes from the same measurement as the float row."""
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import fxcompress as fxc

_spec = importlib.util.spec_from_file_location("eval_fashion_cnn",
                                               Path(__file__).resolve().parents[1] / "tools" / "eval_fashion_cnn.py")
efc = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("eval_fashion_cnn", efc)  # dataclasses look their module up there
_spec.loader.exec_module(efc)


class TinyNet(nn.Module):
    """conv-BN-ReLU stem, one residual block (conv-BN-ReLU-conv-BN + identity), pooled linear head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 16, 3, 2, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 16, 3, 1, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(16)
        self.conv4 = nn.Conv2d(16, 16, 3, 1, 1, bias=False)
        self.bn4 = nn.BatchNorm2d(16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))
        y = self.bn4(self.conv4(self.relu(self.bn3(self.conv3(x)))))
        return self.fc(torch.flatten(self.pool(self.relu(x + y)), 1))


@pytest.fixture(scope="module")
def tiny():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convs: threads only add contention on a shared 2-core machine
    torch.manual_seed(0)
    model = TinyNet()
    x = torch.randn(48, 1, 12, 12)
    model.train()
    with torch.no_grad():  # real BN statistics (from these images) instead of the init's 0 / 1
        for _ in range(3):
            model(x)
    model.eval()
    with torch.no_grad():  # labels the float model mostly gets right, so accuracy differences are visible
        y = model(x).argmax(1)
        y[::4] = (y[::4] + 1) % 10
    yield model, x, y
    torch.set_num_threads(threads)


def _direct_accuracy(model, x, y) -> float:
    with torch.no_grad():
        return 100.0 * float((model.eval()(x).argmax(1) == y).float().mean())


def test_rows_and_table(tiny, tmp_path):
    model, x, y = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ev = efc.Evaluator("tiny", x, y, x[:1], tmp_path, iters=2)
    rows = efc.run_rows(ev, model, bits=(8, 4), prunes=(0.5,), calibration=[x[:16], x[16:32]],
                        skip=("torch-pruning",))
    by = {(r.method, r.runtime, r.prune, r.wbits): r for r in rows}
    # float row: the same number as a plain torch evaluation, and ORT fp32 agrees with it
    flt = by[("float", "torch", 0.0, None)]
    assert flt.acc == pytest.approx(_direct_accuracy(model, x, y), abs=1e-9) == ev.float_acc == 75.0
    assert by[("float", "ORT CPU", 0.0, None)].acc == pytest.approx(flt.acc, abs=100 / len(x) + 1e-9)
    # quantized rows: accuracy computed by the same function on the compressed module
    for bits in (8, 4):
        assert by[("RTN per channel", "torch", 0.0, bits)].acc == pytest.approx(
            _direct_accuracy(efc.rtn(model, x[:1], bits), x, y), abs=1e-9)
    udfc = by[("UDFC", "torch", 0.5, 4)]
    assert udfc.acc == pytest.approx(_direct_accuracy(efc.udfc(model, x[:1], 0.5, 4), x, y), abs=1e-9)
    assert udfc.params < flt.params and udfc.flops < flt.flops and "pruned" in udfc.note
    # integer activations: ORT runs QLinearConv; its accuracy is the ORT model's, beside torch fake-quant
    for method in ("w8a8 bn ranges (data-free)", "w8a8 calibrated ranges"):
        r = by[(method, "ORT CPU", 0.0, 8)]
        assert r.abits == 8 and "QLinearConv" in r.note and "failed" not in r.note, r.note
        assert r.latency_ms is not None and r.latency_ms > 0  # rows evaluated in ORT are timed
        q, _ = efc.quantize_wa(model, x[:1], "bn" if "bn" in method else "calibrate", [x[:16], x[16:32]])
        assert abs(r.acc - _direct_accuracy(q, x, y)) <= 100 * 3 / len(x)  # ORT vs torch fake-quant: <= 3 images
    assert by[("RTN per channel", "torch", 0.0, 8)].latency_ms is None  # latency="ort": torch rows are not timed
    # accuracy_in="ort": a weight-only row measured on the exported model, the same function as the ORT float row
    ev_ort = efc.Evaluator("tiny", x, y, x[:1], tmp_path, iters=2, accuracy_in="ort")
    r = ev_ort.add("RTN per channel", lambda: efc.rtn(model, x[:1], 4), wbits=4)
    path = fxc.export_onnx(efc.rtn(model, x[:1], 4), (x[:1],), tmp_path / "rtn4.onnx", low_bit_container="int8")
    from fxcompress.runtime.ort import load_ort
    assert r.runtime == "ORT CPU" and r.latency_ms > 0
    assert r.acc == efc.accuracy_ort(load_ort(path, intra_op_num_threads=1), x, y)
    assert abs(r.acc - by[("RTN per channel", "torch", 0.0, 4)].acc) <= 100 * 2 / len(x)
    assert not any("failed" in r.note for r in rows), [r.note for r in rows]
    assert any(r.method.startswith("DFQ") and r.acc is not None for r in rows)
    text = efc.render([ev], ["header line"])
    assert "| tiny | float | 0% | fp32 | fp32 | torch | 75.00 | +0.00 |" in text
    assert "within 1 point of float" in text and ("holds" in text or "MISSED" in text)
    assert text.count("| tiny |") == len(rows)
    # the float model was not modified by any pass
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_uncompensated_rows_do_not_depend_on_the_correlation_model(tiny):
    """rtn / l1_prune_rtn use correlation="independent" (cheap): without compensation it only feeds the report."""
    model, x, _ = tiny
    cfg = fxc.UDFCConfig(prune=False, compensate=False, weight_bits=4, skip=(), correlation="weights")
    ref = fxc.udfc(model, (x[:1],), cfg).state_dict()
    assert all(torch.equal(ref[k], v) for k, v in efc.rtn(model, x[:1], 4).state_dict().items())
    cfg = fxc.UDFCConfig(prune_ratio=0.5, weight_bits=4, skip=(), criterion="l1", compensate=False,
                         correlation="weights")
    ref = fxc.udfc(model, (x[:1],), cfg).state_dict()
    got = efc.l1_prune_rtn(model, x[:1], 0.5, 4).state_dict()
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)


def test_params_flops_by_hand(tiny):
    model, x, _ = tiny
    n, flops = efc.params_and_flops(model, x[:1])
    assert n == 8 * 9 + 16 * 8 * 9 + 2 * 16 * 16 * 9 + 16 * 10
    macs = 12 * 12 * 8 * 9 + 6 * 6 * 16 * (8 * 9) + 2 * 6 * 6 * 16 * (16 * 9) + 10 * 16
    assert flops == 2 * macs


def test_failing_row_keeps_reason(tiny, tmp_path):
    model, x, y = tiny
    ev = efc.Evaluator("tiny", x, y, x[:1], tmp_path, latency="none")

    def nothing():
        raise fxc.NothingToCompressError("udfc: no prunable layer")

    r = ev.add("UDFC", nothing, prune=0.3, wbits=8)
    assert r.acc is None and r.note == "failed: NothingToCompressError: udfc: no prunable layer"
    assert "| - |" in efc.render([ev], [])
    # a w8a8 row whose graph has no QLinearConv (activations left float) fails with that reason
    r = ev.add("w8a8 bn ranges (data-free)", lambda: efc.rtn(model, x[:1], 8), wbits=8, abits=8,
               ort_accuracy=True, require_qlinear=True)
    assert r.acc is None and "no QLinearConv" in r.note
    assert not math.isnan(efc.accuracy_torch(model, x, y))


def test_stages_and_time_budget(tiny, tmp_path):
    model, x, y = tiny
    ev = efc.Evaluator("tiny", x, y, x[:1], tmp_path, latency="none", deadline=0.0)  # budget already spent
    with pytest.raises(ValueError, match="core rows"):
        efc.run_rows(ev, model, stage="prune")
    with pytest.raises(ValueError, match="Evaluator.latency"):
        efc.Evaluator("tiny", x, y, x[:1], tmp_path, latency=False)
    with pytest.raises(ValueError, match="Evaluator.accuracy_in"):
        efc.Evaluator("tiny", x, y, x[:1], tmp_path, accuracy_in="tvm")
    with pytest.raises(ValueError, match="stage must be"):
        efc.run_rows(ev, model, stage="everything")
    rows = efc.run_rows(ev, model, bits=(8,), prunes=(0.3,), stage="core")
    assert [r.method for r in rows[:3]] == ["float", "float", "w8a8 bn ranges (data-free)"]
    assert all(r.acc is None and "time budget" in r.note for r in rows if r.method != "DFQ")
