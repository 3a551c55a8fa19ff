"""Lower an integer-weight graph (QuantLinear / QuantConv2d) to ONNX with DequantizeLinear weights.

How it works
------------
1. The float parts are exported by the TorchScript exporter (``torch.onnx.export(dynamo=False)``) on a
   deep copy of the model in which every ``QuantLinear`` / ``QuantConv2d`` is swapped for a float
   stand-in.  The stand-in's weight passes through a placeholder op ``fxc::QuantWeightRef`` that names
   the layer, so the rewritten graph never has to guess which initializer belongs to which layer.
   A linear stand-in computes ``MatMul(x, W^T) (+ bias)`` with ``W^T`` laid out ``[K, N]`` (in, out), the
   layout ONNX Runtime fuses into ``MatMulNBits``; a conv stand-in keeps ``[O, I, kh, kw]``.
2. The ONNX graph is rewritten with the ``onnx`` package: each placeholder becomes integer
   initializers feeding ``DequantizeLinear`` (opset >= 21 for int4 / blocked scales):

   ============  ==========================================  ====================================
   granularity   linear (weight ``[K, N]``)                   conv (weight ``[O, I, kh, kw]``)
   ============  ==========================================  ====================================
   per_tensor    scalar scale / zero point                    scalar scale / zero point
   per_channel   ``axis=1``, scale ``[N]``                     ``axis=0``, scale ``[O]``
   per_group     ``axis=0, block_size=g``, scale ``[K/g, N]``  (not a QuantConv2d format)
   ============  ==========================================  ====================================

   Code containers: 8-bit codes are INT8 (symmetric) / UINT8 (asymmetric); 2-, 3- and 4-bit codes
   are INT4 / UINT4 (two codes a byte, so 2/3-bit weights cost 4 bits in the file: ONNX has no
   narrower type that ONNX Runtime reads).  ``low_bit_container="int8"`` stores them as INT8/UINT8
   instead.  Symmetric weights omit the zero point (it is 0).
3. Fractional zero points (L4Q's learned LSQ+ offset) are not representable as ONNX integer zero
   points.  They are handled exactly, never rounded: ``DequantizeLinear`` runs with zero point 0 and
   an ``Add`` of the per-channel / per-group offset ``-zero_point * scale`` follows (per-group offsets
   broadcast through a ``Reshape`` to ``[K/g, g, N]`` and back).  Such layers therefore do not fuse
   into ``MatMulNBits``; ``weight_format="matmulnbits"`` does fuse them, with float zero points.
4. ``weight_format="matmulnbits"`` emits ``com.microsoft.MatMulNBits`` (bits=4) directly for every
   per-group linear of at most 4 bits whose group size is a power of two >= 16 (2/3-bit codes are
   offset into the 4-bit range, exactly); other layers fall back to the QDQ form above.

``opset`` below 21 with any sub-8-bit or per-group weight raises :class:`ExportError` (no silent
fallback to int8: pass ``low_bit_container="int8"`` to choose it, per-group still needs 21).  The result
passes ``onnx.checker.check_model(full_check=True)``; the source module is never changed.
"""
from __future__ import annotations

import copy
import io
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from ..nn import QuantConv2d, QuantLinear
from ..quant import QuantWeight

__all__ = ["export_onnx", "ExportError", "layer_formats", "cli_export", "add_export_args"]

WEIGHT_FORMATS = ("qdq", "matmulnbits")
MIN_OPSET = 13  # DequantizeLinear with axis
TORCH_MAX_OPSET = 20  # the TorchScript exporter's ceiling; the graph is relabelled up to `opset`
_PLACEHOLDER = "QuantWeightRef"
_PDOMAIN = "fxc"
_MS = "com.microsoft"


class ExportError(ValueError):
    """The model cannot be lowered to ONNX as asked; the message names the layer / node and why."""


# ----------------------------------------------------------------------------------------------------------
# stand-ins used during the torch export


class _WeightRef(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, name):  # noqa: ARG004
        return w

    @staticmethod
    def symbolic(g, w, name):
        out = g.op(f"{_PDOMAIN}::{_PLACEHOLDER}", w, name_s=name)
        out.setType(w.type())
        return out


