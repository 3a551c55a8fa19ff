"""Save / load compressed graph modules as data: a JSON graph over an allowlist + safetensors + a manifest.

Layout of an artifact directory (format version 2)::

    manifest.json         format, version, sha256 of every file, example input shapes, per-layer reports
    graph.json            the module tree (types from an allowlist, their attributes as JSON) and every
                          fx node (op, target, args/kwargs as JSON)
    weights.safetensors   every parameter, buffer and tensor attribute (packed integer codes stay packed)

Loading never unpickles and never imports a module named by the file: module types, functions and ops are
looked up by name in allowlists built from modules that are already imported (torch, operator, math,
fxcompress.nn), and anything outside them is an :class:`ArtifactError` naming it. Version-1 artifacts
(a pickled ``structure.pt``) are refused with the command that converts a trusted one
(``artifact_v1.convert_v1``, ``fxcompress convert-artifact OLD NEW --trust``).

``torch.export.save`` / ``torch.export.load`` is not used: ``torch.export.load`` unpickles
(``torch/_export/serde/serialize.py`` falls back to ``torch.load(weights_only=False)`` when the weights-only
load fails, and ``torch/export/pt2_archive/_package.py`` loads weights and constants with
``torch.load(..., weights_only=False)`` / ``pickle.loads``), so it runs code from the file.
"""
from __future__ import annotations

import builtins
import copy
import dataclasses
import enum
import hashlib
import json
import math
import operator
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..passes.base import REPORT_KEY

FORMAT = "fxcompress-artifact"
FORMAT_VERSION = 2
GRAPH_FILE = "graph.json"
WEIGHTS_FILE = "weights.safetensors"


class ArtifactError(ValueError):
    """An artifact directory is missing, corrupt, of an unknown format version, or names something
    outside the allowlist."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _qualname(obj) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


# ----------------------------------------------------------------------------------------------------------
# Allowlists: module types, value dataclasses, call_function targets.

@dataclasses.dataclass(frozen=True)
class _ModuleEntry:
    cls: type
    to_config: Callable[[nn.Module], dict] | None
    from_config: Callable[[dict], nn.Module] | None


_MODULES: dict[str, _ModuleEntry] = {}
_DATACLASSES: dict[str, type] = {}


def register_artifact_module(cls: type, to_config: Callable[[nn.Module], dict] | None = None,
                             from_config: Callable[[dict], nn.Module] | None = None) -> type:
    """Allow ``cls`` in artifacts.

    Without ``to_config``/``from_config`` a module is stored as its plain attributes (JSON values, allowlisted
    dataclasses, tensors) plus its parameters and buffers, and rebuilt without calling ``__init__``, as pickle
    would but from data. With them, ``to_config(module)`` returns a JSON-able dict and ``from_config(config)``
    returns a module whose parameters/buffers have the saved names (their values are assigned afterwards).
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"register_artifact_module needs an nn.Module subclass, got {cls!r}")
    if (to_config is None) != (from_config is None):
        raise ValueError("register_artifact_module: give both to_config and from_config, or neither")
    _MODULES[_qualname(cls)] = _ModuleEntry(cls, to_config, from_config)
    return cls


def register_artifact_dataclass(cls: type) -> type:
    """Allow a dataclass (e.g. ``QuantSpec``) as a module attribute value; its fields must be JSON-able."""
    if not dataclasses.is_dataclass(cls):
        raise ValueError(f"register_artifact_dataclass needs a dataclass, got {cls!r}")
    _DATACLASSES[_qualname(cls)] = cls
    return cls


def _register_defaults() -> None:
    if _MODULES:
        return
    register_artifact_module(nn.Module)
    for name in dir(nn):
        obj = getattr(nn, name)
        if isinstance(obj, type) and issubclass(obj, nn.Module) and obj.__module__.startswith("torch.nn.modules"):
            register_artifact_module(obj)
    from .. import nn as fxnn
    from ..quant import QuantSpec
    for name in fxnn.__all__:
        obj = getattr(fxnn, name)
        if isinstance(obj, type) and issubclass(obj, nn.Module):
            register_artifact_module(obj)
    register_artifact_dataclass(QuantSpec)


