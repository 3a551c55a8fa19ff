"""fxcompress/runtime/runner.py: one loader table (load_runner), register_backend, benchmark's argument checks,
and progress bars only on a terminal (runtime/progress.py)."""
import io
import sys

import pytest
import torch
from torch import nn

import fxcompress as fxc
from fxcompress.runtime import Runner, backends, benchmark, check_parity, load_runner, register_backend
from fxcompress.runtime import runner as runner_mod


class _Echo(Runner):
    backend = "echo"

    def __init__(self, path, device):
        super().__init__(device, ["x"], ["y"])
        self.path = path

    def run(self, *inputs):
        return [inputs[0] * 2]


def test_builtin_backends_are_one_table():
    assert {"ort", "tvm"} <= set(backends())
    assert runner_mod._BUILTIN["tvm"] == ("fxcompress.runtime.tvm_runner", "load_tvm")


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match=r"backend must be one of .*'ort'.*'tvm'.*got 'nope'"):
        load_runner("m.onnx", backend="nope")


def test_register_backend_and_parity(monkeypatch):
    monkeypatch.setattr(runner_mod, "_LOADERS", dict(runner_mod._LOADERS))
    register_backend("echo", lambda path, device="cpu", **kw: _Echo(path, device))
    r = load_runner("anything", backend="echo", device="cpu")
    assert isinstance(r, _Echo) and r.path == "anything" and "echo" in backends()

    class Twice(nn.Module):
        def forward(self, x):
            return x * 2

    x = torch.randn(3, 4)
    assert check_parity(Twice(), r, (x,)).ok(0.0, 0.0)


def test_ort_runner_through_load_runner(tmp_path):
    x = torch.randn(2, 16)
    gm = fxc.quantize_rtn(fxc.capture(nn.Sequential(nn.Linear(16, 8)), (x,)), fxc.RTNConfig(bits=8))
    r = load_runner(fxc.export_onnx(gm, (x,), tmp_path / "m.onnx", accuracy_level=0), backend="ort")  # fp32 compute
    assert check_parity(gm, r, (x,)).ok(1e-5, 1e-5)
    stats = benchmark(r, (x,), warmup=0, iters=2)
    assert stats["iters"] == 2 and stats["median_ms"] > 0


@pytest.mark.parametrize("kw,match", [(dict(iters=0), "iters >= 1"), (dict(warmup=-1), "warmup >= 0")])
def test_benchmark_needs_runs(kw, match):
    with pytest.raises(ValueError, match=match):
        benchmark(lambda x: x, (torch.ones(1),), **kw)


class _TTY(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_only_on_a_terminal(monkeypatch):
    from fxcompress.runtime.progress import Steps, bar, progress_enabled

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert not progress_enabled()
    assert list(bar(range(3))) == [0, 1, 2]
    tty = _TTY()
    monkeypatch.setattr(sys, "stderr", tty)
    assert progress_enabled() and not progress_enabled(False)
    with Steps(["import", "compile"], "TVM build") as s:
        s.next()
        s.next()
    assert "TVM build" in tty.getvalue()