class _LinearStandIn(nn.Module):
    def __init__(self, name: str, q: QuantLinear):
        super().__init__()
        self.ref = name
        self.wT = nn.Parameter(q.dequantized_weight(torch.float32).t().contiguous(), requires_grad=False)
        self.bias = None if q.bias is None else nn.Parameter(q.bias.detach().float().clone(), requires_grad=False)

    def forward(self, x):
        y = torch.matmul(x, _WeightRef.apply(self.wT, self.ref))
        return y if self.bias is None else y + self.bias


class _ConvStandIn(nn.Module):
    def __init__(self, name: str, q: QuantConv2d):
        super().__init__()
        self.ref = name
        self.weight = nn.Parameter(q.dequantized_weight(torch.float32), requires_grad=False)
        self.bias = None if q.bias is None else nn.Parameter(q.bias.detach().float().clone(), requires_grad=False)
        self.stride, self.padding, self.dilation, self.groups = q.stride, q.padding, q.dilation, q.groups

    def forward(self, x):
        return F.conv2d(x, _WeightRef.apply(self.weight, self.ref), self.bias, self.stride, self.padding,
                        self.dilation, self.groups)


@dataclass
class _Site:
    name: str
    kind: str  # "linear" | "conv"
    qw: QuantWeight


def _quant_sites(model: nn.Module) -> list[_Site]:
    sites = []
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            sites.append(_Site(name, "linear", m.quant_weight))
        elif isinstance(m, QuantConv2d):
            sites.append(_Site(name, "conv", m.quant_weight))
        elif hasattr(type(m), "quant_weight") or "qweight" in getattr(m, "_buffers", {}):
            raise ExportError(f"layer {name!r} ({type(m).__name__}) holds an integer weight but the ONNX backend "
                              "only lowers QuantLinear and QuantConv2d; convert it first (e.g. convert_l4q)")
    return sites


def _set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, attr, new)


# ----------------------------------------------------------------------------------------------------------
# integer tensors


def _container(qw: QuantWeight, low_bit_container: str) -> int:
    signed = qw.spec.qmin < 0
    if qw.spec.bits == 8 or low_bit_container == "int8":
        return TensorProto.INT8 if signed else TensorProto.UINT8
    return TensorProto.INT4 if signed else TensorProto.UINT4


_RANGE = {TensorProto.INT8: (-128, 127), TensorProto.UINT8: (0, 255), TensorProto.INT4: (-8, 7),
          TensorProto.UINT4: (0, 15)}


def _int_tensor(name: str, values: np.ndarray, dtype: int) -> TensorProto:
    """An integer initializer; 4-bit types are packed two a byte, low nibble first (ONNX's layout)."""
    values = np.asarray(values)
    dims = list(values.shape)
    if dtype in (TensorProto.INT4, TensorProto.UINT4):
        flat = (values.reshape(-1).astype(np.int64) & 0xF).astype(np.uint8)
        if flat.size % 2:
            flat = np.concatenate([flat, np.zeros(1, np.uint8)])
        raw = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()
        return helper.make_tensor(name, dtype, dims, vals=raw, raw=True)
    np_dtype = np.int8 if dtype == TensorProto.INT8 else np.uint8
    return numpy_helper.from_array(values.astype(np_dtype), name)


def _f32(name: str, values) -> TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype=np.float32), name)


def _i64(name: str, values) -> TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)


def _zp_representable(qw: QuantWeight, dtype: int) -> bool:
    if not qw.zero_point_is_integer:
        return False
    lo, hi = _RANGE[dtype]
    zp = qw.zero_point
    return bool(zp.min() >= lo and zp.max() <= hi)


def _is_pow2(v: int) -> bool:
    return v > 0 and (v & (v - 1)) == 0


def _matmulnbits_ok(site: _Site) -> bool:
    s = site.qw.spec
    return (site.kind == "linear" and s.granularity == "per_group" and s.bits <= 4 and _is_pow2(s.group_size)
            and s.group_size >= 16)


# ----------------------------------------------------------------------------------------------------------
# graph rewriting


