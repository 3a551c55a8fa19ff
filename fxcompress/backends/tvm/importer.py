"""Import of a model with QuantLinear / QuantConv2d layers into a Relax ``IRModule``.

A deep copy of the model is made in which every ``QuantLinear`` becomes a stub that calls the opaque custom op
``fxc_tvm::quant_linear(x, site, out_features)`` (a ``torch.library`` op with a fake implementation, so
``torch.export`` keeps it as one node), every ``QuantConv2d`` a stub calling ``fxc_tvm::int_conv2d(x, site)``, and
(in a GraphModule) every ``torch.fake_quantize_per_tensor_affine`` node (the activation quantizers of
:func:`fxcompress.passes.activations.quantize_activations`) the op ``fxc_tvm::act_fake_quant``.  The float parts go
through ``torch.export`` and ``tvm.relax.frontend.torch.from_exported_program``; the custom ops are converted by
``custom_convert_map`` entries (TVM 0.27 signature ``fn(node, importer) -> relax.Var``) that emit the packed linear
(:mod:`.emit`), the integer convolution and the activation quantizer (:mod:`.emit_conv`): **convolution weights
stay int8 constants**; a conv whose input is a quantized activation runs int8 x int8 -> int32.

A cached LM step may also carry the op ``fxc_lm::decode_attention`` (put there by
:func:`fxcompress.lm.attention.with_fused_decode_attention` for one-token steps whose caches are donated): it is
lowered to ONE kernel, :func:`.kernels.decode_attention.decode_attention_primfunc`, called with
``call_tir_inplace`` (the caches are written in place, the attention output is a new tensor), or, when the shape
has few blocks (:func:`.kernels.decode_attention.attention_splits`), to two: that kernel over splits of the cache
slots (writing the caches and each split's partial softmax state) and a combine kernel.  Its caches must be
donated inputs (``donate``) read by nothing else.
"""
from __future__ import annotations

import copy
import re

import torch
import torch.nn.functional as F
from torch import nn

from ...nn import QuantConv2d, QuantLinear
from ...passes.program import materialize_quant_modules
from .base import TVMBackendError, require_tvm
from .config import TVMBuildConfig
from .emit import DEFAULT_CONFIG, LayerInfo, emit_quant_linear
from .emit_conv import convert_float_convolution, emit_act_quant, emit_quant_conv
from .emit_norm import convert_batch_norm_no_training

__all__ = ["lower_to_relax"]


_ACTIVE: dict[int, QuantLinear] = {}


@torch.library.custom_op("fxc_tvm::quant_linear", mutates_args=())
def _quant_linear_op(x: torch.Tensor, site: int, out_features: int) -> torch.Tensor:
    mod = _ACTIVE.get(site)
    if mod is None:
        raise RuntimeError(f"fxc_tvm::quant_linear site {site} is not registered (only used during lowering)")
    return mod(x).clone()


@_quant_linear_op.register_fake
def _(x, site, out_features):
    return x.new_empty((*x.shape[:-1], out_features))


_OP_NAME = "quant_linear.default"


class _QuantLinearStub(nn.Module):
    def __init__(self, site: int, q: QuantLinear):
        super().__init__()
        self.site, self.out_features = site, q.out_features

    def forward(self, x):
        return torch.ops.fxc_tvm.quant_linear(x, self.site, self.out_features)


_ACTIVE_CONV: dict[int, QuantConv2d] = {}


@torch.library.custom_op("fxc_tvm::int_conv2d", mutates_args=())
def _int_conv2d_op(x: torch.Tensor, site: int) -> torch.Tensor:
    mod = _ACTIVE_CONV.get(site)
    if mod is None:
        raise RuntimeError(f"fxc_tvm::int_conv2d site {site} is not registered (only used during lowering)")
    return mod(x).clone()


@_int_conv2d_op.register_fake
def _(x, site):
    q = _ACTIVE_CONV[site]
    return F.conv2d(x, x.new_empty(tuple(q.weight_shape)), None, q.stride, q.padding, q.dilation, q.groups)


@torch.library.custom_op("fxc_tvm::act_fake_quant", mutates_args=())
def _act_fake_quant_op(x: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int) -> torch.Tensor:
    return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, qmin, qmax)


