"""The package layout: dependencies point one way (quant <- nn <- passes <- runtime <- backends <- lm <- cli),
there is no import cycle, nothing below the CLI imports argparse, and ``import fxcompress`` / ``fxcompress --help``
load no backend library.  Imports are read from the source with ``ast`` (those inside functions included)."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "fxcompress"
LAYERS = ["quant", "nn", "passes", "runtime", "backends", "lm", "cli"]
# modules outside the named layers, placed in the layer whose imports they may use
PLACED = {"data": "quant", "models": "nn", "capture": "passes", "finetune": "passes", "distributed": "passes", "compile_backend": "backends",
          "doctor": "cli", "cli": "cli", "__init__": "cli", "__main__": "cli"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _layer(mod: str) -> int:
    parts = mod.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    name = top if top in LAYERS else PLACED.get(top)
    assert name is not None, f"{mod}: place fxcompress.{top} in a layer (tests/test_layout.py PLACED)"
    return LAYERS.index(name)


def _imports(mod: str) -> set[str]:
    """fxcompress modules that ``mod`` imports, anywhere in its source."""
    path = MODULES[mod]
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.split(".")
                base = base if is_pkg else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                root = ".".join(base + ([node.module] if node.module else []))
            else:
                root = node.module or ""
            names = [f"{root}.{a.name}" if f"{root}.{a.name}" in MODULES else root for a in node.names]
        else:
            continue
        out.update(n for n in names if n == "fxcompress" or n.startswith("fxcompress."))
    return {n if n in MODULES else n.rsplit(".", 1)[0] for n in out} - {mod}


GRAPH = {m: _imports(m) for m in MODULES}


@pytest.mark.parametrize("mod", sorted(MODULES))
def test_dependencies_point_down(mod):
    """A module imports only from its own layer or the layers below it (DESIGN: quant <- nn <- passes <- runtime
    <- backends <- lm <- cli)."""
    up = sorted(t for t in GRAPH[mod] if _layer(t) > _layer(mod))
    assert not up, f"{mod} ({LAYERS[_layer(mod)]}) imports {up} from a layer above it"


def test_no_import_cycles():
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(GRAPH.get(m, ())):
            if t.startswith(m + "."):  # a package re-exporting its own submodules is not a cycle
                continue
            if state.get(t) == 1 and not m.startswith(t + "."):
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)


def test_argparse_only_in_the_cli():
    users = sorted(m for m, p in MODULES.items() if "argparse" in {
        a.name for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.Import) for a in n.names}
        | {n.module for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.ImportFrom)})
    assert users == ["fxcompress.cli"], users


def _fresh(code: str) -> str:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


HEAVY = ("torch", "tvm", "tvm_ffi", "onnx", "onnxruntime", "onnxscript", "transformers")


def test_import_fxcompress_loads_no_backend():
    loaded = _fresh(f"import sys, fxcompress; print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    assert loaded == "[]", loaded


def test_help_loads_no_backend():
    code = (f"import sys, contextlib, io\nfrom fxcompress.cli import main\nwith contextlib.redirect_stdout(io.StringIO()):\n"
            f"    try:\n        main(['--help'])\n    except SystemExit:\n        pass\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    assert _fresh(code) == "[]"


def test_lazy_names_resolve():
    """Every public name in the lazy table resolves to the object of its module (and fxc.capture stays the
    function after the submodule fxcompress.capture is imported)."""
    import fxcompress as fxc
    import fxcompress.capture  # noqa: F401

    for name in fxc._LAZY:
        assert getattr(fxc, name) is not None
    assert callable(fxc.capture) and fxc.capture.__module__ == "fxcompress.capture"
