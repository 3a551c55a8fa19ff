"""Relax passes of the TVM pipeline: the two fxcompress rewrites and the fusion sequence.

Each rewrite is a ``relax.PyExprMutator`` run over every Relax function by :func:`relax_function_pass` (TVM is
imported when a pass is made, so this module imports without TVM).
"""
from __future__ import annotations

import numpy as np

__all__ = ["small_int_power_pass", "constant_transpose_pass", "fuse_passes", "relax_function_pass"]


def small_int_power_pass():
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

    return relax_function_pass(_Rewrite, "FxcSmallIntPower")


def relax_function_pass(mutator_cls, name: str):
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


def constant_transpose_pass():
    """``permute_dims(constant)`` -> the transposed constant, at build time.

    The importer turns every float ``F.linear(x, W)`` (e.g. an unquantized lm_head) into
    ``matmul(x, permute_dims(W))``.  Without constant folding (left out on purpose, see :func:`fuse_passes`)
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

    return relax_function_pass(_Fold, "FxcFoldConstantTranspose")


def fuse_passes():
    from tvm import relax

    # no FoldConstant: it would decode the constant packed weights at build time (back to float)
    # DispatchSortScan: cumsum / sort / topk to their TOPI scan kernels (LegalizeOps leaves them, and the VM then
    # fails on e.g. the bool-mask cumsum of Hugging Face position ids), as TVM's default pipelines do
    return [small_int_power_pass(), constant_transpose_pass(), relax.backend.DispatchSortScan(),
            relax.transform.LegalizeOps(),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.DeadCodeElimination(), relax.transform.FuseOps(), relax.transform.FuseTIR()]