@_act_fake_quant_op.register_fake
def _(x, scale, zero_point, qmin, qmax):
    return torch.empty_like(x)


_CONV_OP, _ACT_OP = "int_conv2d.default", "act_fake_quant.default"
_ATTENTION_OP = "decode_attention.default"  # fxc_lm::decode_attention (fxcompress.lm.attention)
_FAKE_QUANT_TARGETS = (torch.fake_quantize_per_tensor_affine, torch.ops.aten.fake_quantize_per_tensor_affine.default)


class _QuantConvStub(nn.Module):
    def __init__(self, site: int):
        super().__init__()
        self.site = site

    def forward(self, x):
        return torch.ops.fxc_tvm.int_conv2d(x, self.site)


def _mark_act_quant(m: nn.Module) -> None:
    """In a GraphModule, per-tensor fake-quant nodes (static scale / zero point) -> ``fxc_tvm::act_fake_quant``, so
    they reach the converter as one op (torch.export would decompose them) and integer convs can read their codes."""
    import torch.fx as fx

    if not isinstance(m, fx.GraphModule):
        return
    changed = False
    for n in m.graph.nodes:
        if n.op == "call_function" and n.target in _FAKE_QUANT_TARGETS and len(n.args) == 5 and not n.kwargs \
                and all(isinstance(a, (int, float)) for a in n.args[1:]):
            n.target = torch.ops.fxc_tvm.act_fake_quant
            n.args = (n.args[0], float(n.args[1]), int(n.args[2]), int(n.args[3]), int(n.args[4]))
            changed = True
    if changed:
        m.recompile()


def _set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, attr, new)


def _convert_addmm(node, importer):
    """``aten.addmm`` (a float ``nn.Linear`` with bias on 2-D input) with the product in the inputs' dtype.

    TVM 0.27's converter always emits an fp32 matmul and then adds the bias in its own dtype, which fails for an
    fp16 model ("Binary operators must have the same datatype").  Here the product still accumulates in fp32 and
    is cast back before the bias is added."""
    from tvm import relax

    bb = importer.block_builder
    bias, a, b = (importer.env[node.args[i]] for i in range(3))
    alpha, beta = node.kwargs.get("alpha", 1), node.kwargs.get("beta", 1)
    dt = str(a.ty.dtype)
    res = bb.emit(relax.op.matmul(a, b, out_dtype="float32"))
    if alpha != 1:
        res = bb.emit(relax.op.multiply(res, relax.const(alpha, "float32")))
    if dt != "float32":
        res = bb.emit(relax.op.astype(res, dt))
    if beta == 0:
        return res
    if beta != 1:
        bias = bb.emit(relax.op.multiply(bias, relax.const(beta, str(bias.ty.dtype))))
    return bb.emit(relax.op.add(bias, res))


def _convert_matmul(node, importer):
    """``aten.matmul`` / ``mm`` / ``bmm`` with torch's dtype rule: fp16 / bf16 inputs give an fp16 / bf16 product.

    TVM 0.27's converter emits every float matmul with an fp32 result, so in an fp16 model the attention output
    (``softmax(.) @ v``) became fp32: the next quantized linear saw an fp32 input (no hand-written fp16 kernel,
    a slower generic decode) and the residual stream after it was fp32 too.  Here the product accumulates in fp32
    and is cast back to the inputs' dtype (FuseOps folds the cast into the matmul's kernel)."""
    from tvm import relax

    bb = importer.block_builder
    a, b = importer.env[node.args[0]], importer.env[node.args[1]]
    da, db = str(a.ty.dtype), str(b.ty.dtype)
    if da != db:  # a constant the dtype cast did not reach: both to the wider float, as TVM's converter does
        wide = "float32" if "float32" in (da, db) else da
        a = a if da == wide else bb.emit(relax.op.astype(a, wide))
        b = b if db == wide else bb.emit(relax.op.astype(b, wide))
        da = wide
    res = bb.emit(relax.op.matmul(a, b, out_dtype="float32"))
    if da in ("float16", "bfloat16"):
        res = bb.emit(relax.op.astype(res, da))
    return res