def _dq_nodes(site: _Site, out: str, opset: int, low_bit_container: str):
    """Nodes + initializers computing the float weight ``out`` from integer codes."""
    qw, spec, p = site.qw, site.qw.spec, site.name.replace(".", "_") or "root"
    codes = qw.codes().numpy()
    scale = qw.scale.numpy().astype(np.float32)  # (rows, groups)
    zp = qw.zero_point.numpy().astype(np.float64)
    dtype = _container(qw, low_bit_container)
    attrs = {}
    if site.kind == "linear":
        codes = codes.T  # [K, N]
        if spec.granularity == "per_tensor":
            s_arr, z_arr = scale.reshape(()), zp.reshape(())
        elif spec.granularity == "per_channel":
            s_arr, z_arr, attrs = scale[:, 0], zp[:, 0], {"axis": 1}
        else:
            s_arr, z_arr = scale.T, zp.T  # [K/g, N]
            attrs = {"axis": 0, "block_size": spec.group_size}
    else:
        if spec.granularity == "per_tensor":
            s_arr, z_arr = scale.reshape(()), zp.reshape(())
        else:
            s_arr, z_arr, attrs = scale[:, 0], zp[:, 0], {"axis": 0}
    inits = [_int_tensor(f"{p}.qweight", codes, dtype), _f32(f"{p}.scale", s_arr)]
    dq_in = [f"{p}.qweight", f"{p}.scale"]
    exact_zp = _zp_representable(qw, dtype)
    if exact_zp and np.any(z_arr != 0):
        inits.append(_int_tensor(f"{p}.zero_point", z_arr.astype(np.int64), dtype))
        dq_in.append(f"{p}.zero_point")
    if exact_zp:
        return [helper.make_node("DequantizeLinear", dq_in, [out], name=f"{p}/DequantizeLinear", **attrs)], inits, \
            "int" if np.any(z_arr != 0) else "none"
    # fractional (or out-of-range) zero point: DQ with zero point 0, then add -zp*scale exactly
    off = (-z_arr * s_arr.astype(np.float64)).astype(np.float32)
    dq_out = f"{p}.w_nozp"
    nodes = [helper.make_node("DequantizeLinear", dq_in, [dq_out], name=f"{p}/DequantizeLinear", **attrs)]
    if site.kind == "linear" and spec.granularity == "per_group":
        k, n = codes.shape
        g = spec.group_size
        inits += [_f32(f"{p}.offset", off.reshape(k // g, 1, n)), _i64(f"{p}.shape3", [k // g, g, n]),
                  _i64(f"{p}.shape2", [k, n])]
        nodes += [helper.make_node("Reshape", [dq_out, f"{p}.shape3"], [f"{p}.w3"], name=f"{p}/Reshape3"),
                  helper.make_node("Add", [f"{p}.w3", f"{p}.offset"], [f"{p}.w3z"], name=f"{p}/AddOffset"),
                  helper.make_node("Reshape", [f"{p}.w3z", f"{p}.shape2"], [out], name=f"{p}/Reshape2")]
    else:
        if site.kind == "conv" and spec.granularity == "per_channel":
            off = off.reshape(-1, 1, 1, 1)
        inits.append(_f32(f"{p}.offset", off))
        nodes.append(helper.make_node("Add", [dq_out, f"{p}.offset"], [out], name=f"{p}/AddOffset"))
    return nodes, inits, "float_offset"


def _matmulnbits_node(site: _Site, a: str, y: str, accuracy_level: int = 0):
    """``com.microsoft.MatMulNBits`` (bits=4) replacing ``MatMul(a, W^T) -> y``."""
    qw, spec, p = site.qw, site.qw.spec, site.name.replace(".", "_") or "root"
    n, k = qw.shape
    g = spec.group_size
    groups = k // g
    c = 8 if spec.qmin < 0 else 0  # offset signed codes into [0, 15]; the zero point moves with them
    u = qw.codes().numpy().astype(np.int64) + c
    flat = u.reshape(n, groups, g).astype(np.uint8)
    packed = (flat[..., 0::2] | (flat[..., 1::2] << 4)).astype(np.uint8)  # [N, groups, g/2]
    zp = qw.zero_point.numpy().astype(np.float64) + c  # (N, groups)
    inits = [numpy_helper.from_array(packed, f"{p}.qweight"),
             _f32(f"{p}.scale", qw.scale.numpy().reshape(-1))]
    ins = [a, f"{p}.qweight", f"{p}.scale"]
    if qw.zero_point_is_integer and zp.min() >= 0 and zp.max() <= 15:
        zkind = "none" if np.all(zp == 8) else "int"
        if zkind == "int":
            z = zp.astype(np.uint8)
            if groups % 2:
                z = np.concatenate([z, np.zeros((n, 1), np.uint8)], axis=1)
            zpk = (z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8).reshape(-1)
            inits.append(numpy_helper.from_array(zpk, f"{p}.zero_point"))
            ins.append(f"{p}.zero_point")
    else:
        zkind = "float"
        inits.append(_f32(f"{p}.zero_point", zp.reshape(-1)))
        ins.append(f"{p}.zero_point")
    node = helper.make_node("MatMulNBits", ins, [y], name=f"{p}/MatMulNBits", domain=_MS, K=k, N=n, bits=4,
                            block_size=g, accuracy_level=int(accuracy_level))
    return node, inits, zkind


def _rewrite(model: onnx.ModelProto, sites: dict[str, _Site], opset: int, weight_format: str,
             low_bit_container: str, accuracy_level: int = 0) -> list[dict]:
    graph = model.graph
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    new_nodes, new_inits, layers = [], [], []
    replaced = {}  # id(MatMul node) -> MatMulNBits node
    found: dict[str, str] = {}  # layer -> the float-weight tensor of its first use (QDQ form)
    init_names: set[str] = set()
    node_names: dict[str, int] = {}

    def add(nodes, inits):
        for n in nodes:  # a layer called more than once gets suffixed node names, one set of initializers
            k = node_names.get(n.name, 0)
            node_names[n.name] = k + 1
            if k:
                n.name = f"{n.name}_{k}"
        new_inits.extend(t for t in inits if t.name not in init_names)
        init_names.update(t.name for t in inits)

    for node in graph.node:
        if id(node) in replaced:
            new_nodes.append(replaced[id(node)])
            continue
        if not (node.domain == _PDOMAIN and node.op_type == _PLACEHOLDER):
            new_nodes.append(node)
            continue
        name = next(a.s.decode() for a in node.attribute if a.name == "name")
        site = sites[name]
        out = node.output[0]
        users = consumers.get(out, [])
        first = name not in found
        if (weight_format == "matmulnbits" and _matmulnbits_ok(site) and len(users) == 1
                and users[0].op_type == "MatMul" and users[0].domain == "" and list(users[0].input)[1] == out):
            mm = users[0]
            mnode, inits, zkind = _matmulnbits_node(site, mm.input[0], mm.output[0], accuracy_level)
            add([mnode], inits)
            replaced[id(mm)] = mnode
            found.setdefault(name, "")
            if first:
                layers.append({"layer": name, "kind": site.kind, "format": "MatMulNBits",
                               "bits": site.qw.spec.bits, "granularity": site.qw.spec.granularity,
                               "zero_point": zkind})
            continue
        if found.get(name):  # the layer's weight was already dequantized once: reuse it
            ident = helper.make_node("Identity", [found[name]], [out], name=f"{name}/Reuse")
            add([ident], [])
            new_nodes.append(ident)
            continue
        nodes, inits, zkind = _dq_nodes(site, out, opset, low_bit_container)
        add(nodes, inits)
        new_nodes += nodes
        found[name] = out
        if first:
            dtype = _container(site.qw, low_bit_container)
            layers.append({"layer": name, "kind": site.kind, "format": "DequantizeLinear",
                           "container": TensorProto.DataType.Name(dtype), "bits": site.qw.spec.bits,
                           "granularity": site.qw.spec.granularity, "zero_point": zkind})
    missing = set(sites) - set(found)
    if missing:
        raise ExportError(f"quantized layers {sorted(missing)} were not reached by the export trace "
                          "(unused in forward?)")
    del graph.node[:]
    graph.node.extend(new_nodes)
    graph.initializer.extend(new_inits)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return layers


# ----------------------------------------------------------------------------------------------------------
# errors from the torch exporter, mapped back to graph nodes


def _explain(e: Exception, model: nn.Module, opset: int) -> ExportError:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    m = re.search(r"operator '([\w:.]+)'", str(e))
    where = ""
    if m and isinstance(model, torch.fx.GraphModule):
        op = m.group(1).split("::")[-1]
        hits = []
        for n in model.graph.nodes:
            if n.op not in ("call_function", "call_method", "call_module"):
                continue
            if n.op == "call_function":
                try:
                    tname = torch.fx.node._get_qualified_name(n.target)
                except Exception:  # noqa: BLE001
                    tname = str(n.target)
            else:
                tname = str(n.target)
            if op in tname.replace("::", ".").split("."):
                hits.append(f"{n.name!r} ({n.op} {tname})")
        if hits:
            where = f"graph node {', '.join(hits)}: "
    if m:
        return ExportError(f"{where}operator {m.group(1)!r} cannot be lowered to ONNX opset {opset} (the float "
                           f"graph is exported at opset {min(opset, TORCH_MAX_OPSET)} by torch's TorchScript "
                           f"exporter, which has no conversion for it): {msg}")
    return ExportError(f"torch.onnx export failed: {type(e).__name__}: {msg}")


# ----------------------------------------------------------------------------------------------------------


def _as_tuple(example_inputs) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs)
    raise ExportError(f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}")


def _default_input_names(model, n: int) -> list[str]:
    if isinstance(model, torch.fx.GraphModule):
        names = [node.name for node in model.graph.nodes if node.op == "placeholder"]
        if len(names) == n:
            return names
    return [f"input_{i}" for i in range(n)]


def export_onnx(gm: nn.Module, example_inputs, path, opset: int = 21, weight_format: str = "qdq", *,
                dynamic_batch: bool = True, dynamic_axes: dict | None = None, input_names=None, output_names=None,
                low_bit_container: str = "int4", accuracy_level: int = 0, check: bool = True) -> Path:
    """Write ``gm`` (a GraphModule or any nn.Module with QuantLinear / QuantConv2d layers) to ``path``.

    ``weight_format``: "qdq" (integer initializers + DequantizeLinear) or "matmulnbits" (MatMulNBits for
    per-group <= 4-bit linears, QDQ for the rest).  ``dynamic_batch`` makes dim 0 of every input and output
    symbolic; ``dynamic_axes`` (``{name: {dim: "label"}}``, torch.onnx's form, names as in ``input_names`` /
    ``output_names``, default ``x``-style placeholder names and ``output``) replaces that, e.g. to make a
    sequence dimension symbolic too.  ``accuracy_level`` goes on emitted MatMulNBits nodes (0: fp32 compute, 4: int8 activations).
    Returns the path written.  Per-layer formats are stored in the model's metadata
    (``fxcompress.layers``, read them with :func:`layer_formats`).
    """
    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"weight_format must be one of {WEIGHT_FORMATS}, got {weight_format!r}")
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise ValueError(f"accuracy_level must be 0..4, got {accuracy_level!r}")
    if low_bit_container not in ("int4", "int8"):
        raise ValueError(f"low_bit_container must be 'int4' or 'int8', got {low_bit_container!r}")
    max_opset = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= max_opset:
        raise ValueError(f"opset must be an int in [{MIN_OPSET}, {max_opset}], got {opset!r}")
    if not isinstance(gm, nn.Module):
        raise ExportError(f"export_onnx needs a torch.nn.Module, got {type(gm).__name__}")
    args = _as_tuple(example_inputs)
    if not all(isinstance(a, torch.Tensor) for a in args):
        raise ExportError("export_onnx: every example input must be a torch.Tensor")

    work = copy.deepcopy(gm).cpu().eval()  # the source module is never touched
    sites = _quant_sites(work)
    if opset < 21:
        for s in sites:
            if s.qw.spec.granularity == "per_group":
                raise ExportError(f"layer {s.name!r}: per-group scales need blocked DequantizeLinear (opset >= 21), "
                                  f"got opset={opset}")
            if s.qw.spec.bits < 8 and low_bit_container == "int4":
                raise ExportError(f"layer {s.name!r}: {s.qw.spec.bits}-bit weights are stored as int4, which needs "
                                  f"opset >= 21 (got opset={opset}); use opset=21 or low_bit_container='int8' "
                                  "(1 byte per weight)")
    for s in sites:
        q = work.get_submodule(s.name)
        _set_submodule(work, s.name, _LinearStandIn(s.name, q) if s.kind == "linear" else _ConvStandIn(s.name, q))

    n_in = len(args)
    in_names = list(input_names) if input_names else _default_input_names(gm, n_in)
    with torch.no_grad():
        ref = work(*args)
    n_out = len([t for t in torch.utils._pytree.tree_leaves(ref) if isinstance(t, torch.Tensor)])
    out_names = list(output_names) if output_names else (["output"] if n_out == 1 else
                                                          [f"output_{i}" for i in range(n_out)])
    dyn = {nm: {0: "batch"} for nm in in_names + out_names} if dynamic_batch else None
    if dynamic_axes is not None:
        unknown = set(dynamic_axes) - set(in_names + out_names)
        if unknown:
            raise ValueError(f"dynamic_axes names {sorted(unknown)} are not among inputs {in_names} / outputs "
                             f"{out_names}")
        dyn = {k: dict(v) if isinstance(v, dict) else {int(i): f"{k}_dim{i}" for i in v}
               for k, v in dynamic_axes.items()}
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(work, args, buf, dynamo=False, opset_version=min(opset, TORCH_MAX_OPSET),
                              input_names=in_names, output_names=out_names, dynamic_axes=dyn,
                              custom_opsets={_PDOMAIN: 1} if sites else None, do_constant_folding=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the node named
        raise _explain(e, gm, opset) from e
    model = onnx.load_from_string(buf.getvalue())
    layers = _rewrite(model, {s.name: s for s in sites}, opset, weight_format, low_bit_container, accuracy_level)

    opsets = {o.domain: o.version for o in model.opset_import if o.domain not in (_PDOMAIN,)}
    opsets[""] = opset
    if any(n.domain == _MS for n in model.graph.node):
        opsets[_MS] = 1
    del model.opset_import[:]
    model.opset_import.extend(helper.make_opsetid(d, v) for d, v in opsets.items())
    model.ir_version = max(model.ir_version, 10 if opset >= 21 else model.ir_version)
    model.producer_name = "fxcompress"
    model.producer_version = __import__("fxcompress").__version__
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, {"fxcompress.layers": json.dumps(layers),
                                        "fxcompress.weight_format": weight_format})
    if check:
        try:
            onnx.checker.check_model(model, full_check=True)
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"the exported graph fails onnx.checker: {e}") from e
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if model.ByteSize() > 1_800_000_000:
        onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data")
    else:
        onnx.save(model, str(path))
    return path


