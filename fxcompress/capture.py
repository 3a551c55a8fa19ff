"""Model + example inputs -> torch.fx.GraphModule.

``torch.fx.symbolic_trace`` is tried first: it keeps ``call_module`` nodes (one per
nn.Linear / nn.Conv2d), which is what training rewrites want.  If it fails (data- or
shape-dependent Python control flow, unsupported ops), ``torch.export.export(strict=False)``
is tried on the model in eval mode and its unlifted graph is used (linear layers appear as
``aten.linear`` calls on ``get_attr`` weights; such a graph has eval semantics baked in).  The input model is never modified: capture works on a deep copy.

A traced graph then has its functional ``conv2d`` / ``linear`` calls on a module's own weight (a ``Conv2d``
subclass whose ``forward`` pads and calls ``F.conv2d(x, self.weight, ...)``, as EfficientNet-Lite's) lifted into
``nn.Conv2d`` / ``nn.Linear`` call sites at the module's path, a symmetric zero pad folded into the conv and an
asymmetric one kept as ``F.pad`` (:func:`fxcompress.passes.lift_layers.lift_functional_layers`; ``lift=False``
keeps the calls; the rows are in ``gm.meta["fxcompress_lifted"]``).
"""
from __future__ import annotations

import copy
import warnings

import torch
import torch.fx as fx
from torch import nn


class CaptureError(ValueError):
    """The model could not be turned into a graph; the message names where and why."""


class NonFiniteWeightError(ValueError):
    """A parameter or buffer holds NaN or Inf values; the message names it."""


def check_finite(model: nn.Module, what: str) -> None:
    """Raise :class:`NonFiniteWeightError` naming the first float parameter / buffer with NaN or Inf values."""
    seen = set()
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)):
        if id(t) in seen or not t.is_floating_point() or t.device.type == "meta":
            continue
        seen.add(id(t))
        ok = torch.isfinite(t.detach())
        if not bool(ok.all()):
            n_nan = int(torch.isnan(t.detach()).sum())
            n_inf = int((~ok).sum()) - n_nan
            raise NonFiniteWeightError(
                f"{what}: {name!r} (shape {tuple(t.shape)}) holds {n_nan} NaN and {n_inf} Inf value(s); "
                "fix or reload the weights before compressing (e.g. check the checkpoint that produced them)")


def _hf_without_cache(model: nn.Module) -> nn.Module:
    """A copy of a Hugging Face model with ``config.use_cache=False`` (a KV cache object cannot be captured)."""
    cfg = getattr(model, "config", None)
    if cfg is None or not getattr(cfg, "use_cache", False):
        return model
    work = copy.deepcopy(model)
    work.config.use_cache = False
    gen = getattr(work, "generation_config", None)
    if gen is not None and getattr(gen, "use_cache", None):
        gen.use_cache = False
    warnings.warn(f"capture: {type(model).__name__} has config.use_cache=True; capturing with use_cache=False "
                  "(a DynamicCache cannot be part of a graph). Set model.config.use_cache = False to silence this.",
                  stacklevel=3)
    return work


class _PathTracer(fx.Tracer):
    """A tracer that remembers which module it was inside when tracing failed."""

    def __init__(self):
        super().__init__()
        self.stack: list[str] = []

    def call_module(self, m, forward, args, kwargs):
        self.stack.append(f"{self.path_of_module(m)} ({type(m).__name__})")
        out = super().call_module(m, forward, args, kwargs)
        self.stack.pop()
        return out


def _as_tuple(example_inputs):
    if example_inputs is None:
        return ()
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    if not isinstance(example_inputs, tuple):
        raise ValueError(f"example_inputs must be a tensor or a tuple of inputs, got {type(example_inputs).__name__}")
    return example_inputs


def _short(e: BaseException, limit: int = 400) -> str:
    s = f"{type(e).__name__}: {e}".strip().replace("\n", " ")
    return s if len(s) <= limit else s[:limit] + " ..."