def _convert_cumsum(node, importer):
    """``aten.cumsum`` with torch's dtype rule: a bool or integer input accumulates in int64.

    TVM 0.27 keeps the input dtype, so the cumsum over a bool mask that Hugging Face models compute for their
    position ids fails to build ("InternalError: R.cumsum(...)")."""
    from tvm import relax

    bb = importer.block_builder
    x = importer.env[node.args[0]]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    want = node.kwargs.get("dtype")
    if want is not None:
        dtype = str(want).replace("torch.", "")
    elif str(x.ty.dtype) == "bool" or str(x.ty.dtype).startswith(("int", "uint")):
        dtype = "int64"
    else:
        dtype = None
    if dtype is not None and str(x.ty.dtype) != dtype:
        x = bb.emit(relax.op.astype(x, dtype))
    return bb.emit(relax.op.cumsum(x, dim))


def _convert_decode_attention(node, importer, donate: frozenset, cuda: bool, done: list):
    """``fxc_lm::decode_attention(q, k, v, k_cache, v_cache, cache_position, cos, sin, scale, heads, offsets)`` of
    one new token -> ``call_tir_inplace`` of the fused decode-attention kernel: outputs ``(out, k_cache,
    v_cache)``, the caches aliasing the inputs (written in place).  With ``attention_splits(shape) = P > 1`` (few
    blocks: flash-decoding) the ``call_tir_inplace`` kernel outputs the ``P`` splits' partial softmax states
    instead (``acc`` ``[B, H, P, D]``, ``state`` ``[B, H, P, 2]``, fp32) and a ``call_tir`` of the combine kernel
    gives ``out``.  ``done`` collects
    the cache input names updated in place."""
    from tvm import relax

    from .kernels.decode_attention import (AttentionShape, Source, attention_splits, attention_supports,
                                           decode_attention_combine_primfunc, decode_attention_primfunc)

    where = f"attention node {node.name!r} (fxc_lm::decode_attention, the fused decode attention)"
    for i in (3, 4):
        src = node.args[i]
        if not (getattr(src, "op", None) == "placeholder" and src.name in donate):
            raise TVMBackendError(f"{where} writes its cache {getattr(src, 'name', src)!r} in place, which needs that "
                                  f"cache to be a donated input of the graph (build_tvm(..., donate=[...]); donated: "
                                  f"{sorted(donate)})")
        if len(src.users) != 1:
            raise TVMBackendError(f"{where}: the donated cache {src.name!r} is read by {len(src.users)} nodes; it can "
                                  "be written in place only when this attention is its one use")
    q, k, v, kc, vc, pos = (importer.env[a] for a in node.args[:6])
    rope = [importer.env[a] for a in node.args[6:8] if a is not None]
    scale, heads, offsets = float(node.args[8]), int(node.args[9]), [int(o) for o in node.args[10]]

    def dims(x):
        return [int(d) for d in x.ty.shape]

    kcs, vcs, ps = dims(kc), dims(vc), dims(pos)
    if len(kcs) != 4 or kcs != vcs or ps != [1] or len(rope) not in (0, 2):
        raise TVMBackendError(f"{where}: caches {kcs} / {vcs}, positions {ps} are not [B, KVH, S, D] / [1]")
    b, kvh, seq, d = kcs
    srcs = []
    for x, off, nh, name in ((q, offsets[0], heads, "q"), (k, offsets[1], kvh, "k"), (v, offsets[2], kvh, "v")):
        xs = dims(x)
        if off < 0 and xs != [b, nh, 1, d] or off >= 0 and (len(xs) != 2 or xs[0] != b):
            raise TVMBackendError(f"{where}: {name} has shape {xs}; expected [{b}, {nh}, 1, {d}]"
                                  + (f" or [{b}, width] rows (offset {off})" if off >= 0 else ""))
        srcs.append(Source(str(x.ty.dtype), xs[1] if off >= 0 else None, max(off, 0)))
    rows = dims(rope[0])[0] if rope else 0
    if rope and (dims(rope[0]) != [rows, d] or dims(rope[1]) != [rows, d] or rope[0].ty.dtype != rope[1].ty.dtype):
        raise TVMBackendError(f"{where}: cos / sin have shapes {dims(rope[0])} / {dims(rope[1])}; expected "
                              f"[rows, {d}] each, of one dtype")
    try:
        shape = AttentionShape(b, heads, kvh, seq, d, *srcs, str(kc.ty.dtype), str(vc.ty.dtype), str(pos.ty.dtype),
                               rows, str(rope[0].ty.dtype) if rope else "float32")
    except ValueError as e:
        raise TVMBackendError(f"{where}: {e}") from None
    reason = attention_supports(shape)
    if reason is not None:
        raise TVMBackendError(f"{where}: {reason}")
    bb = importer.block_builder
    splits = attention_splits(shape)
    done += [node.args[3].name, node.args[4].name]
    args = relax.Tuple([q, k, v, kc, vc, pos, *rope])
    if splits == 1:
        gv = bb.add_func(decode_attention_primfunc(shape, scale, cuda), "fxc_decode_attention")
        return bb.emit(relax.call_tir_inplace(gv, args, inplace_indices=[-1, 3, 4],
                                              out_ty=[relax.TensorType([b, heads, 1, d], shape.q_dtype), kc.ty, vc.ty]))
    # the splits' states in two tensors (weighted V sums; max and sum), which the combine kernel takes as two inputs
    # (TVM 0.27's RewriteDataflowReshape checks every one-input call_tir for a reshape pattern, an analysis that
    # fails on a hand-scheduled PrimFunc)
    gv = bb.add_func(decode_attention_primfunc(shape, scale, cuda, splits=splits), "fxc_decode_attention_split")
    res = bb.emit(relax.call_tir_inplace(gv, args, inplace_indices=[-1, -1, 3, 4],
                                         out_ty=[relax.TensorType([b, heads, splits, d], "float32"),
                                                 relax.TensorType([b, heads, splits, 2], "float32"), kc.ty, vc.ty]))
    gc = bb.add_func(decode_attention_combine_primfunc(shape, splits, cuda), "fxc_decode_attention_combine")
    parts = relax.Tuple([bb.emit(relax.TupleGetItem(res, 0)), bb.emit(relax.TupleGetItem(res, 1))])
    out = bb.emit(relax.call_tir(gc, parts, out_ty=relax.TensorType([b, heads, 1, d], shape.q_dtype)))
    return bb.emit(relax.Tuple([out, bb.emit(relax.TupleGetItem(res, 2)), bb.emit(relax.TupleGetItem(res, 3))]))


