"""Lower an integer-weight graph (QuantLinear / QuantConv2d) to ONNX: MatMulNBits linears, DequantizeLinear weights.

How it works
------------
1. The float parts are exported by the TorchScript exporter (``torch.onnx.export(dynamo=False)``) on a
   deep copy of the model in which every ``QuantLinear`` / ``QuantConv2d`` is swapped for a float
   stand-in.  The stand-in's weight passes through a placeholder op ``fxc::QuantWeightRef`` that names
   the layer, so the rewritten graph never has to guess which initializer belongs to which layer.
   A linear stand-in computes ``MatMul(x, W^T) (+ bias)`` with ``W^T`` laid out ``[K, N]`` (in, out), the
   layout ONNX Runtime fuses into ``MatMulNBits``; a conv stand-in keeps ``[O, I, kh, kw]``.
2. The ONNX graph is rewritten with the ``onnx`` package.  The QDQ form (item 4): each placeholder becomes integer
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
3. ``weight_format="matmulnbits"`` (the default) emits ``com.microsoft.MatMulNBits`` directly for every
   linear it can hold exactly (:func:`.qdq.matmulnbits_plan`): 1..4-bit codes in a 4-bit container, 5..8-bit
   codes in an 8-bit one, per-group (power-of-two blocks of 16..256 dividing the group), per-channel and
   per-tensor scales (repeated over blocks of 128).  Fractional zero points (L4Q's learned LSQ+ offset) are
   split exactly into an integer zero point for the fused kernel plus a small float correction
   ``(x @ E) @ C`` per group, so L4Q models run the fused integer kernel too.  ``accuracy_level`` (None:
   :func:`.base.default_accuracy_level`, i.e. 4, int8 activations) is written on every node: it is what
   keeps 8-bit weights from the ~20x-slower-than-fp32 fallback of level 0 on CPU.  Linears it cannot hold
   (a group size not a multiple of 16, K < 16) and every conv fall back to the QDQ form below.
4. ``weight_format="qdq"`` (and the fallback): each placeholder becomes integer initializers feeding
   ``DequantizeLinear``; ONNX Runtime fuses DequantizeLinear + MatMul into MatMulNBits itself at the
   accuracy level of its session (``OrtRunner(matmulnbits_accuracy_level=...)``; ORT's default is 4).
   Fractional zero points are not representable as ONNX integer zero points: they are handled exactly,
   never rounded, by ``DequantizeLinear`` with zero point 0 and an ``Add`` of the offset ``-zero_point *
   scale`` (per-group offsets broadcast through a ``Reshape`` to ``[K/g, g, N]`` and back); such layers do
   not fuse and run as float MatMul.

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
from pathlib import Path

import onnx
import torch
import torch.nn.functional as F
from onnx import helper
from torch import nn

from ...nn import QuantConv2d, QuantLinear
from ...passes.program import materialize_quant_modules
from .base import (_MS, _PDOMAIN, _PLACEHOLDER, ACCURACY_LEVELS, MIN_OPSET, TORCH_MAX_OPSET, WEIGHT_FORMATS,
                   ExportError, _Site)
from .qdq import rewrite_quant_weights

__all__ = ["export_onnx", "ExportError", "layer_formats"]


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


def export_onnx(gm: nn.Module, example_inputs, path, opset: int = 21, weight_format: str = "matmulnbits", *,
                dynamic_batch: bool = True, dynamic_axes: dict | None = None, input_names=None, output_names=None,
                low_bit_container: str = "int4", accuracy_level: int | None = None, check: bool = True) -> Path:
    """Write ``gm`` (a GraphModule or any nn.Module with QuantLinear / QuantConv2d layers) to ``path``.

    ``weight_format``: "matmulnbits" (the default: MatMulNBits for every linear it holds exactly, QDQ for the
    rest) or "qdq" (integer initializers + DequantizeLinear everywhere).  ``dynamic_batch`` makes dim 0 of every input and output
    symbolic; ``dynamic_axes`` (``{name: {dim: "label"}}``, torch.onnx's form, names as in ``input_names`` /
    ``output_names``, default ``x``-style placeholder names and ``output``) replaces that, e.g. to make a
    sequence dimension symbolic too.  ``accuracy_level`` goes on emitted MatMulNBits nodes (0: fp32 compute, 4: int8 activations; None:
    :func:`~fxcompress.backends.onnx.base.default_accuracy_level`, 4, never slower than fp32 on CPU).
    Returns the path written.  Per-layer formats are stored in the model's metadata
    (``fxcompress.layers``, read them with :func:`layer_formats`).
    """
    gm = materialize_quant_modules(gm)  # ExportedProgram / fxcompress:: op nodes -> QuantLinear modules
    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"weight_format must be one of {WEIGHT_FORMATS}, got {weight_format!r}")
    if accuracy_level is not None and (isinstance(accuracy_level, bool) or accuracy_level not in ACCURACY_LEVELS):
        raise ValueError(f"accuracy_level must be None (the per-format default) or 0..4, got {accuracy_level!r}")
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
    layers = rewrite_quant_weights(model, {s.name: s for s in sites}, opset, weight_format, low_bit_container, accuracy_level)

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