def layer_formats(path) -> list[dict]:
    """The per-layer lowering record that :func:`export_onnx` stored in the model's metadata."""
    model = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    return json.loads(props.get("fxcompress.layers", "[]"))


# ----------------------------------------------------------------------------------------------------------
# command line


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise ValueError(f"--input-shape must look like 1,3,224,224, got {text!r}") from None


def add_export_args(p) -> None:
    """Arguments of ``fxcompress export DIR --format onnx --out model.onnx``."""
    p.add_argument("dir", help="artifact directory written by fxcompress (save / quantize)")
    p.add_argument("--format", default="onnx", choices=["onnx", "tvm"], help="target format")
    p.add_argument("--out", required=True, help="output path (.onnx, or .so for --format tvm)")
    p.add_argument("--input-shape", action="append", default=None,
                   help="shape of an example input, e.g. 1,1,8,8 (repeat for several inputs; default: the "
                        "artifact's manifest extra.input_shapes)")
    p.add_argument("--opset", type=int, default=21)
    p.add_argument("--weight-format", default="qdq", choices=list(WEIGHT_FORMATS))
    p.add_argument("--static-batch", action="store_true", help="keep the batch dimension fixed")


def cli_export(args) -> int:
    import fxcompress as fxc
    from fxcompress.runtime.artifact import read_manifest

    gm = fxc.load_artifact(args.dir)
    shapes = [_parse_shape(s) for s in args.input_shape] if args.input_shape else \
        [tuple(s["shape"]) for s in read_manifest(args.dir).get("example_inputs") or []] or \
        [tuple(s) for s in read_manifest(args.dir).get("extra", {}).get("input_shapes", [])]
    if not shapes:
        raise ValueError("no example input shape: pass --input-shape (e.g. --input-shape 1,1,8,8)")
    inputs = tuple(torch.randn(*s) for s in shapes)
    path = export_onnx(gm, inputs, args.out, opset=args.opset, weight_format=args.weight_format,
                       dynamic_batch=not args.static_batch)
    from fxcompress.runtime.ort import load_ort
    from fxcompress.runtime.runner import check_parity

    rep = check_parity(gm, load_ort(path), inputs)
    print(f"wrote {path} ({path.stat().st_size} bytes, opset {args.opset}, {args.weight_format})")
    for row in layer_formats(path):
        print(f"  {row['layer']:<32} {row['format']:<17} {row.get('container', ''):<6} bits={row['bits']} "
              f"{row['granularity']} zp={row['zero_point']}")
    print(rep)
    return 0
