"""Donated inputs: a KV cache written in place instead of copied.

The cached step graphs (:mod:`fxcompress.lm`) are functional: each attention layer returns
``scatter(k_cache, 2, idx, k)``, a new cache.  Compiled as written, every decode step copies every layer's whole
cache into a freshly allocated output before writing one position into it (on the 2048-wide model two extra
kernels and ~3 MB of traffic per cache per token), and on CUDA the step's outputs cannot live in the static
memory of a captured CUDA graph.

:func:`inplace_scatter_pass` rewrites ``scatter_elements(x, idx, upd)`` on a *donated* function input ``x``
(named by the caller: the input is consumed and its buffer reused) into ``call_tir_inplace`` of a kernel that
writes only ``upd``'s elements into ``x``'s buffer.  The step then returns the input buffer itself as the new
cache.  Only a scatter that is the input's sole use is rewritten (anything else reading ``x`` would see the
write); a donated name that matches no such scatter raises, so a caller never believes its cache is updated
in place when it is not.  A donated input that the importer already passes to a ``call_tir_inplace`` as an
in-place argument (the fused decode attention, :mod:`.kernels.decode_attention`, writes both caches of a layer)
counts as updated in place when that call is its sole use.
"""
from __future__ import annotations

from .base import TVMBackendError

__all__ = ["inplace_scatter", "inplace_scatter_pass", "scatter_update_primfunc"]


def scatter_update_primfunc(data_shape, index_shape, dtype: str, index_dtype: str, axis: int, cuda: bool):
    """A PrimFunc ``(data, index, updates) -> data`` with ``data[.., index[i], ..] = updates[i]`` along ``axis``
    for every element ``i`` of ``updates`` (scatter_elements, reduction "update"), writing ``data`` in place.
    CUDA: one thread per update element (already scheduled); LLVM: a plain loop."""
    from tvm.script import tirx as T

    n = 1
    for s in index_shape:
        n *= int(s)
    ishape = [int(s) for s in index_shape]
    dshape = [int(s) for s in data_shape]
    threads = 256
    blocks = (n + threads - 1) // threads

    def coords(flat):
        out, rest = [], flat
        for s in reversed(ishape):
            out.append(rest % s)
            rest = rest // s
        return list(reversed(out))

    if cuda:
        @T.prim_func(private=True)
        def func(data: T.Buffer(dshape, dtype), index: T.Buffer(ishape, index_dtype),
                 updates: T.Buffer(ishape, dtype)):
            T.func_attr({"tir.is_scheduled": True, "tirx.is_scheduled": True, "tir.noalias": True})
            for bx in T.thread_binding(blocks, thread="blockIdx.x"):
                for tx in T.thread_binding(threads, thread="threadIdx.x"):
                    if bx * threads + tx < n:
                        c = coords(bx * threads + tx)
                        j = index[tuple(c)]
                        data[tuple(c[:axis] + [j + T.Cast(index_dtype, j < 0) * dshape[axis]] + c[axis + 1:])] = \
                            updates[tuple(c)]
    else:
        @T.prim_func(private=True)
        def func(data: T.Buffer(dshape, dtype), index: T.Buffer(ishape, index_dtype),
                 updates: T.Buffer(ishape, dtype)):
            T.func_attr({"tir.noalias": True})
            for f in T.serial(n):
                c = coords(f)
                j = index[tuple(c)]
                data[tuple(c[:axis] + [j + T.Cast(index_dtype, j < 0) * dshape[axis]] + c[axis + 1:])] = \
                    updates[tuple(c)]

    return func


