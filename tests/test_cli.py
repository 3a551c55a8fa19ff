import subprocess
import sys

import pytest

from fxcompress.cli import main

SUBCOMMANDS = ["demo", "report", "quantize", "l4q", "udfc", "export", "bench", "doctor"]


@pytest.mark.parametrize("cmd", SUBCOMMANDS)
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    assert "usage: fxcompress" in capsys.readouterr().out


def test_demo_end_to_end(tmp_path, capsys):
    assert main(["demo", "--bits", "8", "--out", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    assert "layer1.0.conv1" in out and "quantized" in out and "RTN int8" in out
    assert main(["report", str(tmp_path / "d")]) == 0
    assert "layer2.1.conv2" in capsys.readouterr().out


def test_console_script_runs():
    r = subprocess.run([sys.executable, "-m", "fxcompress.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "demo" in r.stdout


def test_report_of_missing_dir(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "manifest.json is missing" in capsys.readouterr().err


def test_udfc_cli_single_merge_baseline(capsys):
    """`fxcompress udfc --merge single` runs the Neuron-Merging-style baseline through the same pass."""
    assert main(["udfc", "--prune", "0.3", "--bits", "6", "--merge", "single"]) == 0
    out = capsys.readouterr().out
    acc = float(out.split("UDFC (prune 0.3, 6-bit)")[1].split("%")[0])
    assert 90.0 < acc <= 100.0  # naive pruning at 30% gives ~35% on this model
