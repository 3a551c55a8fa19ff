"""The QDQ / MatMulNBits rewrite: each ``fxc::QuantWeightRef`` placeholder of the exported float graph becomes
integer initializers feeding ``DequantizeLinear`` (or one ``com.microsoft.MatMulNBits`` node per eligible linear).
See :mod:`.export` for the formats."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ...quant import QuantWeight
from .base import _MS, _PDOMAIN, _PLACEHOLDER, ExportError, _Site, default_accuracy_level

__all__ = ["rewrite_quant_weights"]


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


def matmulnbits_plan(site: _Site) -> tuple[int, int] | None:
    """``(container_bits, block_size)`` of the ``MatMulNBits`` node a linear lowers to, or None (QDQ form).

    Codes of 1..4 bits go in a 4-bit container, 5..8 bits in an 8-bit one (signed codes offset into the
    unsigned range, exactly).  Per-group weights use the largest power-of-two block (16..256) that divides
    the group, with the group's scale / zero point repeated over its blocks; per-channel / per-tensor ones
    a block of 128 (or the largest power of two <= K, at least 16).  Every choice is exact."""
    s = site.qw.spec
    if site.kind != "linear" or not 1 <= s.bits <= 8:
        return None
    k = site.qw.shape[1]
    if s.granularity == "per_group":
        g = s.group_size
        block = g & -g  # largest power of two dividing g
        if block < 16:
            return None
        block = min(block, 256)
    else:
        if k < 16:
            return None
        block = min(128, 1 << (k.bit_length() - 1))
    return (4 if s.bits <= 4 else 8), block


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


def _per_block(t: np.ndarray, site: _Site, k: int, block: int) -> np.ndarray:
    """(rows, groups) scale / zero point -> (N, blocks): each group's value repeated over its blocks."""
    n = site.qw.shape[0]
    nb = -(-k // block)
    t = np.broadcast_to(t, (n, t.shape[1]))
    if site.qw.spec.granularity == "per_group":
        return np.repeat(t, site.qw.spec.group_size // block, axis=1)
    return np.repeat(t[:, :1], nb, axis=1)


def _pack_rows(v: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned values along the last axis packed low-bits-first into uint8 (4 bits: two a byte, the row padded)."""
    v = v.astype(np.uint8)
    if bits == 8:
        return v
    if v.shape[-1] % 2:
        v = np.concatenate([v, np.zeros(v.shape[:-1] + (1,), np.uint8)], axis=-1)
    return (v[..., 0::2] | (v[..., 1::2] << 4)).astype(np.uint8)


def _matmulnbits_nodes(site: _Site, a: str, y: str, accuracy_level: int):
    """``com.microsoft.MatMulNBits`` replacing ``MatMul(a, W^T) -> y`` (see :func:`matmulnbits_plan`).

    Zero points that are integers in the container's range go in as uint8 (omitted when all equal the
    kernel's default ``2^(bits-1)``).  Fractional ones (L4Q's learned offsets) are split exactly into an
    integer zero point ``zi = clip(round(z))`` for the fused kernel and a float correction per group:
    ``W = s (q - zi) - s (z - zi)``, so ``y = MatMulNBits(a) + (a @ E) @ C`` with ``E`` the 0/1 [K, groups]
    group-sum matrix (one initializer per (K, group size), shared by every layer with that input width) and
    ``C = -(s (z - zi))^T`` [groups, N].  ONNX Runtime's CPU kernel has no fast path for float zero points
    (8-bit: unsupported; 4-bit: a dequantize-then-GEMM fallback, ~50x slower than fp32), hence the split."""
    qw, spec, p = site.qw, site.qw.spec, site.name.replace(".", "_") or "root"
    bits, block = matmulnbits_plan(site)
    n, k = qw.shape
    nb = -(-k // block)
    top = (1 << bits) - 1
    c = (1 << (bits - 1)) if spec.qmin < 0 else 0  # offset signed codes into [0, 2^bits - 1]
    u = qw.codes().numpy().astype(np.int64) + c
    if nb * block != k:
        u = np.concatenate([u, np.zeros((n, nb * block - k), np.int64)], axis=1)
    packed = _pack_rows(u.reshape(n, nb, block), bits)  # [N, blocks, block * bits / 8]
    scale = qw.scale.numpy().astype(np.float32)
    zp = qw.zero_point.numpy().astype(np.float64) + c  # (rows, groups)
    inits = [numpy_helper.from_array(packed, f"{p}.qweight"),
             _f32(f"{p}.scale", _per_block(scale, site, k, block).reshape(-1))]
    ins = [a, f"{p}.qweight", f"{p}.scale"]
    zi = np.clip(np.round(zp), 0, top)
    fractional = bool(np.any(zi != zp))
    if np.any(zi != (1 << (bits - 1))):
        zb = _per_block(zi, site, k, block).astype(np.uint8)
        inits.append(numpy_helper.from_array(_pack_rows(zb, bits).reshape(-1), f"{p}.zero_point"))
        ins.append(f"{p}.zero_point")
        zkind = "int"
    else:
        zkind = "none"
    level = int(accuracy_level)
    attrs = dict(K=k, N=n, bits=bits, block_size=block, accuracy_level=level)
    if not fractional:
        return [helper.make_node("MatMulNBits", ins, [y], name=f"{p}/MatMulNBits", domain=_MS, **attrs)], inits, \
            zkind, bits, block
    g = spec.group_size if spec.granularity == "per_group" else k
    groups = k // g
    corr = -(np.broadcast_to(scale, (n, scale.shape[1])).astype(np.float64) * (np.broadcast_to(zp, (n, zp.shape[1])) - zi))
    e_name = f"fxc.group_sum.K{k}.g{g}"
    e = np.zeros((k, groups), np.float32)
    e[np.arange(k), np.arange(k) // g] = 1.0
    inits += [_f32(e_name, e), _f32(f"{p}.zp_correction", corr.T)]  # [K, groups], [groups, N]
    t = f"{y}/{p}"  # intermediate names from the call's output: unique when a layer is called twice
    nodes = [helper.make_node("MatMulNBits", ins, [f"{t}.y_int"], name=f"{p}/MatMulNBits", domain=_MS, **attrs),
             helper.make_node("MatMul", [a, e_name], [f"{t}.group_sum"], name=f"{p}/GroupSum"),
             helper.make_node("MatMul", [f"{t}.group_sum", f"{p}.zp_correction"], [f"{t}.y_corr"],
                              name=f"{p}/ZeroPointCorrection"),
             helper.make_node("Add", [f"{t}.y_int", f"{t}.y_corr"], [y], name=f"{p}/AddCorrection")]
    return nodes, inits, "fractional_corrected", bits, block


def rewrite_quant_weights(model: onnx.ModelProto, sites: dict[str, _Site], opset: int, weight_format: str,
             low_bit_container: str, accuracy_level: int | None = None) -> list[dict]:
    graph = model.graph
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    new_nodes, new_inits, layers = [], [], []
    replaced = {}  # id(MatMul node) -> the MatMulNBits node(s) replacing it
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
            new_nodes += replaced[id(node)]
            continue
        if not (node.domain == _PDOMAIN and node.op_type == _PLACEHOLDER):
            new_nodes.append(node)
            continue
        name = next(a.s.decode() for a in node.attribute if a.name == "name")
        site = sites[name]
        out = node.output[0]
        users = consumers.get(out, [])
        first = name not in found
        if (weight_format == "matmulnbits" and matmulnbits_plan(site) and len(users) == 1
                and users[0].op_type == "MatMul" and users[0].domain == "" and list(users[0].input)[1] == out):
            mm = users[0]
            level = default_accuracy_level(matmulnbits_plan(site)[0]) if accuracy_level is None else accuracy_level
            mnodes, inits, zkind, cbits, block = _matmulnbits_nodes(site, mm.input[0], mm.output[0], level)
            add(mnodes, inits)
            replaced[id(mm)] = mnodes
            found.setdefault(name, "")
            if first:
                layers.append({"layer": name, "kind": site.kind, "format": "MatMulNBits",
                               "bits": site.qw.spec.bits, "granularity": site.qw.spec.granularity,
                               "zero_point": zkind, "container_bits": cbits, "block_size": block,
                               "accuracy_level": level})
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