def inplace_scatter_pass(donated, cuda: bool, problems: list | None = None):
    """A module pass: ``scatter_elements`` (reduction "update") on a donated input of ``main`` -> in place.

    ``donated``: input names (Relax parameter names: the graph's placeholder names).  A donated input with no
    scatter to rewrite, or read by anything else, is left alone and described in ``problems``
    (:func:`inplace_scatter` raises them)."""
    import tvm
    from tvm import relax

    donated = frozenset(donated)
    problems = [] if problems is None else problems
    scatter = tvm.ir.Op.get("relax.scatter_elements")
    inplace_call = tvm.ir.Op.get("relax.call_tir_inplace")

    @tvm.transform.module_pass(opt_level=0, name="fxc.InplaceScatter")
    def _pass(mod, _ctx):
        if not donated:
            return mod
        main = mod["main"]
        params = {p.name: p for p in main.params}
        unknown = sorted(donated - set(params))
        if unknown:
            problems.append(f"donated inputs {unknown} are not inputs of the function (inputs: {sorted(params)})")
            return mod
        uses: dict = {}

        class _Count(relax.PyExprVisitor):
            def visit_var_(self, v):  # noqa: N802 - TVM's visitor name
                uses[v] = uses.get(v, 0) + 1

        relax.expr_functor.visitor(_Count)().visit_expr(main)
        rewritten: list[str] = []

        class _Inplace(relax.PyExprVisitor):  # donated inputs some call_tir_inplace already writes in place
            def visit_call_(self, call):  # noqa: N802
                if call.op.same_as(inplace_call) and isinstance(call.args[1], relax.Tuple):
                    for i in call.attrs.inplace_indices:
                        arg = call.args[1].fields[int(i)] if int(i) >= 0 else None
                        if isinstance(arg, relax.Var) and arg.name in donated and arg.same_as(params.get(arg.name)):
                            if uses.get(arg, 0) != 1:
                                problems.append(f"donated input {arg.name!r} is read {uses.get(arg, 0)} times; it "
                                                "can be updated in place only when the call writing it is its one use")
                            else:
                                rewritten.append(arg.name)
                for a in call.args:
                    self.visit_expr(a)

        relax.expr_functor.visitor(_Inplace)().visit_expr(main)

        @relax.expr_functor.mutator
        class _Rewrite(relax.PyExprMutator):
            def visit_call_(self, call):  # noqa: N802
                call = self.visit_expr_post_order(call)
                if not (isinstance(call, relax.Call) and call.op.same_as(scatter)):
                    return call
                data = call.args[0]
                if not (isinstance(data, relax.Var) and data.name in donated and params.get(data.name)
                        is not None and data.same_as(params[data.name])):
                    return call
                if str(call.attrs.reduction) != "update":
                    return call
                if uses.get(data, 0) != 1:
                    problems.append(f"donated input {data.name!r} is read {uses.get(data, 0)} times; it can be "
                                    "updated in place only when the scatter into it is its one use")
                    return call
                dty, ity = data.ty, call.args[1].ty
                axis = int(call.attrs.axis) % len(dty.shape)
                f = scatter_update_primfunc([int(s) for s in dty.shape], [int(s) for s in ity.shape], str(dty.dtype),
                                            str(ity.dtype), axis, cuda)
                gv = self.builder_.add_func(f, f"fxc_kv_write_{data.name}")
                rewritten.append(data.name)
                return relax.call_tir_inplace(gv, relax.Tuple(list(call.args)), inplace_indices=[0],
                                              out_ty=dty)

        rw = _Rewrite(mod)
        rw.builder_.update_func(mod.get_global_var("main"), rw.visit_expr(main))
        out = rw.builder_.get()
        missing = sorted(donated - set(rewritten))
        if missing and not problems:
            problems.append(f"donated inputs {missing} are not written by a scatter (the KV-cache write pattern); "
                            "nothing could be updated in place for them")
        return out

    return _pass


def inplace_scatter(mod, donated, cuda: bool):
    """:func:`inplace_scatter_pass` applied to ``mod``; raises :class:`TVMBackendError` naming each donated input
    that could not be updated in place (a pass cannot raise through TVM's FFI with its own exception type)."""
    problems: list[str] = []
    out = inplace_scatter_pass(donated, cuda, problems)(mod)
    if problems:
        raise TVMBackendError("; ".join(problems))
    return out