# call_function targets: looked up by attribute name in these already-imported namespaces, never imported.
_BUILTINS = ("getattr", "len", "abs", "min", "max", "round", "int", "float", "bool", "slice", "range", "pow",
             "sum", "all", "any")
_NAMESPACES: dict[str, Any] = {
    "operator": operator, "math": math, "torch": torch, "torch.nn.functional": torch.nn.functional,
    "torch._C._nn": torch._C._nn, "torch.special": torch.special, "torch.linalg": torch.linalg,
    "torch.fft": torch.fft, "torch.Tensor": torch.Tensor,
}
_OP_NAMESPACES = ("aten", "prims", "fxcompress", "quantized_decomposed")
_FN_NAMES: dict[int, str] = {}
_REGISTERED_FNS: dict[str, Callable] = {}


def register_artifact_function(fn: Callable, name: str) -> Callable:
    """Allow ``fn`` (a function of an already-imported fxcompress module, e.g. the KV-cache attention that
    graph passes insert) as a call_function target under ``name``; loading resolves ``name`` only through this
    table, so a file can never name a function that was not registered by code the user imported."""
    _REGISTERED_FNS[name] = fn
    return fn


def _function_name(fn) -> str:
    """The allowlisted name of a call_function target (raises ArtifactError for anything else)."""
    if isinstance(fn, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        ns, _, op = fn._qualified_op_name.partition("::") if isinstance(fn, torch._ops.OpOverloadPacket) \
            else fn._schema.name.partition("::")
        if ns not in _OP_NAMESPACES:
            raise ArtifactError(f"cannot store op {fn} in an artifact: namespace {ns!r} is not in the allowlist "
                                f"{_OP_NAMESPACES}")
        if isinstance(fn, torch._ops.OpOverloadPacket):
            return f"torch.ops.{ns}.{op}"
        return f"torch.ops.{ns}.{op}.{fn._overloadname}"
    for name, registered in _REGISTERED_FNS.items():
        if registered is fn:
            return name
    if not _FN_NAMES:
        for ns_name, ns in _NAMESPACES.items():
            for attr in dir(ns):
                if attr.startswith("__"):
                    continue
                try:
                    obj = getattr(ns, attr)
                except Exception:  # noqa: BLE001 - some lazy attributes raise
                    continue
                if callable(obj) and not isinstance(obj, type):
                    _FN_NAMES.setdefault(id(obj), f"{ns_name}.{attr}")
        for b in _BUILTINS:
            _FN_NAMES[id(getattr(builtins, b))] = f"builtins.{b}"
    name = _FN_NAMES.get(id(fn))
    if name is None:
        raise ArtifactError(f"cannot store call_function target {getattr(fn, '__module__', '?')}."
                            f"{getattr(fn, '__qualname__', repr(fn))} in an artifact: it is not in the allowlist "
                            "(operator, builtins, torch, torch.nn.functional, torch.ops.aten/prims/fxcompress)")
    return name


def _resolve_function(name: str):
    """Inverse of :func:`_function_name`; only getattr on already-imported namespaces."""
    def bad(why=""):
        return ArtifactError(f"artifact names function {name!r}, which is not in the allowlist{why}; "
                             "nothing was imported. Only artifacts written by fxcompress.save_artifact load.")
    if not isinstance(name, str):
        raise bad()
    if name.startswith("torch.ops."):
        parts = name.split(".")
        if len(parts) not in (4, 5) or parts[2] not in _OP_NAMESPACES:
            raise bad(f" (op namespaces allowed: {', '.join(_OP_NAMESPACES)})")
        try:
            obj = getattr(getattr(torch.ops, parts[2]), parts[3])
            if len(parts) == 5:
                obj = getattr(obj, parts[4])
        except (AttributeError, RuntimeError):
            raise ArtifactError(f"artifact uses op {name}, which is not registered in this process "
                                "(a newer fxcompress or torch may be needed)") from None
        return obj
    if name in _REGISTERED_FNS:
        return _REGISTERED_FNS[name]
    if name.startswith("builtins."):
        attr = name[len("builtins."):]
        if attr not in _BUILTINS:
            raise bad()
        return getattr(builtins, attr)
    ns_name, _, attr = name.rpartition(".")
    ns = _NAMESPACES.get(ns_name)
    if ns is None or not attr or attr.startswith("__") or not hasattr(ns, attr):
        raise bad()
    obj = getattr(ns, attr)
    if not callable(obj) or isinstance(obj, type):
        raise bad()
    return obj


# ----------------------------------------------------------------------------------------------------------
# Values: fx node arguments and module attributes as JSON. Every JSON object is a one-key tag.

_MEMORY_FORMATS = {str(m).split(".")[-1]: m for m in (torch.contiguous_format, torch.channels_last,
                                                       torch.channels_last_3d, torch.preserve_format)}
_LAYOUTS = {str(m).split(".")[-1]: m for m in (torch.strided, torch.sparse_coo)}


class _Encoder:
    """Python value -> JSON; ``where`` names the node/attribute in errors."""

    def __init__(self, where: str):
        self.where = where

    def __call__(self, v):
        if isinstance(v, fx.Node):
            return {"node": v.name}
        if v is None or isinstance(v, (bool, str)):
            return v
        if isinstance(v, int):
            return v
        if isinstance(v, float):
            return v if math.isfinite(v) else {"float": repr(v)}
        if isinstance(v, torch.Size):
            return {"size": [self(x) for x in v]}
        if isinstance(v, tuple) and hasattr(v, "_fields"):
            raise ArtifactError(f"{self.where}: namedtuple {type(v).__name__} cannot be stored")
        if isinstance(v, tuple):
            return {"tuple": [self(x) for x in v]}
        if isinstance(v, list):
            return [self(x) for x in v]
        if isinstance(v, dict):
            return {"dict": [[self(k), self(x)] for k, x in v.items()]}
        if isinstance(v, slice):
            return {"slice": [self(v.start), self(v.stop), self(v.step)]}
        if v is Ellipsis:
            return {"ellipsis": True}
        if isinstance(v, torch.dtype):
            return {"dtype": str(v).removeprefix("torch.")}
        if isinstance(v, torch.device):
            return {"device": str(v)}
        if isinstance(v, torch.memory_format):
            return {"memory_format": str(v).split(".")[-1]}
        if isinstance(v, torch.layout):
            return {"layout": str(v).split(".")[-1]}
        if dataclasses.is_dataclass(v) and not isinstance(v, type) and _qualname(type(v)) in _DATACLASSES:
            return {"dataclass": _qualname(type(v)),
                    "fields": {f.name: self(getattr(v, f.name)) for f in dataclasses.fields(v)}}
        if isinstance(v, enum.Enum):
            raise ArtifactError(f"{self.where}: enum {type(v).__name__} cannot be stored")
        raise ArtifactError(f"{self.where}: a value of type {type(v).__module__}.{type(v).__qualname__} cannot be "
                            "stored in an artifact (allowed: numbers, str, None, tuples/lists/dicts, dtype, device, "
                            "slices, torch.Size, tensors and registered dataclasses)")


def _decode(v, nodes: dict | None = None, where: str = "artifact"):
    """JSON -> Python value (inverse of :class:`_Encoder`); ``nodes`` maps node names for graph arguments."""
    def d(x):
        return _decode(x, nodes, where)
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, list):
        return [d(x) for x in v]
    if not isinstance(v, dict) or len(v) not in (1, 2):
        raise ArtifactError(f"{where}: malformed value {str(v)[:80]}")
    (tag, body), *rest = v.items()
    try:
        if tag == "node" and nodes is not None:
            return nodes[body]
        if tag == "float":
            return float(body) if body in ("inf", "-inf", "nan") else _fail(f"bad float {body!r}")
        if tag == "size":
            return torch.Size(d(body))
        if tag == "tuple":
            return tuple(d(x) for x in body)
        if tag == "dict":
            return {d(k): d(x) for k, x in body}
        if tag == "slice":
            return slice(*d(body))
        if tag == "ellipsis":
            return Ellipsis
        if tag == "dtype":
            dt = getattr(torch, body, None)
            return dt if isinstance(dt, torch.dtype) else _fail(f"unknown dtype {body!r}")
        if tag == "device":
            return torch.device(body)
        if tag == "memory_format":
            return _MEMORY_FORMATS[body]
        if tag == "layout":
            return _LAYOUTS[body]
        if tag == "dataclass":
            cls = _DATACLASSES.get(body)
            if cls is None:
                raise ArtifactError(f"{where}: artifact names type {body!r}, which is not in the allowlist; "
                                    "nothing was imported")
            return cls(**{k: d(x) for k, x in rest[0][1].items()})
    except KeyError as e:
        raise ArtifactError(f"{where}: artifact refers to unknown {tag} {e}") from None
    raise ArtifactError(f"{where}: unknown value tag {tag!r}")


