"""Lower an integer-weight graph to Apache TVM (Relax) and build it for CUDA or CPU.

    runner = compile_tvm(gm, example_inputs, target="cuda", tune="dlight")   # or "meta_schedule", target="llvm"
    y = runner(x)                                                            # torch in, torch out
    runner.export_library("model.so")                                        # + model.so.json (inputs, outputs)
    runner2 = fxcompress.runtime.load("model.so", backend="tvm", device="cuda")

How it works
------------
1. **Import.**  A deep copy of the model is made in which every ``QuantLinear`` becomes a stub that calls
   the opaque custom op ``fxc_tvm::quant_linear(x, site, out_features)`` (a ``torch.library`` op with a
   fake implementation, so ``torch.export`` keeps it as one node), and every ``QuantConv2d`` becomes a
   float ``conv2d`` whose weight is the dequantized integer weight (**convolutions are dequantized to a
   constant float weight at import**: only linears keep packed integer weights).  The float parts go
   through ``torch.export`` and ``tvm.relax.frontend.torch.from_exported_program``; the custom op is
   converted by a ``custom_convert_map`` entry (TVM 0.27 signature ``fn(node, importer) -> relax.Var``).
2. **Packed weights.**  Each quantized linear is emitted as ONE TIR PrimFunc (``fused_decode_matmul``)
   built with ``te``: a ``dequantize`` block that decodes ``(q - zero_point) * scale`` from the packed
   ``uint32`` words, and a ``matmul`` reduction block that reads it (accumulating in float32, then a
   cast block when activations are fp16).  Codes are repacked along the input dim into ``uint32`` words,
   ``32 // bits`` codes a word, low bits first (MLC-LLM's group-quantization layout):
   int8 -> 4/word, int4 -> 8/word, int3 -> 10/word (30 of 32 bits used: 3.2 bits/weight, no code
   straddles a word), int2 -> 16/word.  Scales and zero points stay ``(rows, groups)`` in the activation
   dtype; zero points may be fractional (L4Q) and are applied exactly as ``(q - zp) * scale`` (signed
   codes are decoded as ``(u + qmin) - zp``, the same float operations as the torch reference).
   Symmetric layers with an all-zero zero point carry no zero-point tensor.  ``FuseOps``/``FuseTIR``
   then fuse elementwise epilogues (bias add, activations) into that PrimFunc; on CUDA the dlight rules
   inline the ``dequantize`` block into the GEMV / matmul reduction, so each quantized linear is one
   kernel that reads the packed words (``TVMRunner.kernel_names()`` / ``primfunc_names()`` show it).
   ``FoldConstant`` is deliberately left out of the pipeline: it would evaluate the decode of the
   constant packed weight at build time and store a float weight again.
3. **Schedules.**  ``target="cuda"``: quantized linears with fp16 activations and 1..16 rows are emitted
   directly as hand-scheduled PrimFuncs (:mod:`.tvm_gemv`; ``GEMV_KERNEL``): int4 / int8 on tensor cores
   (``mma.m16n8k16`` from a fragment-ordered repacking of the codes), other int2 / 4 / 8 layers on a
   CUDA-core GEMV;
   everything else gets the ``tvm.s_tir.dlight`` GPU rules (Matmul, GEMV, LowBatchGEMV, Reduction,
   GeneralReduction, Fallback).  ``permute_dims`` of float constants (the importer's ``F.linear`` weights)
   is folded at build time.  ``target="llvm"``: TVM's default CPU lowering.
   ``tune="meta_schedule"``: tasks are tuned with MetaSchedule for ``trials`` trials into a JSON database
   in ``work_dir``; a later build with the same ``work_dir`` reuses records for the same workload and
   target (only untuned tasks are tuned) and warns about records for another target or shape, which it
   ignores.  Anything MetaSchedule did not schedule falls back to dlight (CUDA).

Errors: :class:`TVMBackendError` (a ``ValueError``) names the op / layer / device that cannot be handled.
"""
from __future__ import annotations

import copy
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..nn import QuantConv2d, QuantLinear
from ..quant import QuantWeight
from . import tvm_gemv

__all__ = ["compile_tvm", "build_tvm", "lower_to_relax", "TVMBackendError", "pack_words", "TUNERS",
           "add_export_tvm_args", "cli_export_tvm"]

TUNERS = ("dlight", "meta_schedule", "none")
# quantized linears with 2..SMALL_BATCH_MAX_M activation rows get a GEMV-style schedule (one pass over the
# packed weight for all rows) instead of dlight's tiled Matmul; 0 turns it off
SMALL_BATCH_MAX_M = 16
FORMAT_VERSION = 1
# how a packed code becomes a float inside the fused kernel (see emit_packed_linear):
#   "magic": integer ops only -- ``(word >> shift) & mask | exponent`` reinterpreted as a float (2**23 + u for
#            fp32, 1024 + u for fp16) minus that constant; exact, same values as "convert", and no int->float
#            conversion instruction (I2F runs at 1/8 of the FMA rate on sm_80/sm_90, the GEMV's bottleneck)
#   "convert": ``.astype(float)`` of the extracted code (an I2F per weight)
DECODE_MODE = "magic"
# overrides of dlight's CUDA GEMV (batch 1) inner-reduction parameters; None / missing keys keep dlight's
# choice.  Keys: TS (rows per block, threadIdx.y), TR (threads along K, threadIdx.x), TILE_R (K elements per
# thread per step), VEC_C (vectorized compute width), VEC_LOAD (bytes per weight load), UNROLL, LOAD_V_SHARED
GEMV_CUDA_CONFIG: dict | None = None
# CUDA kernel for fp16 quantized linears with 1..4 activation rows: "fxc" = the hand-scheduled packed GEMV of
# tvm_gemv.py (16-byte weight loads, two integer ops + one FFMA per weight) where it supports the layer,
# "dlight" = the fused te decode+matmul scheduled by dlight's GEMV rules (always used for other layers)
GEMV_KERNEL = "fxc"


class TVMBackendError(ValueError):
    """The model cannot be lowered / built / run with TVM as asked; the message says what and why."""


