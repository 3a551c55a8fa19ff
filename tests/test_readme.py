"""The README runs as written: every ```python block, and every `fxcompress ...` line of the ```bash blocks.

Each Python block runs in a fresh interpreter in its own temporary directory (CPU only). The CLI lines of each
bash block run in order in one temporary directory (later lines read what earlier ones wrote). A CLI line that
needs a GPU or a long training run says so with a trailing `# gpu` or `# long` comment and is skipped by that
marker only.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SKIP_MARKERS = ("# gpu", "# long")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.DOTALL | re.MULTILINE)


def _blocks(lang: str) -> list[tuple[int, str]]:
    text = README.read_text()
    return [(text[: m.start()].count("\n") + 1, m.group(2)) for m in FENCE.finditer(text) if m.group(1) == lang]


def _cli_lines(block: str) -> list[str]:
    return [ln.strip() for ln in block.splitlines() if ln.strip().startswith("fxcompress ")]


def _skipped(line: str) -> bool:
    return any(marker in line for marker in SKIP_MARKERS)


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _run(cmd: list[str], cwd: Path, what: str, timeout: int = 300) -> None:
    p = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        pytest.fail(f"{what} failed (exit {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")


PY_BLOCKS = _blocks("python")
BASH_BLOCKS = [(line, b) for line, b in _blocks("bash") if _cli_lines(b)]


def test_readme_has_blocks():
    assert len(PY_BLOCKS) >= 4 and len(BASH_BLOCKS) >= 3
    first = _blocks("bash")[0][1]
    assert "pip install -e '.[dev]'" in first and "--no-deps" in first and "fxcompress demo" in first


def test_ci_installs_as_the_readme_says():
    first = [ln.split("#")[0].strip() for ln in _blocks("bash")[0][1].splitlines() if ln.startswith("pip ")]
    ci = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert first and all(ln in ci for ln in first), first


@pytest.mark.parametrize("line,code", PY_BLOCKS, ids=[f"python-L{ln}" for ln, _ in PY_BLOCKS])
def test_python_block_runs(tmp_path, line, code):
    script = tmp_path / "block.py"
    script.write_text(code)
    _run([sys.executable, str(script)], tmp_path, f"README.md python block at line {line}")


@pytest.mark.parametrize("line,block", BASH_BLOCKS, ids=[f"bash-L{ln}" for ln, _ in BASH_BLOCKS])
def test_cli_lines_run(tmp_path, line, block):
    ran = 0
    for cmd in _cli_lines(block):
        if _skipped(cmd):
            continue
        argv = shlex.split(cmd, comments=True)
        _run([sys.executable, "-m", "fxcompress.cli", *argv[1:]], tmp_path, f"README.md line {cmd!r} (block at line {line})")
        ran += 1
    if ran == 0:
        pytest.skip("every CLI line of this block is marked # gpu or # long")