def _fail(msg):
    raise ArtifactError(msg)


# ----------------------------------------------------------------------------------------------------------
# Graph and module tree.

_MODULE_INTERNALS = frozenset(nn.Module().__dict__) | {"forward"}


def _graph_to_json(graph: fx.Graph, where: str) -> dict:
    enc = _Encoder(where)
    nodes = []
    for n in graph.nodes:
        if n.op == "call_function":
            target = _function_name(n.target)
        elif isinstance(n.target, str):
            target = n.target
        else:
            raise ArtifactError(f"{where}: node {n.name} ({n.op}) has a non-string target {n.target!r}")
        nodes.append({"name": n.name, "op": n.op, "target": target, "args": enc(list(n.args)),
                      "kwargs": enc(dict(n.kwargs))})
    cg = graph._codegen
    if type(cg) is fx.graph.CodeGen:
        codegen = None
    elif isinstance(cg, fx.graph._PyTreeCodeGen):
        pi = cg.pytree_info
        codegen = {"pytree": {"orig_args": list(pi.orig_args),
                              "in_spec": None if pi.in_spec is None else torch.utils._pytree.treespec_dumps(pi.in_spec),
                              "out_spec": None if pi.out_spec is None else
                              torch.utils._pytree.treespec_dumps(pi.out_spec)}}
    else:
        raise ArtifactError(f"{where}: graph code generator {type(cg).__name__} cannot be stored")
    return {"nodes": nodes, "codegen": codegen}


