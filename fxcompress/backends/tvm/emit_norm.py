"""Relax emission of inference BatchNorm that keeps the activation dtype (fp16 / bf16 CNNs).

TVM 0.27 legalizes ``relax.nn.batch_norm`` through ``topi.nn.batch_norm``, which adds the Python float ``epsilon``
to the variance and thereby promotes an fp16 computation to float32: the legalized kernel *writes float32* while the
Relax op still says float16.  Every op after it is then legalized in float32 and the next ``call_tir`` that was
emitted for an fp16 input (an integer conv of :mod:`.emit_conv`) fails ``CallTIRRewrite`` with "Argument 0 type
mismatch: expected ... float16, given ... float32" (or FuseTIR with a TensorLoad type error).

:func:`convert_batch_norm_no_training` (the ``custom_convert_map`` entry for
``aten._native_batch_norm_legit_no_training``) computes as torch does for fp16 / bf16 inputs on CPU and CUDA:
in float32 (the parameters upcast, ``(x - mean) / sqrt(var + eps) * weight + bias``) and the result rounded
once to the input dtype.  The two casts fuse into the BatchNorm kernel (FuseOps), and constant parameters are
converted at import (no extra kernels).  float32 inputs are emitted unchanged.
"""
from __future__ import annotations

import numpy as np

__all__ = ["emit_batch_norm_inference", "convert_batch_norm_no_training"]

_LOW_PRECISION = ("float16", "bfloat16")


def _as_float32(bb, v):
    import tvm
    from tvm import relax

    if str(v.ty.dtype) == "float32":
        return v
    if isinstance(v, tvm.ir.expr.Constant) and str(v.value.dtype) == "float16":
        return relax.const(v.value.numpy().astype(np.float32))
    return bb.emit(relax.op.astype(v, "float32"))


def emit_batch_norm_inference(bb, x, weight, bias, mean, var, eps: float):
    """``(x - mean) / sqrt(var + eps) * weight + bias`` over axis 1 (``weight`` / ``bias`` may be None), with the
    result in ``x``'s dtype; fp16 / bf16 inputs are computed in float32 and rounded once at the end."""
    from tvm import relax

    dtype = str(x.ty.dtype)
    c = int(x.ty.shape[1])
    ones, zeros = np.ones(c, np.float32), np.zeros(c, np.float32)
    low = dtype in _LOW_PRECISION
    params = [weight, bias, mean, var]
    defaults = [ones, zeros, zeros, ones]
    pdt = "float32" if low else dtype
    params = [relax.const(d.astype(pdt)) if p is None else (_as_float32(bb, p) if low else p)
              for p, d in zip(params, defaults)]
    xf = bb.emit(relax.op.astype(x, "float32")) if low else x
    bn = bb.emit(relax.op.nn.batch_norm(xf, *params, axis=1, epsilon=float(eps), center=True, scale=True,
                                        training=False))
    y = bb.emit(relax.TupleGetItem(bn, 0))
    return bb.emit(relax.op.astype(y, dtype)) if low else y


def convert_batch_norm_no_training(node, importer):
    """``custom_convert_map`` entry for ``_native_batch_norm_legit_no_training.default`` ``(x, weight, bias,
    running_mean, running_var, momentum, eps)``; returns the normalized tensor (the importer's ``getitem 0`` of
    the aten op's tuple is then the tensor itself)."""
    args = list(node.args)
    eps = args[6] if len(args) > 6 else node.kwargs.get("eps", 1e-5)
    env = importer.env
    x = env[args[0]]
    w, b, mean, var = (None if a is None else env[a] for a in args[1:5])
    return emit_batch_norm_inference(importer.block_builder, x, w, b, mean, var, eps)
