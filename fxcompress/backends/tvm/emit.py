"""Relax emission of one quantized linear: a fused decode+matmul te PrimFunc, or a hand-scheduled CUDA kernel.

Each quantized linear becomes ONE PrimFunc (``fused_decode_matmul``): a ``dequantize`` block that decodes
``(q - zero_point) * scale`` from the packed ``uint32`` words (:mod:`.packing`) and a ``matmul`` reduction block
that reads it (accumulating in float32, then a cast block when activations are fp16).  On CUDA, fp16 layers with
1..32 rows (int4 / int8, tensor cores: :mod:`.kernels.mma_batch` from ``TVMBuildConfig.mma_batch_min_m`` rows,
:mod:`.kernels.mma_gemv` below) or 1..16 rows (CUDA cores) are emitted as the hand-scheduled kernels of
:mod:`.kernels` where they apply (``TVMBuildConfig.gemv_kernel``).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np

from ...nn import QuantLinear
from ...quant import QuantWeight
from .base import TVMBackendError, require_tvm
from .config import TVMBuildConfig
from .kernels.cuda_core_gemv import Tile, packed_gemv_primfunc, supports, tile_for
from .kernels.epilogue import Epilogue
from .kernels.mma_batch import batch_supports, packed_mma_batch_primfunc
from .kernels.mma_gemv import mma_supports, packed_mma_primfunc
from .kernels.prologue import MAX_PROLOGUE_M, Prologue
from .packing import pack_mma_words, pack_words, unpack_words

__all__ = ["emit_packed_linear", "emit_quant_linear", "fxc_kind", "fxc_kernel_params", "fxc_kernel_parts",
           "fxc_primfunc", "LayerInfo", "FXC_KERNEL_ATTR", "FXC_PARTS_ATTR", "MMA_KINDS"]

MMA_KINDS = ("fxc_mma", "fxc_mma_batch")  # the tensor-core kernels: weights in pack_mma_words' fragment order
FXC_KERNEL_ATTR = "fxc_kernel"  # PrimFunc attribute: the JSON generator arguments of a hand-written kernel
FXC_PARTS_ATTR = "fxc_kernel_parts"  # PrimFunc attribute: JSON {"epilogue": kind, "prologue": {kind, eps}}

DEFAULT_CONFIG = TVMBuildConfig()


@dataclass
class LayerInfo:
    name: str
    bits: int
    granularity: str
    group_size: int | None
    shape: tuple
    zero_point: str  # "none" | "integer" | "fractional"
    packed_bytes: int
    primfunc: str = ""
    rows: int = 0  # activation rows (the product of the input's leading dims; -1 when dynamic)
    kernel: str = "te"  # "fxc_gemv" / "fxc_mma" / "fxc_mma_batch" (hand-scheduled CUDA kernels) or "te" (fused
    # decode+matmul, scheduled later)


def emit_quant_linear(bb, x, q: QuantLinear, name: str, accum_dtype: str = "float32", cuda: bool = False,
                      config: TVMBuildConfig = DEFAULT_CONFIG):
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
                           name=name, cuda=cuda, used=kernel, config=config)
    xshape = [int(d) if hasattr(d, "value") else d for d in x.ty.shape]
    rows = int(np.prod(xshape[:-1])) if all(isinstance(d, int) for d in xshape) else -1
    info = LayerInfo(name, spec.bits, spec.granularity, spec.group_size, tuple(qw.shape), zkind, int(words.nbytes),
                     rows=rows, kernel=kernel[0])
    return y, info


def emit_packed_linear(bb, x, words: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, *, bits: int,
                       qmin: int, out_features: int, in_features: int, bias: np.ndarray | None = None,
                       accum_dtype: str = "float32", name: str = "linear", cuda: bool = False,
                       used: list | None = None, config: TVMBuildConfig = DEFAULT_CONFIG):
    """Emit one ``fused_decode_matmul`` PrimFunc call: ``x @ ((u + qmin - zp) * scale)^T (+ bias)``.

    ``words``: ``uint32 (N, ceil(K / (32 // bits)))`` from :func:`pack_words`; ``scale`` / ``zero_point``:
    ``(rows, groups)`` with rows 1 or N (``zero_point`` None or all zero: no zero-point tensor).
    ``cuda``: the build targets CUDA, so the hand-scheduled GEMV (``config.gemv_kernel``) may be used; which
    kernel was emitted is appended to ``used`` ("fxc_gemv", "fxc_mma", "fxc_mma_batch" or "te").
    """
    require_tvm()
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
    if not isinstance(config, TVMBuildConfig):
        raise TVMBackendError(f"config must be a TVMBuildConfig, got {type(config).__name__}")
    decode = config.decode_mode if bits <= 8 else "convert"
    m_rows = int(np.prod(xshape[:-1])) if all(isinstance(d, int) for d in xshape) else -1
    kind = fxc_kind(m_rows, k_in, n_out, bits, gs, dtype, config) if cuda and config.gemv_kernel == "fxc" else None
    if (m_rows, k_in, n_out, bits, gs) in config.te_linears:  # a tuned te kernel measured faster (meta_schedule)
        kind = None
    if kind is not None:
        if used is not None:
            used.append(kind)
        return _emit_fxc_gemv(bb, x, xshape, words, scale, zero_point if has_zp else None, bias, bits=bits,
                              qmin=qmin, n_out=n_out, k_in=k_in, gs=gs, kind=kind, config=config)
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


def fxc_kind(m: int, k: int, n: int, bits: int, gs: int, dtype: str,
             config: TVMBuildConfig = DEFAULT_CONFIG) -> str | None:
    """Which hand-scheduled CUDA kernel takes this layer: "fxc_mma_batch" (int4 / int8 tensor cores, an activation
    fragment reused for several row tiles; from ``config.mma_batch_min_m`` rows when ``config.mma_batch``),
    "fxc_mma" (int4 / int8 tensor cores, from ``config.mma_min_m`` rows), "fxc_gemv" (CUDA cores) or None
    (dlight's schedules)."""
    if m <= 0:
        return None
    if config.mma_batch and m >= max(config.mma_min_m, config.mma_batch_min_m) and batch_supports(
            m=m, k=k, n=n, bits=bits, group_size=gs, dtype=dtype, tiles=config.mma_batch_tiles) is None:
        return "fxc_mma_batch"
    if m >= config.mma_min_m and mma_supports(m=m, k=k, n=n, bits=bits, group_size=gs, dtype=dtype) is None:
        return "fxc_mma"
    tile = tile_for(m, k, n, config.tiles)
    if supports(m=m, k=k, n=n, bits=bits, group_size=gs, dtype=dtype, tile=tile) is None:
        return "fxc_gemv"
    return None


def _add_kernel(bb, f, key: str):
    """Add hand-written kernel ``f`` (made from the description ``key``) to the module being built, once per
    distinct kernel: a kernel with the same key (another layer of the same shape) is reused.  A second distinct
    kernel of the same kind gets a renamed var and that name as its symbol (symbols must be unique).  Keying
    matters: comparing functions would see the renamed copy's symbol differ from a fresh kernel's, and every
    later layer used to compile its own copy (30-layer models: hundreds of identical kernels through nvcc)."""
    import tvm

    for gv, g in bb.get().functions.items():
        if isinstance(g, tvm.tirx.PrimFunc) and g.attrs is not None and str(g.attrs.get("fxc.kernel_key", "")) == key:
            return gv
    name = f.attrs["global_symbol"]
    f = f.with_attr("fxc.kernel_key", key)
    gv = bb.add_func(f, name)
    if gv.name_hint != name:
        bb.update_func(gv, f.with_attr("global_symbol", gv.name_hint))
    return gv


def _emit_fxc_gemv(bb, x, xshape, words, scale, zero_point, bias, *, bits, qmin, n_out, k_in, gs, kind,
                   config: TVMBuildConfig):
    """``call_tir`` of a hand-scheduled kernel (already scheduled; FuseOps leaves it alone): ``kind`` "fxc_mma"
    / "fxc_mma_batch" = the int4 / int8 tensor-core kernels (their own weight layout), "fxc_gemv" = the CUDA-core
    packed GEMV."""
    from tvm import relax

    m_rows = int(np.prod(xshape[:-1]))
    params = dict(kind=kind, m=m_rows, k=k_in, n=n_out, bits=bits, qmin=qmin, group_size=gs,
                  scale_rows=int(scale.shape[0]), has_zero_point=zero_point is not None, has_bias=bias is not None,
                  lead=[int(d) for d in xshape[:-1]])
    if kind in MMA_KINDS:
        tiles = config.mma_tiles if kind == "fxc_mma" else config.mma_batch_tiles
        params["tiles"] = None if tiles is None else {c: list(t) for c, t in tiles.items()}
        words = pack_mma_words(unpack_words(words, bits, k_in, qmin), qmin, bits)
    else:
        params["tile"] = asdict(tile_for(m_rows, k_in, n_out, config.tiles))
    f = fxc_primfunc(params, Epilogue(), kind.replace("fxc_", "fxc_packed_"))
    gv = _add_kernel(bb, f, json.dumps(params, sort_keys=True))
    args = [x, relax.const(np.ascontiguousarray(words, dtype=np.uint32)), relax.const(scale.astype(np.float16))]
    if zero_point is not None:
        args.append(relax.const(np.asarray(zero_point).astype(np.float16)))
    if bias is not None:
        args.append(relax.const(np.asarray(bias).astype(np.float16)))
    return bb.emit(relax.call_tir(gv, relax.Tuple(args), relax.TensorType((*xshape[:-1], n_out), "float16")))




def fxc_primfunc(params: dict, epilogue: Epilogue, name: str, prologue: Prologue = Prologue()):
    """The hand-written kernel of ``params`` (:data:`FXC_KERNEL_ATTR`) with ``epilogue`` (and, tensor-core kernel
    only, ``prologue``); it carries ``params`` in that attribute and the epilogue / prologue in
    :data:`FXC_PARTS_ATTR`, so a later pass can regenerate it with another epilogue or prologue."""
    common = dict(m=params["m"], k=params["k"], n=params["n"], qmin=params["qmin"], group_size=params["group_size"],
                  scale_rows=params["scale_rows"], has_zero_point=params["has_zero_point"],
                  has_bias=params["has_bias"], lead=tuple(params["lead"]), bits=params["bits"], name=name,
                  epilogue=epilogue)
    if params["kind"] in MMA_KINDS:
        tiles = params.get("tiles")
        tiles = None if tiles is None else {c: tuple(t) for c, t in tiles.items()}
        if params["kind"] == "fxc_mma":
            f = packed_mma_primfunc(**common, tiles=tiles, prologue=prologue)
        elif prologue.kind != "none":
            raise TVMBackendError(f"the tensor-core batch kernel has no {prologue.kind} prologue (only fxc_mma, "
                                  f"1..{MAX_PROLOGUE_M} rows, has)")
        else:
            f = packed_mma_batch_primfunc(**common, tiles=tiles)
    elif params["kind"] == "fxc_gemv":
        if prologue.kind != "none":
            raise TVMBackendError(f"the CUDA-core kernel has no {prologue.kind} prologue (tensor-core kernel only)")
        f = packed_gemv_primfunc(**common, tile=Tile(**params["tile"]))
    else:
        raise TVMBackendError(f"unknown hand-written kernel kind {params['kind']!r}")
    parts = json.dumps({"epilogue": epilogue.kind, "prologue": prologue.to_json()}, sort_keys=True)
    return f.with_attr(FXC_KERNEL_ATTR, json.dumps(params, sort_keys=True)).with_attr(FXC_PARTS_ATTR, parts)


def fxc_kernel_params(func) -> dict | None:
    """The generator arguments of a hand-written kernel PrimFunc (None for any other function)."""
    attrs = getattr(func, "attrs", None)
    if attrs is None or FXC_KERNEL_ATTR not in attrs:
        return None
    return json.loads(str(attrs[FXC_KERNEL_ATTR]))


def fxc_kernel_parts(func) -> tuple[Epilogue, Prologue] | None:
    """The epilogue and prologue a hand-written kernel PrimFunc was generated with (None for any other function)."""
    attrs = getattr(func, "attrs", None)
    if attrs is None or FXC_KERNEL_ATTR not in attrs:
        return None
    if FXC_PARTS_ATTR not in attrs:
        return Epilogue(), Prologue()
    parts = json.loads(str(attrs[FXC_PARTS_ATTR]))
    return Epilogue(parts["epilogue"]), Prologue(**parts["prologue"])