_OPS = ("placeholder", "get_attr", "call_function", "call_method", "call_module", "output")


def _graph_from_json(data: dict, where: str) -> fx.Graph:
    g = fx.Graph()
    env: dict[str, fx.Node] = {}
    for nd in data["nodes"]:
        op, target, name = nd["op"], nd["target"], nd["name"]
        if op not in _OPS:
            raise ArtifactError(f"{where}: node {name} has unknown op {op!r}")
        if op == "call_function":
            target = _resolve_function(target)
        elif not isinstance(target, str):
            raise ArtifactError(f"{where}: node {name} has a non-string target")
        elif op == "call_method" and (target.startswith("__") or not hasattr(torch.Tensor, target)):
            raise ArtifactError(f"{where}: node {name} calls method {target!r}, which torch.Tensor does not have")
        args = tuple(_decode(nd["args"], env, where=where))
        kwargs = _decode(nd["kwargs"], env, where=where)
        node = g.create_node(op, target, args, kwargs, name=name)
        if node.name != name:
            raise ArtifactError(f"{where}: duplicate node name {name!r}")
        env[name] = node
    cg = data.get("codegen")
    if cg is not None:
        p = cg["pytree"]

        def loads(spec: str):
            try:
                return torch.utils._pytree.treespec_loads(spec)
            except NotImplementedError as e:  # a pytree node type whose library is not imported: import nothing
                raise ArtifactError(f"{where}: the graph's inputs/outputs use a container type that is not registered "
                                    f"in this process ({e}); import the library that defines it (e.g. `import "
                                    "transformers` for a Hugging Face model's output class) before load_artifact"
                                    ) from None
        g.set_codegen(fx.graph._PyTreeCodeGen(fx.graph._PyTreeInfo(
            list(p["orig_args"]), None if p["in_spec"] is None else loads(p["in_spec"]),
            None if p["out_spec"] is None else loads(p["out_spec"]))))
    return g


