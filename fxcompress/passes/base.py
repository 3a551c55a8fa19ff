"""Pass results and per-layer reports; a thin pipeline; an adapter to torch.fx's PassManager."""
from __future__ import annotations

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


@dataclass
class PassResult:
    """What a pass returns: the new graph module and its per-layer report."""

    gm: fx.GraphModule
    report: Report = field(default_factory=Report)

    @property
    def graph_module(self) -> fx.GraphModule:
        return self.gm


def record(gm: fx.GraphModule, pass_name: str, report: Report) -> PassResult:
    """Stamp ``report`` rows with the pass name and attach them to ``gm.meta``."""
    for r in report:
        r.pass_name = pass_name
    gm.meta.setdefault(REPORT_KEY, [])
    gm.meta[REPORT_KEY] = list(gm.meta[REPORT_KEY]) + [(pass_name, [r.as_dict() for r in report])]
    return PassResult(gm, report)


def report(gm: fx.GraphModule) -> Report:
    """The per-layer report of every fxcompress pass applied to ``gm`` so far, in order."""
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
        total = Report()
        for fn, cfg in self.steps:
            res = fn(gm, cfg)
            gm = res.gm
            total.extend(res.report)
        return PassResult(gm, total)


def as_fx_pass(fn: Callable[..., PassResult], config: Any):
    """Wrap ``fn(gm, config)`` for ``torch.fx.passes.infra.pass_manager.PassManager``."""
    from torch.fx.passes.infra.pass_base import PassResult as FxPassResult

    def run(gm: fx.GraphModule):
        return FxPassResult(fn(gm, config).gm, True)

    run.__name__ = getattr(fn, "__name__", "fxcompress_pass")
    return run