def capture(model: nn.Module, example_inputs=None, *, method: str = "auto", check: bool = True,
            lift: bool = True) -> fx.GraphModule:
    """Capture ``model`` as a GraphModule (a deep copy: ``model`` is left untouched).

    ``method``: "auto" (symbolic_trace, then torch.export), "symbolic_trace" or "export".
    ``lift``: turn functional conv2d / linear calls on a module's own weight into ``nn.Conv2d`` / ``nn.Linear``
    call sites (see the module docstring).
    With ``check`` and example inputs, the graph's output is compared with the model's.
    """
    if not isinstance(model, nn.Module):
        raise CaptureError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if method not in ("auto", "symbolic_trace", "export"):
        raise ValueError(f"method must be 'auto', 'symbolic_trace' or 'export', got {method!r}")
    args = _as_tuple(example_inputs)
    check_finite(model, "capture")
    if not isinstance(lift, bool):
        raise ValueError(f"lift must be a bool, got {lift!r}")
    if isinstance(model, fx.GraphModule):
        gm = copy.deepcopy(model)
        gm.meta.setdefault("fxcompress_capture", "graph_module")
        if lift:
            _lift(gm)
        return gm
    model = _hf_without_cache(model)
    work = copy.deepcopy(model)
    trace_err = export_err = None
    where = ""
    gm = None
    if method in ("auto", "symbolic_trace"):
        tracer = _PathTracer()
        try:
            graph = tracer.trace(work)
            gm = fx.GraphModule(tracer.root, graph, type(work).__name__)
            gm.meta["fxcompress_capture"] = "symbolic_trace"
        except Exception as e:  # noqa: BLE001 - any tracing failure falls through to export
            trace_err = e
            where = tracer.stack[-1] if tracer.stack else f"the top-level forward of {type(model).__name__}"
    if gm is None and method in ("auto", "export"):
        if not args:
            export_err = ValueError("torch.export needs example_inputs")
        else:
            try:
                ep = torch.export.export(copy.deepcopy(model).eval(), args, strict=False)
                gm = ep.module()
                gm.meta["fxcompress_capture"] = "torch.export"
            except Exception as e:  # noqa: BLE001
                export_err = e
    if gm is None and export_err is not None and "Cache" in f"{type(export_err).__name__} {export_err}":
        raise CaptureError(f"could not capture {type(model).__name__}: torch.export failed on a KV cache object "
                           f"({_short(export_err, 200)}); set model.config.use_cache = False (or pass "
                           "use_cache=False) and capture again")
    if gm is None:
        parts = [f"could not capture {type(model).__name__} as a graph"]
        if trace_err is not None:
            parts.append(f"symbolic_trace failed in {where}: {_short(trace_err)}")
        if export_err is not None:
            parts.append(f"torch.export failed: {_short(export_err)}")
        raise CaptureError("; ".join(parts))
    if lift:
        _lift(gm)
    if check and args:
        _check_same(model, gm, args)
    return gm


def _lift(gm: fx.GraphModule) -> None:
    from .passes.lift_layers import LIFT_KEY, lift_functional_layers

    rows = lift_functional_layers(gm)
    if rows:
        gm.meta[LIFT_KEY] = [r.as_dict() for r in rows]


def _check_same(model, gm, args):
    """Compare outputs in eval mode on copies, so no BatchNorm statistics of the user's model move."""
    ref_model = copy.deepcopy(model).eval()
    traced = gm.meta.get("fxcompress_capture") == "symbolic_trace"
    if traced:
        gm.eval()
    with torch.no_grad():
        ref, out = ref_model(*args), gm(*args)
    if traced:
        gm.train(model.training)
    ref_l = [t for t in torch.utils._pytree.tree_leaves(ref) if isinstance(t, torch.Tensor)]
    out_l = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    if len(ref_l) != len(out_l) or any(a.shape != b.shape or not torch.allclose(a, b, rtol=1e-4, atol=1e-5)
                                       for a, b in zip(ref_l, out_l)):
        raise CaptureError(f"the captured graph of {type(model).__name__} does not reproduce the model's output "
                           "on the example inputs")