class _TreeWriter:
    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}
        self.seen: dict[int, str] = {}

    def tensor(self, key: str, t: torch.Tensor) -> dict:
        first = self.seen.get(id(t))
        if first is not None:
            return {"alias": first}
        self.seen[id(t)] = key
        self.tensors[key] = t.detach()
        return {"key": key}

    def module(self, m: nn.Module, path: str) -> dict:
        where = f"module {path or '<root>'} ({type(m).__name__})"
        is_gm = isinstance(m, fx.GraphModule)
        out: dict[str, Any] = {"training": m.training}
        if is_gm:
            out["kind"] = "graph_module"
            out["graph"] = _graph_to_json(m.graph, where)
        else:
            name = _qualname(type(m))
            entry = _MODULES.get(name)
            if entry is None:
                raise ArtifactError(f"cannot store {where}: type {name} is not in the artifact allowlist; register "
                                    "it with fxcompress.runtime.artifact.register_artifact_module")
            for k in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_state_dict_hooks"):
                if getattr(m, k, None):
                    raise ArtifactError(f"cannot store {where}: it has {k[1:]} (hooks are code); remove them first")
            out["type"] = name
            if entry.to_config is not None:
                out["config"] = _Encoder(where)(entry.to_config(m))
            else:
                attrs = {}
                for k, v in m.__dict__.items():
                    if k in _MODULE_INTERNALS:
                        continue
                    if isinstance(v, torch.Tensor):
                        attrs[k] = {"tensor_attr": self.tensor(_join(path, k), v)}
                    else:
                        attrs[k] = _Encoder(f"{where}, attribute {k}")(v)
                out["attrs"] = attrs
        out["parameters"] = {k: None if p is None else {**self.tensor(_join(path, k), p),
                                                        "requires_grad": p.requires_grad}
                             for k, p in m._parameters.items()}
        out["buffers"] = {k: None if b is None else {**self.tensor(_join(path, k), b),
                                                     "persistent": k not in m._non_persistent_buffers_set}
                          for k, b in m._buffers.items()}
        if is_gm:
            out["tensor_attrs"] = {k: self.tensor(_join(path, k), v) for k, v in m.__dict__.items()
                                   if isinstance(v, torch.Tensor) and k not in m._parameters and k not in m._buffers}
        out["children"] = {k: None if c is None else self.module(c, _join(path, k)) for k, c in m._modules.items()}
        return out


def _join(path: str, k: str) -> str:
    return f"{path}.{k}" if path else k


class _TreeReader:
    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors
        self.objs: dict[str, torch.Tensor] = {}

    def tensor(self, ref: dict, where: str, param: bool = False, requires_grad: bool = False):
        if "alias" in ref:
            if ref["alias"] not in self.objs:
                raise ArtifactError(f"{where}: alias of unknown tensor {ref['alias']!r}")
            return self.objs[ref["alias"]]
        key = ref["key"]
        if key not in self.tensors:
            raise ArtifactError(f"{where}: tensor {key!r} is missing from {WEIGHTS_FILE}")
        t = self.tensors[key]
        if param:
            t = nn.Parameter(t, requires_grad=requires_grad)
        self.objs[key] = t
        return t

    def module(self, data: dict, path: str) -> nn.Module:
        where = f"{GRAPH_FILE}: module {path or '<root>'}"
        if data.get("kind") == "graph_module":
            m = fx.GraphModule(nn.Module(), fx.Graph())
        else:
            name = data.get("type")
            entry = _MODULES.get(name)
            if entry is None:
                raise ArtifactError(f"{where}: artifact names module type {name!r}, which is not in the allowlist; "
                                    "nothing was imported. Register it with register_artifact_module if you trust it.")
            if entry.from_config is not None:
                m = entry.from_config(_decode(data["config"], where=where))
            else:
                m = entry.cls.__new__(entry.cls)
                nn.Module.__init__(m)
                for k, v in data.get("attrs", {}).items():
                    if k in _MODULE_INTERNALS:
                        raise ArtifactError(f"{where}: attribute {k!r} may not be set")
                    if isinstance(v, dict) and "tensor_attr" in v:
                        object.__setattr__(m, k, self.tensor(v["tensor_attr"], where))
                    else:
                        object.__setattr__(m, k, _decode(v, where=f"{where}, attribute {k}"))
        for k, ref in data.get("parameters", {}).items():
            m._parameters[k] = None if ref is None else self.tensor(ref, where, True, ref["requires_grad"])
        for k, ref in data.get("buffers", {}).items():
            m._buffers[k] = None if ref is None else self.tensor(ref, where)
            if ref is not None and not ref["persistent"]:
                m._non_persistent_buffers_set.add(k)
        for k, ref in data.get("tensor_attrs", {}).items():
            object.__setattr__(m, k, self.tensor(ref, where))
        for k, c in data.get("children", {}).items():
            m._modules[k] = None if c is None else self.module(c, _join(path, k))
        if data.get("kind") == "graph_module":
            m.graph = _graph_from_json(data["graph"], where)  # the setter recompiles against the children set above
        return m


