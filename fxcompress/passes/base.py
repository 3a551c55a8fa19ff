"""Pass results and per-layer reports; a thin pipeline; an adapter to torch.fx's PassManager."""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch.fx as fx

REPORT_KEY = "fxcompress_reports"


@dataclass
class LayerReport:
    layer: str
    op: str
    action: str  # "quantized", "pruned", "skipped", "prepared", ...
    bits: int | None = None
    shape_before: tuple | None = None
    shape_after: tuple | None = None
    note: str = ""
    pass_name: str = ""

    def as_dict(self) -> dict:
        return {"layer": self.layer, "op": self.op, "action": self.action, "bits": self.bits,
                "shape_before": list(self.shape_before) if self.shape_before else None,
                "shape_after": list(self.shape_after) if self.shape_after else None,
                "note": self.note, "pass": self.pass_name}

    @classmethod
    def from_dict(cls, d: dict) -> "LayerReport":
        return cls(d["layer"], d["op"], d["action"], d.get("bits"),
                   tuple(d["shape_before"]) if d.get("shape_before") else None,
                   tuple(d["shape_after"]) if d.get("shape_after") else None, d.get("note", ""), d.get("pass", ""))


class Report(list):
    """A list of :class:`LayerReport` rows that prints as a table."""

    COLUMNS = ("pass", "layer", "op", "action", "bits", "shape before", "shape after", "note")

    def rows(self, action: str | None = None) -> list[LayerReport]:
        return [r for r in self if action is None or r.action == action]

    def skipped_unfit(self, spec, name: str, op: str, shape: tuple) -> bool:
        """True (and a "skipped" row naming the reason) when ``spec`` cannot quantize a weight of ``shape``."""
        try:
            spec.check_shape(shape)
        except ValueError as e:
            self.append(LayerReport(name, op, "skipped", None, shape, shape, str(e)))
            return True
        return False

    def table(self) -> str:
        def fmt(v):
            if v is None:
                return "-"
            if isinstance(v, tuple):
                return "x".join(str(d) for d in v)
            return str(v)

        body = [[fmt(r.pass_name), r.layer, r.op, r.action, fmt(r.bits), fmt(r.shape_before), fmt(r.shape_after),
                 r.note] for r in self]
        widths = [max([len(c)] + [len(b[i]) for b in body]) for i, c in enumerate(self.COLUMNS)]
        line = "  ".join(c.ljust(w) for c, w in zip(self.COLUMNS, widths))
        out = [line, "  ".join("-" * w for w in widths)]
        out += ["  ".join(v.ljust(w) for v, w in zip(b, widths)).rstrip() for b in body]
        return "\n".join(out)

    def __str__(self) -> str:
        return self.table() if self else "(empty report)"


NOOP_MODES = ("raise", "warn")
_UNCHANGED = ("skipped", "unchanged")


class NothingToCompressError(ValueError):
    """A pass rewrote no layer; the message summarises why each layer was skipped and what to try."""


@dataclass
class PassResult:
    """What a pass returns: the new graph module, its per-layer report, and whether any layer was rewritten.

    ``graph_module`` and ``modified`` are the names torch.fx's ``PassManager`` reads, so a pass
    ``fn(gm, config)`` drops into it through ``functools.partial(fn, config=config)``.
    """

    gm: fx.GraphModule
    report: Report = field(default_factory=Report)
    modified: bool = True

    @property
    def graph_module(self) -> fx.GraphModule:
        return self.gm


def record(gm: fx.GraphModule, pass_name: str, report: Report) -> PassResult:
    """Stamp ``report`` rows with the pass name and attach them to ``gm.meta``."""
    for r in report:
        r.pass_name = pass_name
    gm.meta.setdefault(REPORT_KEY, [])
    gm.meta[REPORT_KEY] = list(gm.meta[REPORT_KEY]) + [(pass_name, [r.as_dict() for r in report])]
    modified = any(r.action not in _UNCHANGED for r in report)
    return PassResult(gm, report, modified)


