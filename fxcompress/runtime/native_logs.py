"""Filter the log lines that native libraries write straight to file descriptor 2.

TVM 0.27's VM executable logs every memory scope it serializes or reads back (``LOG(WARNING) << "Scope
Saving:"`` / ``"Scope Loaded:"`` in ``src/runtime/vm/executable.cc``), about 50 lines per build or load, from
C++: Python's ``sys.stderr`` never sees them, so they are filtered at the file-descriptor level.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile

TVM_NOISE = re.compile(r"Scope (Saving|Loaded):")


@contextlib.contextmanager
def drop_native_stderr(pattern: re.Pattern = TVM_NOISE):
    """Within the block, lines written to fd 2 that match ``pattern`` are dropped; the others are written to
    stderr when the block ends (in order).  A no-op where fd 2 cannot be duplicated."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # pragma: no cover - no real fd 2 (embedded interpreters)
        yield
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = [ln for ln in tmp.read().decode(errors="replace").splitlines(keepends=True)
                    if not pattern.search(ln)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()
