"""`fxcompress generate` streams text and prints time to first token and tokens/s; the GPU benchmark parses."""
import subprocess
import sys
from pathlib import Path

from fxcompress import cli

ROOT = Path(__file__).resolve().parents[2]


def test_generate_tiny_streams_and_reports_speed(capsys, tmp_path):
    rc = cli.main(["generate", "--model", "tiny", "--backend", "torch", "--prompt", "Hello", "--max-new-tokens", "6",
                   "--max-seq-len", "32", "--prefill-chunk", "4", "--save", str(tmp_path / "lm")])
    out = capsys.readouterr().out
    assert rc == 0 and out.startswith("Hello")
    assert "6 new; time to first token" in out and "tokens/s" in out
    rc = cli.main(["generate", "--artifact", str(tmp_path / "lm"), "--tokenizer", "bytes", "--prompt", "Hello",
                   "--max-new-tokens", "6"])
    assert rc == 0 and "[torch cpu] prompt 5 tokens, 6 new" in capsys.readouterr().out


def test_generate_past_max_seq_len_is_an_error(capsys):
    rc = cli.main(["generate", "--model", "tiny", "--backend", "torch", "--prompt", "Hello", "--max-new-tokens", "40",
                   "--max-seq-len", "32", "--prefill-chunk", "4"])
    assert rc == 2 and "exceeds max_seq_len=32" in capsys.readouterr().err


def test_bench_generate_help():
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_generate.py"), "--help"], capture_output=True,
                       text=True, timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0 and "--tiny" in r.stdout