def _pattern(note: str) -> str:
    """A skip note with its numbers and quoted names blanked, so that like reasons group together."""
    return re.sub(r"\d+", "N", re.sub(r"'[^']*'", "'…'", re.sub(r"\(weight shape [^)]*\)", "", note))).strip()


def summarize_skips(report: Report, limit: int = 4) -> str:
    """Skip reasons grouped by kind and counted: ``3 layers: group_size=N does not divide ... (e.g. fc1, fc2)``."""
    groups: dict[str, list[LayerReport]] = {}
    for r in report:
        if r.action in _UNCHANGED:
            groups.setdefault(_pattern(r.note or r.action), []).append(r)
    parts = []
    for rows in sorted(groups.values(), key=len, reverse=True)[:limit]:
        names = ", ".join(r.layer for r in rows[:3]) + (", ..." if len(rows) > 3 else "")
        note = rows[0].note or rows[0].action
        parts.append(f"{len(rows)} layer{'s' if len(rows) != 1 else ''} ({names}): {note}")
    if len(groups) > limit:
        parts.append(f"{len(groups) - limit} more kinds of reason")
    return "; ".join(parts) if parts else "no candidate layer in the graph"


def group_size_hint(report: Report, per_channel: str) -> str:
    """What to try when ``group_size`` divides no layer: the largest sizes that divide the skipped layers."""
    skipped = [r for r in report if r.action == "skipped" and "does not divide" in r.note and r.shape_before]
    if not skipped:
        return ""
    ins = [r.shape_before[1] for r in skipped]
    fits = [g for g in (256, 128, 64, 32, 16, 8) if all(i % g == 0 for i in ins)]
    try_ = f"try group_size={fits[0]} or {per_channel}" if fits else f"try {per_channel}"
    return f"Try{try_[3:]} (in_features of the skipped layers: {', '.join(str(i) for i in sorted(set(ins))[:6])})"


def check_modified(res: PassResult, on_noop: str, hint: str = "") -> PassResult:
    """Apply the "nothing was changed" rule: raise :class:`NothingToCompressError` (or warn) when no row rewrote a layer."""
    if on_noop not in NOOP_MODES:
        raise ValueError(f"on_noop must be one of {NOOP_MODES}, got {on_noop!r}")
    if res.modified:
        return res
    name = res.report[0].pass_name if res.report else "pass"
    msg = f"{name} changed nothing: {summarize_skips(res.report)}" + (f". {hint}" if hint else "")
    if on_noop == "warn":
        warnings.warn(msg, stacklevel=3)
        return res
    raise NothingToCompressError(msg)


def report(gm: fx.GraphModule) -> Report:
    """The per-layer report of every fxcompress pass applied to ``gm`` so far, in order."""
    if hasattr(gm, "graph_module") and not isinstance(gm, fx.GraphModule):  # an ExportedProgram
        gm = gm.graph_module
    if not hasattr(gm, "meta"):
        raise ValueError(f"report() needs a GraphModule produced by fxcompress, got {type(gm).__name__}")
    out = Report()
    for _name, rows in gm.meta.get(REPORT_KEY, []):
        out.extend(LayerReport.from_dict(d) for d in rows)
    return out


class Pipeline:
    """Run passes in order: ``Pipeline([(pass_fn, config), ...])(gm) -> PassResult``."""

    def __init__(self, steps: list[tuple[Callable[..., PassResult], Any]]):
        self.steps = list(steps)

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        total, modified = Report(), False
        for fn, cfg in self.steps:
            res = fn(gm, cfg)
            gm = res.gm
            total.extend(res.report)
            modified = modified or res.modified
        return PassResult(gm, total, modified)


def as_fx_pass(fn: Callable[..., PassResult], config: Any):
    """Wrap ``fn(gm, config)`` for ``torch.fx.passes.infra.pass_manager.PassManager``."""
    from torch.fx.passes.infra.pass_base import PassResult as FxPassResult

    def run(gm: fx.GraphModule):
        res = fn(gm, config)
        return FxPassResult(res.gm, getattr(res, "modified", True))

    run.__name__ = getattr(fn, "__name__", "fxcompress_pass")
    return run