def _as_tuple(example_inputs) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


def _prepare(model: nn.Module, base_site: int):
    """A copy of ``model`` with QuantLinear / QuantConv2d -> stubs, fake-quant nodes -> ``act_fake_quant``.
    Returns (copy, sites); a site maps to (module path, QuantLinear or QuantConv2d)."""
    m = copy.deepcopy(model).eval()
    sites: dict[int, tuple[str, nn.Module]] = {}
    for name, mod in list(m.named_modules()):
        if isinstance(mod, QuantLinear):
            site = base_site + len(sites)
            sites[site] = (name, mod)
            _set_submodule(m, name, _QuantLinearStub(site, mod))
        elif isinstance(mod, QuantConv2d):
            site = base_site + len(sites)
            sites[site] = (name, mod)
            _set_submodule(m, name, _QuantConvStub(site))
        elif hasattr(type(mod), "quant_weight") or "qweight" in getattr(mod, "_buffers", {}):
            raise TVMBackendError(f"layer {name!r} ({type(mod).__name__}) holds an integer weight but the TVM "
                                  "backend only lowers QuantLinear and QuantConv2d; convert it first (e.g. convert_l4q)")
    _mark_act_quant(m)
    return m, sites


_SITE_COUNTER = [0]


def lower_to_relax(model: nn.Module, example_inputs, *, dtype: torch.dtype | None = None,
                   accum_dtype: str = "float32", cuda: bool = False, config: TVMBuildConfig = DEFAULT_CONFIG,
                   donate=()):
    """Import ``model`` into a Relax ``IRModule`` (``main``) with packed integer linears.

    Returns ``(mod, info)`` where ``info`` holds input / output names and per-layer details.
    ``dtype`` (e.g. ``torch.float16``) casts the model's float parameters and the example inputs first;
    ``config`` chooses the kernels of the quantized linears (:class:`TVMBuildConfig`); ``donate``: input names the
    function may overwrite (the caches a fused decode attention writes in place; ``info["inplace_inputs"]`` lists
    those it wrote).
    """
    model = materialize_quant_modules(model)  # ExportedProgram / fxcompress:: op nodes -> QuantLinear modules
    tvm = require_tvm()
    from tvm.relax.frontend.torch import from_exported_program

    args = _as_tuple(example_inputs)
    if dtype is not None:
        args = tuple(a.to(dtype) if a.is_floating_point() else a for a in args)
    base = _SITE_COUNTER[0]
    m, sites = _prepare(model, base)
    _SITE_COUNTER[0] += len(sites) + 1
    if dtype is not None:
        m = m.to(dtype)  # (QuantLinear casts its dequantized weight to x.dtype itself)
    layers: list[LayerInfo] = []
    convs: list = []
    acts: dict[str, object] = {}  # exported fake-quant node name -> ActQuant (its int8 codes)
    inplace: list[str] = []  # donated inputs a fused decode attention writes in place
    donate = frozenset(donate)
    for s, (_, q) in sites.items():
        (_ACTIVE_CONV if isinstance(q, QuantConv2d) else _ACTIVE)[s] = q
    try:
        try:
            ep = torch.export.export(m, args)
        except Exception as e:  # noqa: BLE001
            raise TVMBackendError(f"torch.export could not capture the model for TVM: {type(e).__name__}: "
                                  f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from e

        def convert(node, importer):
            x = importer.env[node.args[0]]
            site = int(node.args[1])
            name, q = sites[site]
            y, info = emit_quant_linear(importer.block_builder, x, q, name, accum_dtype, cuda, config)
            layers.append(info)
            return y

        def convert_conv(node, importer):
            src = node.args[0]
            name, q = sites[int(node.args[1])]
            y, info = emit_quant_conv(importer.block_builder, importer.env[src], q, name, acts.get(src.name), cuda)
            convs.append(info)
            return y

        def convert_act(node, importer):
            scale, zp, qmin, qmax = node.args[1:5]
            xf, act = emit_act_quant(importer.block_builder, importer.env[node.args[0]], float(scale), int(zp),
                                     int(qmin), int(qmax), node.name)
            acts[node.name] = act
            return xf

        def convert_attention(node, importer):
            return _convert_decode_attention(node, importer, donate, cuda, inplace)

        try:
            mod = from_exported_program(ep, custom_convert_map={_OP_NAME: convert, _CONV_OP: convert_conv,
                                                                  _ACT_OP: convert_act,
                                                                  _ATTENTION_OP: convert_attention,
                                                                  "addmm.default": _convert_addmm,
                                                                  "matmul.default": _convert_matmul,
                                                                  "mm.default": _convert_matmul,
                                                                  "bmm.default": _convert_matmul,
                                                                  "cumsum.default": _convert_cumsum,
                                                                  "convolution.default": convert_float_convolution,
                                                                  "_native_batch_norm_legit_no_training.default":
                                                                      convert_batch_norm_no_training})
        except AssertionError as e:
            msg = str(e)
            found = re.search(r"Unsupported function types? (\[.*\])", msg)
            if found:
                raise TVMBackendError(f"TVM's PyTorch importer (tvm {tvm.__version__}) does not support "
                                      f"op(s) {found.group(1)}; rewrite or remove them before lowering") from None
            raise TVMBackendError(f"TVM import failed: {msg}") from e
        except (KeyError, NotImplementedError, tvm.error.InternalError, TypeError) as e:
            raise TVMBackendError(f"TVM import failed: {type(e).__name__}: {e}") from e
    finally:
        for s in sites:
            _ACTIVE.pop(s, None)
            _ACTIVE_CONV.pop(s, None)
    in_names = [s.arg.name for s in ep.graph_signature.input_specs
                if s.kind == torch.export.graph_signature.InputKind.USER_INPUT]
    n_out = len([s for s in ep.graph_signature.output_specs
                 if s.kind == torch.export.graph_signature.OutputKind.USER_OUTPUT])
    info = {
        "inputs": [{"name": n, "shape": list(a.shape), "dtype": str(a.dtype).replace("torch.", "")}
                   for n, a in zip(in_names, args)],
        "outputs": [f"output_{i}" for i in range(n_out)],
        "layers": [vars(layer) for layer in layers],
        "convs": [vars(c) for c in convs],
        "inplace_inputs": inplace,
    }
    return mod, info
