"""Progress bars for long jobs (training, UDFC, TVM builds): tqdm on stderr, only when stderr is a terminal."""
from __future__ import annotations

import sys


def progress_enabled(requested: bool = True) -> bool:
    """A bar is drawn when asked for and stderr is a TTY (never in logs, pipes or tests)."""
    return bool(requested) and hasattr(sys.stderr, "isatty") and sys.stderr.isatty()


def bar(iterable=None, *, total: int | None = None, desc: str = "", enabled: bool = True):
    """``tqdm(iterable)`` on stderr when :func:`progress_enabled`, else the iterable itself (or a no-op bar)."""
    if progress_enabled(enabled):
        try:
            from tqdm.auto import tqdm
        except ImportError:  # pragma: no cover - tqdm is a dependency of transformers / huggingface-hub
            pass
        else:
            return tqdm(iterable, total=total, desc=desc, file=sys.stderr, leave=False)
    return _NoBar(iterable)


class _NoBar:
    def __init__(self, iterable=None):
        self._it = iterable

    def __iter__(self):
        return iter(self._it if self._it is not None else ())

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass


class Steps:
    """A bar over named stages: ``with Steps(["import", "build"], "TVM build") as s: ...; s.next()``."""

    def __init__(self, names, desc: str, enabled: bool = True):
        self.names = list(names)
        self._bar = bar(total=len(self.names), desc=desc, enabled=enabled)
        self._i = 0
        self._show()

    def _show(self):
        if self._i < len(self.names):
            self._bar.set_postfix_str(self.names[self._i])

    def next(self) -> None:
        self._i += 1
        self._bar.update(1)
        self._show()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._bar.close()
        return False