def _tvm():
    try:
        import tvm  # noqa: F401
        from tvm import relax  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise TVMBackendError("the TVM backend needs apache-tvm (pip install 'fxcompress[tvm]')") from e
    import tvm

    return tvm


# ----------------------------------------------------------------------------------------------------------
# the opaque custom op that stands for a quantized linear during torch.export

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


class _ConvStandIn(nn.Module):
    def __init__(self, q: QuantConv2d):
        super().__init__()
        self.weight = nn.Parameter(q.dequantized_weight(torch.float32), requires_grad=False)
        self.bias = None if q.bias is None else nn.Parameter(q.bias.detach().float().clone(), requires_grad=False)
        self.stride, self.padding, self.dilation, self.groups = q.stride, q.padding, q.dilation, q.groups

    def forward(self, x):
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.conv2d(x, self.weight.to(x.dtype), b, self.stride, self.padding, self.dilation, self.groups)


def _set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, attr, new)


# ----------------------------------------------------------------------------------------------------------
# packing


def pack_words(codes: np.ndarray, bits: int, qmin: int) -> np.ndarray:
    """Pack integer codes ``(N, K)`` into ``uint32`` words ``(N, ceil(K / (32 // bits)))`` along K.

    Code ``k`` of a row sits in word ``k // P`` at bits ``[(k % P) * bits, (k % P + 1) * bits)`` with
    ``P = 32 // bits`` (10 for 3-bit: the top 2 bits of each word are unused).  Codes are stored
    offset-binary (``code - qmin``); padding codes are 0.
    """
    per = 32 // bits
    u = (np.asarray(codes, dtype=np.int64) - qmin)
    if u.size and (u.min() < 0 or u.max() >= 2**bits):
        raise TVMBackendError(f"codes out of range for {bits}-bit packing")
    n, k = u.shape
    kp = -(-k // per) * per
    if kp != k:
        u = np.concatenate([u, np.zeros((n, kp - k), np.int64)], axis=1)
    u = u.reshape(n, kp // per, per).astype(np.uint64)
    shifts = (np.arange(per, dtype=np.uint64) * np.uint64(bits))
    return (u << shifts).sum(axis=-1).astype(np.uint32)


def unpack_words(words: np.ndarray, bits: int, k: int, qmin: int) -> np.ndarray:
    """Inverse of :func:`pack_words` (for tests)."""
    per = 32 // bits
    w = np.asarray(words, dtype=np.uint64)
    shifts = (np.arange(per, dtype=np.uint64) * np.uint64(bits))
    u = (w[..., None] >> shifts) & np.uint64(2**bits - 1)
    return u.reshape(w.shape[0], -1)[:, :k].astype(np.int64) + qmin


# ----------------------------------------------------------------------------------------------------------
# Relax emission of one quantized linear


@dataclass
class _LayerInfo:
    name: str
    bits: int
    granularity: str
    group_size: int | None
    shape: tuple
    zero_point: str  # "none" | "integer" | "fractional"
    packed_bytes: int
    primfunc: str = ""
    kernel: str = "te"  # "fxc_gemv" / "fxc_mma" (hand-scheduled CUDA kernels) or "te" (fused decode+matmul,
    # scheduled later)


def _emit_quant_linear(bb, x, q: QuantLinear, name: str, accum_dtype: str = "float32", cuda: bool = False):
    """Emit ``y = x @ dequant(W)^T (+ bias)`` for ``q`` as one ``fused_decode_matmul`` PrimFunc call."""
    qw: QuantWeight = q.quant_weight
    spec = qw.spec
    words = pack_words(qw.codes().numpy(), spec.bits, spec.qmin)
    zp = qw.zero_point.numpy().astype(np.float32)
    zkind = "none" if not np.any(zp != 0) else ("integer" if qw.zero_point_is_integer else "fractional")
    bias = None if q.bias is None else q.bias.detach().float().numpy()
    kernel = []
    y = emit_packed_linear(bb, x, words, qw.scale.numpy(), zp, bits=spec.bits, qmin=spec.qmin,
                           out_features=qw.shape[0], in_features=qw.shape[1], bias=bias, accum_dtype=accum_dtype,
                           name=name, cuda=cuda, used=kernel)
    info = _LayerInfo(name, spec.bits, spec.granularity, spec.group_size, tuple(qw.shape), zkind, int(words.nbytes),
                      kernel=kernel[0])
    return y, info


def emit_packed_linear(bb, x, words: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, *, bits: int,
                       qmin: int, out_features: int, in_features: int, bias: np.ndarray | None = None,
                       accum_dtype: str = "float32", name: str = "linear", cuda: bool = False,
                       used: list | None = None):
    """Emit one ``fused_decode_matmul`` PrimFunc call: ``x @ ((u + qmin - zp) * scale)^T (+ bias)``.

    ``words``: ``uint32 (N, ceil(K / (32 // bits)))`` from :func:`pack_words`; ``scale`` / ``zero_point``:
    ``(rows, groups)`` with rows 1 or N (``zero_point`` None or all zero: no zero-point tensor).
    ``cuda``: the build targets CUDA, so the hand-scheduled GEMV (:data:`GEMV_KERNEL`) may be used; which
    kernel was emitted is appended to ``used`` ("fxc_gemv", "fxc_mma" or "te").
    """
    _tvm()
    from tvm import relax, te, tirx

    n_out, k_in = out_features, in_features
    dtype = str(x.ty.dtype)
    if dtype not in ("float32", "float16"):
        raise TVMBackendError(f"layer {name!r}: activations of dtype {dtype} are not supported (float32 / float16)")
    xshape = [int(d) if isinstance(d, tirx.IntImm) else d for d in x.ty.shape]
    if not isinstance(xshape[-1], int) or xshape[-1] != k_in:
        raise TVMBackendError(f"layer {name!r}: input last dim {xshape[-1]} != in_features {k_in}")
    per = 32 // bits
    rows, groups = tuple(scale.shape)
    gs = k_in // groups
    np_dt = {"float32": np.float32, "float16": np.float16}[dtype]
    has_zp = zero_point is not None and bool(np.any(np.asarray(zero_point) != 0))
    mask = tirx.const(2**bits - 1, "uint32")
    acc = accum_dtype if dtype != "float32" else "float32"
    decode = DECODE_MODE if bits <= 8 else "convert"
    if decode not in ("magic", "convert"):
        raise TVMBackendError(f"DECODE_MODE must be 'magic' or 'convert', got {decode!r}")
    if GEMV_KERNEL not in ("fxc", "dlight"):
        raise TVMBackendError(f"GEMV_KERNEL must be 'fxc' or 'dlight', got {GEMV_KERNEL!r}")
    m_rows = int(np.prod(xshape[:-1])) if all(isinstance(d, int) for d in xshape) else -1
    kind = _fxc_kind(m_rows, k_in, n_out, bits, gs, dtype) if cuda and GEMV_KERNEL == "fxc" else None
    if kind is not None:
        if used is not None:
            used.append(kind)
        return _emit_fxc_gemv(bb, x, xshape, words, scale, zero_point if has_zp else None, bias, bits=bits,
                              qmin=qmin, n_out=n_out, k_in=k_in, gs=gs, kind=kind)
    if used is not None:
        used.append("te")

    def f(xt, wt, st, *rest):
        zt = rest[0] if has_zp else None

        def deq(n, k):
            r = n if rows > 1 else 0
            g = k // gs if groups > 1 else 0
            word = wt[n, k // per]
            code = (word >> ((k % per) * bits).astype("uint32")) & mask
            if decode == "magic" and dtype == "float32":  # 2**23 + u as an fp32 bit pattern
                u = tirx.reinterpret("float32", code | tirx.const(0x4B000000, "uint32")) - tirx.const(8388608.0,
                                                                                                         dtype)
            elif decode == "magic":  # 1024 + u as an fp16 bit pattern (u < 1024 for bits <= 8)
                u = tirx.reinterpret("float16", code.astype("uint16") | tirx.const(0x6400, "uint16")) \
                    - tirx.const(1024.0, dtype)
            else:
                u = code.astype(dtype)
            if qmin != 0:
                u = u + tirx.const(qmin, dtype)
            if zt is not None:
                u = u - zt[r, g]
            return u * st[r, g]

        d = te.compute((n_out, k_in), deq, name="dequantize")
        rk = te.reduce_axis((0, k_in), name="k")
        out_shape = (*xshape[:-1], n_out)

        def mm(*idx):
            a, b = xt[(*idx[:-1], rk)], d[idx[-1], rk]
            if acc != dtype:
                a, b = a.astype(acc), b.astype(acc)
            return te.sum(a * b, axis=rk)

        y = te.compute(out_shape, mm, name="matmul")
        if acc != dtype:
            y = te.compute(out_shape, lambda *i: y(*i).astype(dtype), name="cast")
        return y

    args = [x, relax.const(np.ascontiguousarray(words, dtype=np.uint32)), relax.const(scale.astype(np_dt))]
    if has_zp:
        args.append(relax.const(np.asarray(zero_point).astype(np_dt)))
    y = bb.emit_te(f, *args, primfunc_name_hint="fused_decode_matmul")
    if bias is not None:
        y = bb.emit(relax.op.add(y, relax.const(np.asarray(bias).astype(np_dt))))
    return y


def _fxc_kind(m: int, k: int, n: int, bits: int, gs: int, dtype: str) -> str | None:
    """Which hand-scheduled CUDA kernel takes this layer: "fxc_mma" (int4 / int8 tensor cores, from
    :data:`tvm_gemv.MMA_MIN_M` rows), "fxc_gemv" (CUDA cores) or None (dlight's schedules)."""
    if m <= 0:
        return None
    if m >= tvm_gemv.MMA_MIN_M and tvm_gemv.mma_supports(m=m, k=k, n=n, bits=bits, group_size=gs,
                                                         dtype=dtype) is None:
        return "fxc_mma"
    if tvm_gemv.supports(m=m, k=k, n=n, bits=bits, group_size=gs, dtype=dtype) is None:
        return "fxc_gemv"
    return None


def _emit_fxc_gemv(bb, x, xshape, words, scale, zero_point, bias, *, bits, qmin, n_out, k_in, gs, kind):
    """``call_tir`` of a hand-scheduled kernel (already scheduled; FuseOps leaves it alone): ``kind`` "fxc_mma"
    = the int4 / int8 tensor-core kernel (its own weight layout), "fxc_gemv" = the CUDA-core packed GEMV."""
    from tvm import relax

    m_rows = int(np.prod(xshape[:-1]))
    common = dict(m=m_rows, k=k_in, n=n_out, qmin=qmin, group_size=gs, scale_rows=scale.shape[0],
                  has_zero_point=zero_point is not None, has_bias=bias is not None, lead=tuple(xshape[:-1]))
    if kind == "fxc_mma":
        f = tvm_gemv.packed_mma_primfunc(**common, bits=bits, name="fxc_packed_mma")
        words = tvm_gemv.pack_mma_words(unpack_words(words, bits, k_in, qmin), qmin, bits)
    else:
        f = tvm_gemv.packed_gemv_primfunc(**common, bits=bits, name="fxc_packed_gemv")
    gv = bb.add_func(f, f.attrs["global_symbol"])
    args = [x, relax.const(np.ascontiguousarray(words, dtype=np.uint32)), relax.const(scale.astype(np.float16))]
    if zero_point is not None:
        args.append(relax.const(np.asarray(zero_point).astype(np.float16)))
    if bias is not None:
        args.append(relax.const(np.asarray(bias).astype(np.float16)))
    return bb.emit(relax.call_tir(gv, relax.Tuple(args), relax.TensorType((*xshape[:-1], n_out), "float16")))


# ----------------------------------------------------------------------------------------------------------
# import


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


def _as_tuple(example_inputs) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


def _prepare(model: nn.Module, base_site: int):
    """A copy of ``model`` with QuantLinear -> stub, QuantConv2d -> float conv.  Returns (copy, sites)."""
    m = copy.deepcopy(model).eval()
    sites: dict[int, tuple[str, QuantLinear]] = {}
    for name, mod in list(m.named_modules()):
        if isinstance(mod, QuantLinear):
            site = base_site + len(sites)
            sites[site] = (name, mod)
            _set_submodule(m, name, _QuantLinearStub(site, mod))
        elif isinstance(mod, QuantConv2d):
            _set_submodule(m, name, _ConvStandIn(mod))
        elif hasattr(type(mod), "quant_weight") or "qweight" in getattr(mod, "_buffers", {}):
            raise TVMBackendError(f"layer {name!r} ({type(mod).__name__}) holds an integer weight but the TVM "
                                  "backend only lowers QuantLinear and QuantConv2d; convert it first (e.g. convert_l4q)")
    return m, sites


_SITE_COUNTER = [0]


def lower_to_relax(model: nn.Module, example_inputs, *, dtype: torch.dtype | None = None,
                   accum_dtype: str = "float32", cuda: bool = False):
    """Import ``model`` into a Relax ``IRModule`` (``main``) with packed integer linears.

    Returns ``(mod, info)`` where ``info`` holds input / output names and per-layer details.
    ``dtype`` (e.g. ``torch.float16``) casts the model's float parameters and the example inputs first.
    """
    tvm = _tvm()
    from tvm.relax.frontend.torch import from_exported_program

    args = _as_tuple(example_inputs)
    if dtype is not None:
        args = tuple(a.to(dtype) if a.is_floating_point() else a for a in args)
    base = _SITE_COUNTER[0]
    m, sites = _prepare(model, base)
    _SITE_COUNTER[0] += len(sites) + 1
    if dtype is not None:
        for _, q in sites.values():
            pass  # QuantLinear casts its dequantized weight to x.dtype itself
        m = m.to(dtype)
    layers: list[_LayerInfo] = []
    for s, (_, q) in sites.items():
        _ACTIVE[s] = q
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
            y, info = _emit_quant_linear(importer.block_builder, x, q, name, accum_dtype, cuda)
            layers.append(info)
            return y

        try:
            mod = from_exported_program(ep, custom_convert_map={_OP_NAME: convert, "addmm.default": _convert_addmm})
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
    in_names = [s.arg.name for s in ep.graph_signature.input_specs
                if s.kind == torch.export.graph_signature.InputKind.USER_INPUT]
    n_out = len([s for s in ep.graph_signature.output_specs
                 if s.kind == torch.export.graph_signature.OutputKind.USER_OUTPUT])
    info = {
        "inputs": [{"name": n, "shape": list(a.shape), "dtype": str(a.dtype).replace("torch.", "")}
                   for n, a in zip(in_names, args)],
        "outputs": [f"output_{i}" for i in range(n_out)],
        "layers": [vars(layer) for layer in layers],
    }
    return mod, info


# ----------------------------------------------------------------------------------------------------------
# targets, pipelines


def _cuda_available(tvm) -> bool:
    try:
        return bool(tvm.cuda(0).exist)
    except Exception:  # noqa: BLE001
        return False


def make_target(target):
    """A ``tvm.target.Target`` for ``"llvm"``, ``"cuda"`` (the local GPU's if there is one, else sm_90)
    or a dict / Target given as is."""
    tvm = _tvm()
    from tvm.target import Target

    if isinstance(target, Target):
        return target
    if isinstance(target, dict):
        return Target(target)
    if target in ("llvm", "cpu"):
        return Target("llvm")
    if target == "cuda" or (isinstance(target, str) and target.startswith("cuda")):
        if _cuda_available(tvm):
            return Target.from_device(tvm.cuda(0))
        return Target({"kind": "cuda", "arch": "sm_90", "max_shared_memory_per_block": 49152,
                       "max_threads_per_block": 1024, "thread_warp_size": 32, "max_num_threads": 1024})
    raise TVMBackendError(f"target must be 'llvm', 'cuda', a dict or a tvm Target, got {target!r}")


def _backend_module(target):
    from tvm.relax.backend import cpu_generic, cuda

    return cuda.pipeline if target.kind.name == "cuda" else cpu_generic.pipeline


def _small_int_power_pass():
    """``power(x, c)`` with a constant small integer ``c`` (RMSNorm's ``x.pow(2)``) -> repeated ``multiply``.

    TVM's CUDA code calls ``powf``, which NVRTC / nvcc fast math compiles as ``exp2(c * log2(x))``: NaN for
    every negative ``x`` even though ``c`` is an integer (the DecoderBlock's RMSNorm came out all NaN on the
    GPU while the llvm build matched torch).  Multiplication is exact and cheaper on every target.
    """
    import tvm
    from tvm import relax

    pow_op = tvm.ir.Op.get("relax.power")

    @relax.expr_functor.mutator
    class _Rewrite(relax.PyExprMutator):
        def visit_call_(self, call):  # noqa: N802 - TVM's visitor name
            call = self.visit_expr_post_order(call)
            if not (isinstance(call, relax.Call) and call.op.same_as(pow_op) and len(call.args) == 2):
                return call
            c = call.args[1]
            if not isinstance(c, tvm.ir.expr.Constant):
                return call
            arr = np.asarray(c.value.numpy() if hasattr(c.value, "numpy") else c.value)
            if arr.size != 1 or arr.dtype.kind not in "fiu":
                return call
            v = float(arr.reshape(-1)[0])
            if v != int(v) or not 1 <= v <= 4:
                return call
            x = call.args[0]
            y = x
            for _ in range(int(v) - 1):
                y = relax.op.multiply(y, x)
            return y

    return _relax_function_pass(_Rewrite, "FxcSmallIntPower")


def _relax_function_pass(mutator_cls, name: str):
    """A module pass that runs ``mutator_cls`` (a ``relax.PyExprMutator``) over every Relax function."""
    import tvm
    from tvm import relax

    @tvm.transform.module_pass(opt_level=0, name=name)
    def _pass(mod, _ctx):
        rw = mutator_cls(mod)
        for gv, f in list(mod.functions.items()):
            if isinstance(f, relax.Function):
                rw.builder_.update_func(gv, rw.visit_expr(f))
        return rw.builder_.get()

    return _pass


def _constant_transpose_pass():
    """``permute_dims(constant)`` -> the transposed constant, at build time.

    The importer turns every float ``F.linear(x, W)`` (e.g. an unquantized lm_head) into
    ``matmul(x, permute_dims(W))``.  Without constant folding (left out on purpose, see :func:`_fuse_passes`)
    that transpose ran on every call: 519 of 828 µs of GPU time per decode step of the 4-layer L4Q model
    (tools/results/decode_gpu.md).  Only float constants are touched; packed integer weights never pass
    through ``permute_dims``.
    """
    import tvm
    from tvm import relax

    op = tvm.ir.Op.get("relax.permute_dims")

    @relax.expr_functor.mutator
    class _Fold(relax.PyExprMutator):
        def visit_call_(self, call):  # noqa: N802 - TVM's visitor name
            call = self.visit_expr_post_order(call)
            if not (isinstance(call, relax.Call) and call.op.same_as(op)
                    and isinstance(call.args[0], tvm.ir.expr.Constant)):
                return call
            arr = call.args[0].value.numpy()
            if arr.dtype.kind != "f":
                return call
            axes = call.attrs.axes
            perm = [int(a) for a in axes] if axes is not None else list(range(arr.ndim))[::-1]
            return relax.const(np.ascontiguousarray(arr.transpose(perm)))

    return _relax_function_pass(_Fold, "FxcFoldConstantTranspose")


def _fuse_passes():
    from tvm import relax

    # no FoldConstant: it would decode the constant packed weights at build time (back to float)
    return [_small_int_power_pass(), _constant_transpose_pass(), relax.transform.LegalizeOps(),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.DeadCodeElimination(), relax.transform.FuseOps(), relax.transform.FuseTIR()]


def _dlight_pass(target):
    from tvm.s_tir import dlight as dl

    rules = [_SmallBatchGEMV(SMALL_BATCH_MAX_M), dl.gpu.Matmul(), _gemv_rule(), dl.gpu.LowBatchGEMV(),
             dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()]
    for r in rules[:-1]:
        _guard(r)
    return dl.ApplyDefaultSchedule(*rules)


def _gemv_rule():
    """dlight's GEMV rule; with :data:`GEMV_CUDA_CONFIG` set, its CUDA inner-reduction parameters overridden."""
    from tvm.s_tir.dlight import gpu as dlgpu

    cfg = dict(GEMV_CUDA_CONFIG or {})
    if not cfg:
        return dlgpu.GEMV()
    return _TunedGEMV(cfg)


def _tuned_gemv_cls():
    import types

    from tvm.s_tir.dlight import gpu as dlgpu
    from tvm.s_tir.dlight.base import get_extent
    from tvm.s_tir.dlight.gpu import gemv as gemv_mod

    code = next(c for c in dlgpu.GEMV.sch_inner_reduction.__code__.co_consts
                if isinstance(c, types.CodeType) and c.co_name == "apply")

    class TunedGEMV(dlgpu.GEMV):
        """dlight GEMV whose CUDA inner-reduction schedule takes its tile parameters from a dict; the schedule
        itself is upstream's (its nested ``apply``, rebound here), only the numbers differ."""

        def __init__(self, cfg):
            super().__init__()
            self.cfg = cfg

        def sch_inner_reduction(self, sch, target, block, vector_input_buffers, epilogue_info):
            if target.kind.name != "cuda":
                return super().sch_inner_reduction(sch, target, block, vector_input_buffers, epilogue_info)

            def get_max_factor(n, factors):
                for f in sorted(factors, reverse=True):
                    if n % f == 0:
                        return f
                return 1

            batch, s, r, c = sch.get_loops(block=block)
            len_r, len_c = get_extent(sch, r), get_extent(sch, c)
            p = dict(VEC_C=4, LOAD_V_SHARED=True, LOAD_V_VEC=8, VEC_LOAD=4, UNROLL=256, TS=16, TR=32, TILE_R=None)
            p.update({k: v for k, v in self.cfg.items() if v is not None})
            ts, tr = int(p["TS"]), int(p["TR"])
            while ts * tr > int(target.attrs["max_num_threads"]):
                ts, tr = (ts // 2, tr) if ts > 1 else (ts, tr // 2)
            if not isinstance(len_r, int) or not isinstance(len_c, int):
                return super().sch_inner_reduction(sch, target, block, vector_input_buffers, epilogue_info)
            tile_r = int(p["TILE_R"]) if p["TILE_R"] else None
            if tile_r is not None and ((len_r * len_c) % (tr * tile_r) or tile_r % len_c):
                tile_r = None  # does not tile the reduction (or splits a packed word): dlight's choice
            if tile_r is None:
                tile_r = len_c if len_c > 1 else max(get_max_factor(len_r, [tr, tr * 2, tr * 4, tr * 8]) // tr, 1)
            vec_c = min(get_max_factor(tile_r, [1, 2, 4, 8, 16, 32]), int(p["VEC_C"]))
            cells = {"block": block, "epilogue_info": epilogue_info, "get_max_factor": get_max_factor,
                     "target": target, "vector_input_buffers": vector_input_buffers}
            fn = types.FunctionType(code, gemv_mod.__dict__, "apply", None,
                                    tuple(types.CellType(cells[n]) for n in code.co_freevars))
            return fn(sch, gemv=block, TAG_S="threadIdx.y", TAG_R="threadIdx.x", TS=ts, TR=tr, TILE_S=1,
                      TILE_R=tile_r, VEC_LOAD=int(p["VEC_LOAD"]), VEC_C=vec_c,
                      LOAD_V_SHARED=bool(p["LOAD_V_SHARED"]), LOAD_V_VEC=int(p["LOAD_V_VEC"]),
                      UNROLL=int(p["UNROLL"]), SUPPORT_WARP_SHUFFLE=True)

    return TunedGEMV


def _TunedGEMV(cfg):  # noqa: N802 - a class factory (TVM is imported lazily)
    if not _TUNED_GEMV:
        _TUNED_GEMV.append(_tuned_gemv_cls())
    return _TUNED_GEMV[0](cfg)


_TUNED_GEMV: list = []


class _SmallBatchGEMV:
    """dlight's LowBatchGEMV schedule for a *static* small batch ``2 <= M <= max_m`` (a decode+matmul whose
    activation has M rows).  Upstream LowBatchGEMV only accepts a symbolic batch dim (and dlight's Matmul
    rule, which takes static M, tiles for large GEMMs: ~7-15x slower than fp16 cuBLAS at M = 4-16).  Here
    the static M iter plays the batch role; every weight word is read once for all M rows."""

    def __init__(self, max_m: int = 16):
        from tvm.s_tir.dlight import gpu as dlgpu

        self.max_m = max_m
        self._inner = dlgpu.LowBatchGEMV()

    @staticmethod
    def _batch_var(block_stmt, max_m):
        from tvm import tirx
        from tvm.s_tir.dlight.analysis import collect_block_iter_vars_used_in_access_region as used

        w = used(block_stmt, block_stmt.writes[0].region)
        reads = [used(block_stmt, r.region) for r in block_stmt.reads]
        cands = [iv for iv in block_stmt.iter_vars
                 if iv.iter_type == tirx.stmt.IterVar.DataPar and isinstance(iv.dom.extent, tirx.IntImm)
                 and 2 <= int(iv.dom.extent) <= max_m and iv.var in w
                 and sum(iv.var in r for r in reads) == 1]
        return cands[0].var if len(cands) == 1 else None

    def _is_gemv(self, sch, block_info):
        from tvm.s_tir.dlight.analysis import collect_block_iter_vars_used_in_access_region as used
        from tvm.s_tir.dlight.gpu import low_batch_gemv as L

        block_stmt = sch.get(block_info.block_rv)
        if not (block_info.is_reduction() and len(block_stmt.reads) >= 2 and len(block_stmt.writes) == 1
                and L._get_reduction_expr(block_stmt) is not None
                and L._has_pad_einsum_compatible_access(block_stmt)):
            return None, None
        bvar = self._batch_var(block_stmt, self.max_m)
        if bvar is None:
            return None, None
        const = {iv.var for iv in block_stmt.iter_vars if iv.var is not bvar and not iv.var.same_as(bvar)}
        ret = [r.source for r in block_stmt.reads
               if 0 < len(used(block_stmt, r.region) & const) < len(const)]
        return (ret if 0 < len(ret) < len(block_stmt.reads) else None), bvar

    def _normalize(self, sch, block_info, bvar):
        from tvm import sym
        from tvm.s_tir.dlight.analysis import collect_vars_used_in_prim_expr
        from tvm.s_tir.dlight.gpu import low_batch_gemv as L

        block_stmt = sch.get(block_info.block_rv)
        const = {iv.var for iv in block_stmt.iter_vars if not iv.var.same_as(bvar)}
        access = sym.normalize_to_iter_sum(L.detect_dominant_read(block_stmt, const),
                                           input_iters={i.var: i.dom for i in block_stmt.iter_vars})
        if collect_vars_used_in_prim_expr(access.base) & {iv.var for iv in block_stmt.iter_vars}:
            return None
        info = {i.var: i for i in block_info.iters}
        s_loops, r_loops = [], []
        inner = access.args[-1].source.source
        for split_expr in access.args:
            var = split_expr.source.source
            if var.same_as(bvar):
                continue
            (r_loops if info[var].kind == "R" else s_loops).append(info[var].loop_rv)
        if not s_loops or not r_loops:
            return None
        sch.reorder(info[bvar].loop_rv, *s_loops, *r_loops)
        sch.fuse(*s_loops)
        sch.fuse(*r_loops)
        return info[inner].kind == "R"

    def apply(self, func, target, _tunable):
        from tvm import s_tir, tirx
        from tvm.s_tir.dlight.analysis import normalize_prim_func
        from tvm.s_tir.dlight.base import try_inline_contiguous_spatial

        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "cuda":
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None:
            return None
        red = [b for b in infos if b.is_reduction()]
        if len(red) != 1:
            return None
        vec, bvar = self._is_gemv(sch, red[0])
        if vec is None:
            return None
        batch = int(next(i.dom for i in red[0].iters if i.var.same_as(bvar)))
        dequantize_block = None
        for b in infos:
            if "dequantize" in b.name:
                dequantize_block = b.block_rv
        infos = try_inline_contiguous_spatial(sch, [b for b in infos if "dequantize" not in b.name])
        if len(infos) == 1:
            epilogue = None
        elif len(infos) == 2 and infos[1].is_injective():
            epilogue = infos[1]
        else:
            return None
        bi = infos[0]
        if len(bi.iters) != 3:
            return None
        vec, bvar = self._is_gemv(sch, bi)
        if vec is None:
            return None
        inner_red = self._normalize(sch, bi, bvar)
        if not inner_red:
            return None
        # rows per thread block: up to 4 (as upstream's bucket); more rows -> more blocks along blockIdx.y, which
        # re-read the packed weight mostly from L2 (16 rows in one block spill the accumulators to local memory)
        rows = max(d for d in (4, 3, 2, 1) if batch % d == 0)
        self._inner.sch_inner_reduction(sch, target, bi.block_rv, dequantize_block, None, vec, epilogue, rows)
        return sch


def _guard(rule):
    """A dlight rule that trips on a function it does not fit (an assert inside the rule) declines it instead,
    so the next rule (finally Fallback) schedules it."""
    inner = rule.apply

    def apply(func, target, tunable):
        try:
            return inner(func, target, tunable)
        except (AssertionError, ValueError, IndexError, Exception):  # noqa: BLE001
            return None

    rule.apply = apply
    return rule


def _fused(mod, target):
    tvm = _tvm()
    with target:
        return tvm.transform.Sequential(_fuse_passes())(mod)


def _shash(obj) -> int:
    try:
        from tvm_ffi import structural_hash
    except ImportError:  # pragma: no cover - older TVM
        from tvm.ir import structural_hash
    return int(structural_hash(obj))


_MS_PROBE: list = []
_PROBE_SRC = """
import tvm, tvm_ffi
from tvm import te
A = te.placeholder((8, 8), "float32", name="A")
C = te.compute((8, 8), lambda i, j: A[i, j] * 2.0, name="C")
tvm_ffi.serialization.to_json_graph_str(tvm.IRModule({"main": te.create_prim_func([A, C])}))
"""


def meta_schedule_usable() -> tuple[bool, str]:
    """MetaSchedule's JSON database and builder serialize TIR modules; some TVM wheels crash doing that.

    Probed once, in a subprocess (a segfault there cannot take this process down).
    """
    if not _MS_PROBE:
        import subprocess

        try:
            r = subprocess.run([sys.executable, "-c", _PROBE_SRC], capture_output=True, timeout=120,
                               env=dict(os.environ))
            ok = r.returncode == 0
            why = "" if ok else (f"serializing a TIR module crashes this TVM build (exit {r.returncode}: "
                                 f"{(r.stderr.decode(errors='replace').strip().splitlines() or [''])[0][:120]})")
        except subprocess.TimeoutExpired:
            ok, why = False, "serializing a TIR module hangs in this TVM build"
        _MS_PROBE.append((ok, why))
    return _MS_PROBE[0]


def _meta_schedule(mod, target, trials: int, work_dir):
    """Tune the untuned tasks of ``mod`` (already fused) into ``work_dir``; return the scheduled module."""
    tvm = _tvm()
    ok, why = meta_schedule_usable()
    if not ok:
        raise TVMBackendError(f"tune='meta_schedule' is not usable with tvm {tvm.__version__}: {why} "
                              "(MetaSchedule stores workloads as JSON). Use tune='dlight'.")
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    tasks = ms.relax_integration.extract_tasks(mod, target)
    db = ms.database.JSONDatabase(work_dir=str(work_dir))
    ours = {_shash(t.dispatched[0]) for t in tasks}
    tkey = str(target.kind.name) + ":" + str(target.attrs.get("arch", target.attrs.get("mcpu", "")))
    other_target = other_shape = 0
    for rec in db.get_all_tuning_records():
        rkey = str(rec.target.kind.name) + ":" + str(rec.target.attrs.get("arch", rec.target.attrs.get("mcpu", "")))
        if rkey != tkey:
            other_target += 1
        elif _shash(rec.workload.mod) not in ours:
            other_shape += 1
    if other_target:
        warnings.warn(f"meta_schedule: {other_target} record(s) in {work_dir} are for another target (this build: "
                      f"{tkey}); they are ignored", stacklevel=3)
    if other_shape:
        warnings.warn(f"meta_schedule: {other_shape} record(s) in {work_dir} are for other workloads (another "
                      "model or shape); they are ignored", stacklevel=3)
    todo = [t for t in tasks if db.query_tuning_record(t.dispatched[0], target, "main") is None]
    reused = len(tasks) - len(todo)
    if todo and trials > 0:
        import importlib.util

        ncpu = os.cpu_count() or 1  # explicit counts: MetaSchedule's own default needs psutil
        if importlib.util.find_spec("psutil") is None:  # MetaSchedule asks C++-side too: answer without psutil
            import tvm_ffi

            tvm_ffi.register_global_func("s_tir.meta_schedule.cpu_count", lambda logical=True: ncpu, override=True)
        ctxs, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(todo, str(work_dir), num_threads=ncpu)
        per_task = max(1, int(trials) // max(1, len(todo)))
        cost_model = "xgb" if importlib.util.find_spec("xgboost") else "random"
        ms.tune_tasks(tasks=ctxs, task_weights=weights, work_dir=str(work_dir), max_trials_global=int(trials),
                      max_trials_per_task=per_task, num_trials_per_iter=min(64, per_task), database=db,
                      builder=ms.builder.LocalBuilder(max_workers=ncpu), cost_model=cost_model)
    with target, db:
        mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
    return mod, {"tasks": len(tasks), "reused": reused, "tuned": len(todo) if trials > 0 else 0,
                 "work_dir": str(work_dir)}


def _schedule(mod, target, tune: str, trials: int, work_dir):
    _tvm()
    stats = {}
    mod = _fused(mod, target)
    if tune == "meta_schedule":
        mod, stats = _meta_schedule(mod, target, trials, work_dir)
    if target.kind.name == "cuda" and tune in ("dlight", "meta_schedule"):
        with target:
            mod = _dlight_pass(target)(mod)
    elif target.kind.name == "cuda":  # tune="none": still needs thread bindings to run on a GPU
        from tvm.s_tir import dlight as dl

        with target:
            mod = dl.ApplyDefaultSchedule(dl.gpu.Fallback())(mod)
    return mod, stats


def _finalize(mod, target):
    tvm = _tvm()
    be = _backend_module(target)
    with target:
        return tvm.transform.Sequential(be.dataflow_lower_passes(target) + be.finalize_passes(target))(mod)


@dataclass
class TVMBuild:
    """The result of :func:`build_tvm`: the executable, the scheduled Relax/TIR module and metadata."""

    executable: object
    scheduled: object  # IRModule after fusion + scheduling (before VM lowering)
    target: object
    info: dict = field(default_factory=dict)

    def primfunc_names(self) -> list[str]:
        tvm = _tvm()
        return sorted(gv.name_hint for gv, f in self.scheduled.functions.items()
                      if isinstance(f, tvm.tirx.PrimFunc))

    def primfunc_script(self, name_contains: str = "") -> str:
        """TVMScript of the scheduled PrimFuncs whose name contains ``name_contains``."""
        tvm = _tvm()
        return "\n".join(f.script() for gv, f in self.scheduled.functions.items()
                         if isinstance(f, tvm.tirx.PrimFunc) and name_contains in gv.name_hint)

    def device_source(self) -> str:
        """Generated device source (CUDA C for target cuda; empty for llvm)."""
        srcs = []

        def walk(m):
            for i in m.imports:
                try:
                    if i.kind in ("cuda",):
                        srcs.append(i.inspect_source())
                except Exception:  # noqa: BLE001
                    pass
                walk(i)

        walk(self.executable.mod)
        return "\n".join(srcs)

    def kernel_names(self) -> list[str]:
        """CUDA kernels in the built module (one per fused PrimFunc launch site)."""
        return sorted(set(re.findall(r"__global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(", self.device_source())))


def build_tvm(model, example_inputs, target="cuda", tune: str = "dlight", *, trials: int = 64,
              work_dir=None, dtype: torch.dtype | None = None, accum_dtype: str = "float32") -> TVMBuild:
    """Import, fuse, schedule and compile (no device needed: ``target="cuda"`` builds on a machine
    without a GPU when nvcc / NVRTC is there)."""
    tvm = _tvm()
    if tune not in TUNERS:
        raise TVMBackendError(f"tune must be one of {TUNERS}, got {tune!r}")
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 0:
        raise TVMBackendError(f"trials must be an int >= 0, got {trials!r}")
    if tune == "meta_schedule" and work_dir is None:
        raise TVMBackendError("tune='meta_schedule' needs work_dir (the records database, reused next time)")
    tgt = make_target(target)
    if tune == "meta_schedule" and tgt.kind.name == "llvm" and "num-cores" not in tgt.attrs:
        from tvm.target import Target

        tgt = Target({"kind": "llvm", "num-cores": os.cpu_count() or 1})  # MetaSchedule needs it
    if isinstance(model, tvm.IRModule):
        mod, info = model, {"inputs": [], "outputs": ["output_0"], "layers": []}
    else:
        mod, info = lower_to_relax(model, example_inputs, dtype=dtype, accum_dtype=accum_dtype,
                                   cuda=tgt.kind.name == "cuda")
    sched, stats = _schedule(mod, tgt, tune, trials, work_dir)
    final = _finalize(sched, tgt)
    try:
        ex = tvm.compile(final, target=tgt, relax_pipeline=None)
    except Exception as e:  # noqa: BLE001
        raise TVMBackendError(f"tvm.compile for target {tgt.kind.name} failed: {type(e).__name__}: "
                              f"{str(e).strip().splitlines()[-1] if str(e).strip() else ''}") from e
    info = dict(info, target=tgt.kind.name, target_str=str(tgt), tune=tune, tuning=stats)
    names = [gv.name_hint for gv, f in sched.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
    info["fused_decode_primfuncs"] = sorted(n for n in names if "decode" in n or "fxc_packed" in n)
    return TVMBuild(ex, sched, tgt, info)


def compile_tvm(gm: nn.Module, example_inputs, target="cuda", tune: str = "dlight", *, device: str | None = None,
                trials: int = 64, work_dir=None, dtype: torch.dtype | None = None,
                accum_dtype: str = "float32"):
    """Lower ``gm`` (a model with QuantLinear / QuantConv2d layers) to TVM and return a runner.

    ``target``: ``"cuda"`` or ``"llvm"``; ``tune``: ``"dlight"`` (rule-based GPU schedules; the default
    CPU lowering on llvm), ``"meta_schedule"`` (``trials`` trials, records in ``work_dir`` reused next
    time) or ``"none"``.  ``dtype`` (e.g. ``torch.float16``) runs the float parts and activations in that
    dtype.  Raises :class:`TVMBackendError` for a CUDA target when TVM sees no GPU (use
    :func:`build_tvm` to only compile).
    """
    tvm = _tvm()
    from ..runtime.tvm_runner import TVMRunner

    tgt_name = target.get("kind") if isinstance(target, dict) else getattr(getattr(target, "kind", None), "name",
                                                                          target)
    if device is None:
        device = "cuda" if str(tgt_name).startswith("cuda") else "cpu"
    if str(device).startswith("cuda") and not _cuda_available(tvm):
        raise TVMBackendError(f"target={tgt_name!r} / device={device!r} needs a CUDA GPU visible to TVM, and none "
                              "was found (tvm.cuda(0).exist is False). Use target='llvm' on this machine, or "
                              "build_tvm(..., target='cuda') to only compile.")
    b = build_tvm(gm, example_inputs, target, tune, trials=trials, work_dir=work_dir, dtype=dtype,
                  accum_dtype=accum_dtype)
    return TVMRunner(b.executable, device, b.info, build=b)


# ----------------------------------------------------------------------------------------------------------
# command line: fxcompress export DIR --format tvm --target llvm|cuda --out model.so


def add_export_tvm_args(p) -> None:
    p.add_argument("--target", default="llvm", choices=["llvm", "cuda"])
    p.add_argument("--tune", default="dlight", choices=list(TUNERS))
    p.add_argument("--trials", type=int, default=64)
    p.add_argument("--work-dir", default=None, help="MetaSchedule records (reused on the next build)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"])


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise TVMBackendError(f"--input-shape must look like 1,1,8,8, got {text!r}") from None


def cli_export_tvm(args) -> int:
    """``fxcompress export DIR --format tvm --target llvm|cuda --out model.so [--input-shape 1,1,8,8]``.

    Reads a saved model directory, builds it (no GPU needed for ``--target cuda``) and writes the library
    plus ``model.so.json``.  Expects ``args.model`` (the saved dir), ``args.out`` and ``args.input_shape``
    (a list of shapes, as the ONNX export command takes).
    """
    from ..runtime.artifact import load_artifact
    from ..runtime.artifact import read_manifest

    src = getattr(args, "dir", None) or getattr(args, "model", None)
    gm = load_artifact(src)
    shapes = [_parse_shape(s) for s in (getattr(args, "input_shape", None) or [])]
    if not shapes:
        man = read_manifest(src)
        shapes = [tuple(s["shape"]) for s in man.get("example_inputs") or []] or \
            [tuple(s) for s in (man.get("extra", {}) or {}).get("input_shapes", [])] or None
    if not shapes:
        raise TVMBackendError("--input-shape is needed (e.g. --input-shape 1,1,8,8): TVM builds for static shapes")
    dt = torch.float16 if getattr(args, "dtype", "float32") == "float16" else None
    inputs = [torch.randn(*s) for s in shapes]
    b = build_tvm(gm, inputs, args.target, getattr(args, "tune", "dlight"), trials=getattr(args, "trials", 64),
                  work_dir=getattr(args, "work_dir", None), dtype=dt)
    from ..runtime.tvm_runner import export_build

    out = export_build(b, args.out)
    print(f"wrote {out} ({Path(out).stat().st_size} bytes) and {out}.json for target {args.target}; "
          f"{len(b.info['layers'])} packed integer linear(s), PrimFuncs: {len(b.primfunc_names())}")
    return 0