def _restore_training(m: nn.Module, data: dict) -> None:
    m.training = bool(data.get("training", False))
    for k, c in data.get("children", {}).items():
        if c is not None:
            _restore_training(m._modules[k], c)


def _strip_export_guards(gm: fx.GraphModule) -> fx.GraphModule:
    """torch.export's ``_guards_fn`` submodule is generated code (input-shape guards): drop its call."""
    for n in list(gm.graph.nodes):
        if n.op == "call_module" and type(gm.get_submodule(n.target)).__name__ == "GuardsFn" and not n.users:
            gm.graph.erase_node(n)
            gm.delete_submodule(n.target)
    gm.graph.lint()
    gm.recompile()
    return gm


def _json_meta(meta: dict) -> dict:
    out = {}
    for k, v in meta.items():
        if k == REPORT_KEY:
            continue
        try:
            json.dumps(v, allow_nan=False)
        except (TypeError, ValueError):
            continue
        out[k] = v
    return out


def _example_input_specs(gm: nn.Module, example_inputs) -> list[dict] | None:
    if example_inputs is not None:
        leaves = torch.utils._pytree.tree_leaves(tuple(example_inputs) if isinstance(example_inputs, (list, tuple))
                                                 else (example_inputs,))
        return [{"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                for t in leaves if isinstance(t, torch.Tensor)]
    if isinstance(gm, fx.GraphModule):
        specs = []
        for n in gm.graph.find_nodes(op="placeholder"):
            v = n.meta.get("val", n.meta.get("tensor_meta"))
            if v is None or not hasattr(v, "shape") or not all(isinstance(d, int) for d in v.shape):
                return None
            specs.append({"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")})
        return specs
    return None


# ----------------------------------------------------------------------------------------------------------
# Public API.

def save_artifact(gm: nn.Module, directory, *, example_inputs=None, extra: dict | None = None) -> Path:
    """Write ``gm`` to ``directory`` (created if needed) as data; ``gm`` itself is not changed.

    ``example_inputs`` (optional): their shapes/dtypes go to ``manifest["example_inputs"]`` so that tools can
    build inputs without being told; without it they are taken from the graph's placeholder metadata if known.
    """
    if not isinstance(gm, nn.Module):
        raise ValueError(f"save_artifact() needs a torch.nn.Module, got {type(gm).__name__}")
    _register_defaults()
    d = Path(directory)
    specs = _example_input_specs(gm, example_inputs)
    work = gm
    if isinstance(gm, fx.GraphModule) and any(type(m).__name__ == "GuardsFn" for m in gm.children()):
        work = fx.GraphModule(gm, copy.deepcopy(gm.graph))  # shares gm's submodules and tensors, copies the graph
        work.training = gm.training
        _strip_export_guards(work)
    writer = _TreeWriter()
    tree = writer.module(work, "")
    tensors: dict[str, torch.Tensor] = {}
    seen_ptr = set()
    for k, t in writer.tensors.items():
        t = t.detach().to("cpu").contiguous()
        if t.numel() and t.untyped_storage().data_ptr() in seen_ptr:
            t = t.clone()
        if t.numel():
            seen_ptr.add(t.untyped_storage().data_ptr())
        tensors[k] = t
    d.mkdir(parents=True, exist_ok=True)
    (d / GRAPH_FILE).write_text(json.dumps({"root": tree}, indent=None, allow_nan=False))
    save_file(tensors, str(d / WEIGHTS_FILE))
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "fxcompress_version": __import__("fxcompress").__version__,
        "torch_version": torch.__version__,
        "files": {f: _sha256(d / f) for f in (GRAPH_FILE, WEIGHTS_FILE)},
        "example_inputs": specs,
        "meta": _json_meta(getattr(gm, "meta", {}) if isinstance(gm, fx.GraphModule) else {}),
        "reports": [[name, rows] for name, rows in getattr(gm, "meta", {}).get(REPORT_KEY, [])]
        if isinstance(gm, fx.GraphModule) else [],
        "extra": extra or {},
    }
    (d / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return d


def _convert_hint(d: Path) -> str:
    return (f"{d} is a version-1 artifact, whose structure.pt is a pickle that can run code when loaded. "
            f"If you trust where it came from, convert it once: `fxcompress convert-artifact {d} NEW_DIR --trust` "
            "(or fxcompress.runtime.artifact_v1.convert_v1(old, new, trust=True)), then load NEW_DIR")


def parse_manifest_json(d: Path):
    """The JSON of ``d/manifest.json`` (any format version); ArtifactError if it is missing or not JSON."""
    mpath = d / "manifest.json"
    if not mpath.is_file():
        raise ArtifactError(f"{d} is not an fxcompress artifact: manifest.json is missing")
    try:
        return json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{mpath} is corrupt: {e}") from None


def read_manifest(directory) -> dict:
    """The parsed manifest.json of an artifact directory, after checking its format and version."""
    d = Path(directory)
    manifest = parse_manifest_json(d)
    mpath = d / "manifest.json"
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{mpath}: format is {manifest.get('format') if isinstance(manifest, dict) else None!r}, "
                            f"expected {FORMAT!r}")
    if manifest.get("format_version") == 1:
        raise ArtifactError(_convert_hint(d))
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{mpath}: format_version {manifest.get('format_version')!r} is not supported "
                            f"(this fxcompress reads version {FORMAT_VERSION}); upgrade fxcompress")
    return manifest


