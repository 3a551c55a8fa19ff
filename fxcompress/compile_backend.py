"""A ``torch.compile`` backend that runs fxcompress passes on the captured graph, then lowers it.

    qm = torch.compile(model, backend=fxc.compile_backend(passes=[(fxc.quantize_rtn, fxc.RTNConfig(bits=4))],
                                                          lower="inductor"))

Dynamo hands a backend a GraphModule whose parameters and buffers are (with torch's default
``inline_inbuilt_nn_modules``) extra *placeholders*, and whose layers are ``torch._C._nn.linear`` /
``F.conv2d`` calls on them. The backend binds those placeholders to the real tensors as ``get_attr``
constants (so ``F.linear`` on a get_attr weight is a linear site the passes rewrite), runs the passes,
and compiles the result with Inductor (``torch._inductor.compile_fx.compile_fx``) or TVM (``compile_tvm``
with the example inputs Dynamo gives; static shapes). The compressed weights are frozen at compile time:
later changes to the model's parameters are not seen (recompile to pick them up).

Every compiled graph's compressed GraphModule and per-layer report stay on the backend object
(``backend.graphs``, ``backend.report()``). A pass that rewrites nothing in a graph raises (see
:func:`compile_backend`), rather than silently compiling the float model.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

LOWERINGS = ("inductor", "tvm")
_NAME_RE = re.compile(r"^L_(?:self|fn|mod|model|m)_(.*)_$")


@dataclass
class CompiledGraph:
    """One graph Dynamo handed to the backend: the compressed GraphModule, its per-layer report, the lowering."""

    gm: fx.GraphModule
    report: Any
    lower: str
    n_bound: int  # parameters/buffers bound as constants


@dataclass
class FxcompressBackend:
    """The callable handed to ``torch.compile(backend=...)``; see :func:`compile_backend`."""

    passes: list
    lower: str = "inductor"
    target: str = "llvm"
    allow_unmodified: bool = False
    graphs: list[CompiledGraph] = field(default_factory=list)

    def __post_init__(self):
        if self.lower not in LOWERINGS:
            raise ValueError(f"compile_backend: lower must be one of {LOWERINGS}, got {self.lower!r}")
        if not self.passes:
            raise ValueError("compile_backend: passes is empty; give [(pass_fn, config), ...] "
                             "(e.g. [(fxc.quantize_rtn, fxc.RTNConfig(bits=4))])")
        for i, step in enumerate(self.passes):
            if not (isinstance(step, tuple) and len(step) == 2 and callable(step[0])):
                raise ValueError(f"compile_backend: passes[{i}] must be a (pass_fn, config) tuple, got {step!r}")

    def report(self):
        """The per-layer rows of every graph compiled so far."""
        from .passes.base import Report, report
        return Report([r for g in self.graphs for r in report(g.gm)])

    def __call__(self, gm: fx.GraphModule, example_inputs: list) -> Callable:
        from .passes.base import REPORT_KEY, report

        bound_gm, keep = bind_parameters(gm, example_inputs)
        out = bound_gm
        for fn, cfg in self.passes:
            before = len(out.meta.get(REPORT_KEY, []))
            res = fn(out, cfg)
            new = getattr(res, "gm", res)
            if not isinstance(new, fx.GraphModule):
                raise ValueError(f"compile_backend: pass {getattr(fn, '__name__', fn)} returned "
                                 f"{type(new).__name__}, expected a GraphModule or PassResult")
            rows = [r for _, rs in new.meta.get(REPORT_KEY, [])[before:] for r in rs]
            modified = getattr(res, "modified", None)
            if modified is None:
                modified = any(r["action"] != "skipped" for r in rows)
            if not modified and not self.allow_unmodified:
                skipped = "; ".join(f"{r['layer']}: {r['note']}" for r in rows if r["action"] == "skipped")
                raise ValueError(f"compile_backend: pass {getattr(fn, '__name__', fn)} changed nothing in the "
                                 f"graph torch.compile captured ({sum(1 for _ in gm.graph.nodes)} nodes"
                                 f"{'; skipped: ' + skipped if skipped else '; it found no layer it handles'}). "
                                 "Check the pass config (targets, group_size), or pass allow_unmodified=True")
            out = new
        out.recompile()
        inputs = [example_inputs[i] for i in keep]
        self.graphs.append(CompiledGraph(out, report(out), self.lower, len(example_inputs) - len(keep)))
        if self.lower == "inductor":
            from torch._inductor.compile_fx import compile_fx
            compiled = compile_fx(out, inputs)  # its wrapper takes positional args (aot_autograd's forward)

            def run(*args):
                return compiled(*[args[i] for i in keep])
            return run
        return self._tvm(out, inputs, keep)

    def _tvm(self, out: fx.GraphModule, inputs: list, keep: list[int]) -> Callable:
        from .backends.tvm import compile_tvm
        for i, x in enumerate(inputs):
            if not isinstance(x, torch.Tensor):
                raise ValueError(f"compile_backend(lower='tvm'): input {i} is a {type(x).__name__} (a dynamic "
                                 "shape); TVM builds static shapes: use torch.compile(..., dynamic=False)")
        runner = compile_tvm(out, tuple(x.detach() for x in inputs), target=self.target)

        def run(*args):
            return tuple(runner.run(*[args[i].detach() for i in keep]))
        return run


def compile_backend(passes: list, lower: str = "inductor", *, target: str = "llvm",
                    allow_unmodified: bool = False) -> FxcompressBackend:
    """A ``torch.compile`` backend running ``passes`` (a list of ``(pass_fn, config)``, e.g.
    ``[(fxc.quantize_rtn, fxc.RTNConfig(bits=4))]``) on each graph Dynamo captures, then lowering with
    ``lower="inductor"`` or ``"tvm"`` (``target`` ``"llvm"`` or ``"cuda"``).

    ``pass_fn(gm, config)`` may return a PassResult or a GraphModule. A pass that changes nothing raises
    ValueError naming it (``allow_unmodified=True`` compiles such graphs unchanged, e.g. for a model whose
    graph breaks leave some pieces without layers).
    """
    return FxcompressBackend(list(passes), lower, target, allow_unmodified)


def _holder_path(target: str, taken: set) -> tuple[str, str]:
    """``L_self_modules_layers_modules_0_parameters_weight_`` -> (``layers.0``, ``weight``)."""
    m = _NAME_RE.match(target)
    if m:
        body = m.group(1)
        for kind in ("_parameters_", "_buffers_"):
            if kind in body:
                mods, _, attr = body.rpartition(kind)
                if not mods.startswith("modules_"):
                    break
                parts = mods[len("modules_"):].split("_modules_")
                path = ".".join(p for p in parts if p)
                full = f"{path}.{attr}" if path else attr
                if path and attr and full not in taken and all(p.isidentifier() or p.isdigit()
                                                               for p in path.split(".")):
                    return path, attr
    return "", target.strip("_") or "param"


def bind_parameters(gm: fx.GraphModule, example_inputs: list) -> tuple[fx.GraphModule, list[int]]:
    """A copy of ``gm`` whose parameter/buffer placeholders are get_attr constants bound to the real tensors.

    Returns the new GraphModule and the indices of the inputs it still takes.
    """
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    if len(placeholders) != len(example_inputs):
        raise ValueError(f"compile_backend: the graph has {len(placeholders)} inputs but Dynamo gave "
                         f"{len(example_inputs)} example inputs")
    root = nn.Module()
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    keep: list[int] = []
    taken: set[str] = set()
    for i, (n, x) in enumerate(zip(placeholders, example_inputs)):
        t = str(n.target)
        is_param = isinstance(x, nn.Parameter) or "_parameters_" in t
        is_buffer = "_buffers_" in t and isinstance(x, torch.Tensor)
        if not (is_param or is_buffer):
            continue
        path, attr = _holder_path(t, taken)
        holder = root
        for part in path.split(".") if path else []:
            if not hasattr(holder, part):
                holder.add_module(part, nn.Module())
            holder = getattr(holder, part)
        if is_param:
            holder.register_parameter(attr, nn.Parameter(x.detach(), requires_grad=False))
        else:
            holder.register_buffer(attr, x.detach())
        taken.add(f"{path}.{attr}" if path else attr)
        env[n] = ("get_attr", f"{path}.{attr}" if path else attr)
    for i, n in enumerate(placeholders):
        if n not in env:
            keep.append(i)
    for n in gm.graph.nodes:
        if n in env and isinstance(env[n], tuple):
            continue
        if n.op == "placeholder":
            env[n] = graph.node_copy(n, lambda a: env[a])
    for n, spec in list(env.items()):
        if isinstance(spec, tuple):
            env[n] = graph.get_attr(spec[1])
    for n in gm.graph.nodes:
        if n.op != "placeholder":
            env[n] = graph.node_copy(n, lambda a: env[a])
    for name, mod in gm.named_children():
        if not hasattr(root, name):
            root.add_module(name, mod)
    for name, p in gm.named_parameters(recurse=False):
        root.register_parameter(name, p)
    for name, b in gm.named_buffers(recurse=False):
        root.register_buffer(name, b)
    for n in gm.graph.nodes:  # get_attr constants Dynamo left on the root (inline_inbuilt_nn_modules=False)
        if n.op == "get_attr" and "." not in n.target and not hasattr(root, n.target):
            setattr(root, n.target, getattr(gm, n.target))
    out = fx.GraphModule(root, graph, class_name="CompressedGraph")
    out.meta["fxcompress_capture"] = "torch.compile"
    return out, keep