def check_files(d: Path, manifest: dict, names) -> None:
    files = manifest.get("files", {})
    for fname in names:
        p = d / fname
        if fname not in files:
            raise ArtifactError(f"artifact {d}: manifest lists no sha256 for {fname}")
        if not p.is_file():
            raise ArtifactError(f"artifact {d} is missing {fname}")
        if _sha256(p) != files[fname]:
            raise ArtifactError(f"artifact {d}: {fname} is corrupt or was changed (sha256 mismatch)")


def load_artifact(directory, map_location: str | torch.device = "cpu") -> fx.GraphModule:
    """Load an artifact written by :func:`save_artifact`, bit-exact, without running code from the files."""
    _register_defaults()
    d = Path(directory)
    manifest = read_manifest(d)
    check_files(d, manifest, (GRAPH_FILE, WEIGHTS_FILE))
    try:
        tree = json.loads((d / GRAPH_FILE).read_text())["root"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise ArtifactError(f"artifact {d}: {GRAPH_FILE} is not a valid graph file ({e})") from None
    try:
        tensors = load_file(str(d / WEIGHTS_FILE), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"artifact {d}: {WEIGHTS_FILE} is not a valid safetensors file ({e})") from None
    try:
        m = _TreeReader(tensors).module(tree, "")
    except ArtifactError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ArtifactError(f"artifact {d}: {GRAPH_FILE} is malformed ({type(e).__name__}: {e})") from None
    _restore_training(m, tree)
    if isinstance(m, fx.GraphModule):
        m.meta.update(manifest.get("meta", {}))
        m.meta[REPORT_KEY] = [(name, rows) for name, rows in manifest.get("reports", [])]
    return m


def example_inputs(directory, *, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random tensors with the shapes/dtypes stored in the manifest (ArtifactError if none were stored)."""
    d = Path(directory)
    specs = read_manifest(d).get("example_inputs")
    if not specs:
        raise ArtifactError(f"artifact {d} stores no example input shapes; pass them explicitly "
                            "(e.g. --input-shape 1,1,8,8) or re-save with save_artifact(..., example_inputs=...)")
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in specs:
        dt = getattr(torch, s["dtype"], None)
        if not isinstance(dt, torch.dtype):
            raise ArtifactError(f"artifact {d}: unknown example input dtype {s['dtype']!r}")
        out.append(torch.randn(s["shape"], generator=g).to(dt) if dt.is_floating_point
                   else torch.zeros(s["shape"], dtype=dt))
    return tuple(out)

