"""Relax passes of the TVM pipeline: the fxcompress rewrites and the fusion sequence.

Each rewrite is a ``relax.PyExprMutator`` run over every Relax function by :func:`relax_function_pass` (TVM is
imported when a pass is made, so this module imports without TVM).

Fewer kernel launches per decode step (issue 13; :func:`fuse_passes` with ``epilogues=True``):

* :func:`gemv_epilogue_pass`: a hand-written quantized-linear kernel (``call_tir`` of an opaque, already
  scheduled PrimFunc, which ``FuseOps`` cannot fuse with anything) followed by a residual ``add`` or, for a fused
  gate/up linear, by ``split -> silu(gate) * up``, becomes one ``call_tir`` of the kernel regenerated with that
  epilogue (:mod:`.kernels.epilogue`).
* :func:`rms_norm_prologue_pass`: an RMSNorm whose output only feeds tensor-core quantized-linear kernels of at
  most 4 rows (``input_layernorm -> q/k/v``, ``post_attention_layernorm -> gate/up`` at decode) becomes the
  ``"rms_norm"`` prologue of those kernels (:mod:`.kernels.prologue`): they read the norm's input and weight, and
  the norm's kernel is gone.
* :func:`split_to_slices_pass`: a ``split`` whose parts feed different ops (q / k / v after a fused q/k/v linear)
  becomes one ``strided_slice`` per part, which ``FuseOps`` fuses into each consumer (a ``split`` returns a tuple,
  which it cannot fuse, and TVM emits one kernel per part).
* :func:`rms_norm_fusion_pass`: any other RMSNorm chain ``astype -> x*x -> mean -> +eps -> rsqrt -> x*r -> astype
  -> w*`` as one kernel (``FuseOps`` leaves the fp32 cast and the square outside the reduction because the cast
  is read twice, so it was three launches).
"""
from __future__ import annotations

import json

import numpy as np

__all__ = ["small_int_power_pass", "constant_transpose_pass", "fuse_passes", "relax_function_pass",
           "gemv_epilogue_pass", "rms_norm_prologue_pass", "split_to_slices_pass", "rms_norm_fusion_pass"]


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


def _is_op(expr, name: str) -> bool:
    from tvm import relax

    return isinstance(expr, relax.Call) and isinstance(expr.op, __import__("tvm").ir.Op) and expr.op.name == name


def _shape_dtype(expr):
    """(static shape tuple or None, dtype) of a tensor expression."""
    si = expr.ty
    dtype = str(getattr(si, "dtype", ""))
    shape = getattr(si, "shape", None)
    try:
        return tuple(int(d) for d in shape.values), dtype
    except (AttributeError, TypeError, ValueError):
        return None, dtype


class _Uses:
    """Bindings and users of every variable of one Relax function (dataflow and plain blocks)."""

    def __init__(self, func):
        from tvm import relax

        self.value = {}  # var -> bound value
        self.users = {}  # var -> [binding var that reads it] (function output: None)
        self.order = []  # binding vars in program order
        self.in_dataflow = set()  # vars bound inside dataflow blocks (the only ones a rewrite touches)

        def reads(expr):
            found = []

            @relax.expr_functor.visitor
            class _V(relax.PyExprVisitor):
                def visit_var_(self, v):  # noqa: N802
                    found.append(v)

                def visit_dataflow_var_(self, v):  # noqa: N802
                    found.append(v)

            _V().visit_expr(expr)
            return found

        for block in func.body.blocks:
            for b in block.bindings:
                if not isinstance(b, relax.VarBinding):
                    continue
                self.value[b.var] = b.value
                self.order.append(b.var)
                if isinstance(block, relax.DataflowBlock):
                    self.in_dataflow.add(b.var)
                for v in reads(b.value):
                    self.users.setdefault(v, []).append(b.var)
        for v in reads(func.body.body):
            self.users.setdefault(v, []).append(None)

    def only_user(self, var):
        """The one binding var that reads ``var`` (once), else None."""
        u = self.users.get(var, [])
        return u[0] if len(u) == 1 and u[0] is not None else None


def _fxc_call(expr, mod):
    """(GlobalVar, generator params, args) when ``expr`` is a ``call_tir`` of a hand-written kernel."""
    from tvm import relax

    from .emit import fxc_kernel_params

    if not (_is_op(expr, "relax.call_tir") and isinstance(expr.args[0], relax.GlobalVar)):
        return None
    gv = expr.args[0]
    params = fxc_kernel_params(mod[gv]) if gv in mod.functions else None
    if params is None or not isinstance(expr.args[1], relax.Tuple):
        return None
    return gv, params, list(expr.args[1].fields)


def _match_residual(y, uses, params):
    """``add(y, r)`` / ``add(r, y)``, ``y`` read only there, ``r`` an fp16 tensor of y's exact shape (no
    broadcast).  Returns (the add's var, r) or None."""
    add_var = uses.only_user(y)
    add = uses.value.get(add_var) if add_var is not None else None
    if not _is_op(add, "relax.add"):
        return None
    a, b = add.args
    if a.same_as(b):
        return None
    r = b if a.same_as(y) else a if b.same_as(y) else None
    if r is None or _shape_dtype(r) != _shape_dtype(y) or _shape_dtype(y)[1] != "float16":
        return None
    return add_var, r


def _match_float32(y, uses, params):
    """``astype(y, "float32")`` of an fp16 ``y`` read only there, whose result is only returned (e.g. logits):
    then the cast would be a kernel of its own.  A cast that feeds other ops is left to them (FuseOps or the
    RMSNorm fusion fold it into their kernel; an fp32 store would only double the bytes written).  Returns the
    cast's var or None."""
    from tvm import relax

    cast_var = uses.only_user(y)
    cast = uses.value.get(cast_var) if cast_var is not None else None
    if not (_is_op(cast, "relax.astype") and str(cast.attrs.dtype) == "float32"
            and _shape_dtype(y)[1] == "float16"):
        return None

    def only_returned(var, depth=0):
        users = uses.users.get(var, [])
        return bool(users) and depth < 4 and all(
            u is None or (isinstance(uses.value.get(u), relax.Tuple) and only_returned(u, depth + 1)) for u in users)

    return cast_var if only_returned(cast_var) else None


def _match_swiglu(y, uses, params):
    """``split(y, 2 halves, last axis) -> g, u; fp16(g32 * sigmoid(g32)) * u`` with ``g32 = astype(g, fp32)`` (the
    export of ``F.silu(g) * u`` in fp16), every intermediate read only inside the chain.  Returns the final
    multiply's var or None."""
    from .emit import MMA_KINDS

    if params["kind"] not in MMA_KINDS:  # the tensor-core kernels (swiglu_row_order tiles)
        return None
    shape, dtype = _shape_dtype(y)
    if shape is None or dtype != "float16":
        return None
    n = shape[-1]
    split_var = uses.only_user(y)
    split = uses.value.get(split_var) if split_var is not None else None
    if not _is_op(split, "relax.split"):
        return None
    axis = int(split.attrs.axis)
    sections = split.attrs.indices_or_sections
    halves = (isinstance(sections, int) or hasattr(sections, "value")) and int(sections) == 2
    if not halves:
        try:
            halves = [int(i) for i in sections] == [n // 2]
        except TypeError:
            halves = False
    if axis not in (-1, len(shape) - 1) or not halves:
        return None
    parts = {}
    for uv in uses.users.get(split_var, []):
        item = uses.value.get(uv) if uv is not None else None
        if item is None or not hasattr(item, "index") or int(item.index) in parts:
            return None
        parts[int(item.index)] = uv
    if sorted(parts) != [0, 1]:
        return None
    g, u = parts[0], parts[1]
    g32_var = uses.only_user(g)
    g32 = uses.value.get(g32_var)
    if not (_is_op(g32, "relax.astype") and str(g32.attrs.dtype) == "float32"):
        return None
    readers = uses.users.get(g32_var, [])
    if len(readers) != 2 or None in readers:
        return None
    sig_var = next((r for r in readers if _is_op(uses.value[r], "relax.sigmoid")), None)
    mul_var = next((r for r in readers if _is_op(uses.value[r], "relax.multiply")), None)
    if sig_var is None or mul_var is None or uses.only_user(sig_var) is None \
            or not uses.only_user(sig_var).same_as(mul_var):
        return None
    ma, mb = uses.value[mul_var].args
    if not ({ma, mb} == {g32_var, sig_var} or (ma.same_as(g32_var) and mb.same_as(sig_var))
            or (ma.same_as(sig_var) and mb.same_as(g32_var))):
        return None
    h_var = uses.only_user(mul_var)
    h = uses.value.get(h_var) if h_var is not None else None
    if not (_is_op(h, "relax.astype") and str(h.attrs.dtype) == "float16"):
        return None
    out_var = uses.only_user(h_var)
    out = uses.value.get(out_var) if out_var is not None else None
    if not _is_op(out, "relax.multiply") or uses.only_user(u) is None or not uses.only_user(u).same_as(out_var):
        return None
    oa, ob = out.args
    if not ((oa.same_as(h_var) and ob.same_as(u)) or (oa.same_as(u) and ob.same_as(h_var))):
        return None
    return out_var


def _swiglu_args(args, params):
    """The kernel's constant arguments with the weight rows in :func:`.kernels.epilogue.swiglu_row_order`."""
    import tvm
    from tvm import relax

    from .kernels.epilogue import swiglu_row_order, unpack_mma_words
    from .packing import pack_mma_words

    n, bits = params["n"], params["bits"]
    order = swiglu_row_order(n)
    consts = args[1:]
    if not all(isinstance(c, tvm.ir.expr.Constant) for c in consts):
        return None
    words = pack_mma_words(unpack_mma_words(consts[0].value.numpy(), bits)[order], 0, bits)
    out = [args[0], relax.const(words)]
    for c in consts[1:]:  # scale, zero point (rows 1 or n), bias (n,)
        a = c.value.numpy()
        out.append(relax.const(np.ascontiguousarray(a[order] if a.shape[0] == n else a)))
    return out


def gemv_epilogue_pass():
    """Hand-written quantized-linear kernel + the elementwise op(s) that consume its output -> one kernel.

    Matched (every intermediate value read only inside the chain; otherwise nothing changes):

    * ``y = kernel(x, ...); z = add(y, r)`` (either order), ``r`` fp16 of y's exact shape -> ``z = kernel_res(x,
      ..., r)`` (residual epilogue; ``r`` may have other readers);
    * ``y = kernel(x, ...); z = astype(y, "float32")``, ``z`` only returned -> ``z = kernel_f32(x, ...)`` (the
      kernel stores fp32);
    * ``y = kernel(x, ...)`` (tensor cores) ``; g, u = split(y, 2, axis=-1); z = fp16(g32 * sigmoid(g32)) * u`` ->
      ``z = kernel_swiglu(x, ...)`` with the weight rows reordered (:func:`.kernels.epilogue.swiglu_row_order`).

    Only ``call_tir``s of the kernels of :mod:`.kernels` are touched (they are emitted for CUDA only, so on llvm
    the pass finds nothing).
    """
    import tvm
    from tvm import relax

    from .emit import fxc_kernel_parts
    from .kernels.epilogue import Epilogue

    @tvm.transform.module_pass(opt_level=0, name="FxcGemvEpilogue")
    def _pass(mod, _ctx):
        plans = {}
        for gv, f in mod.functions.items():
            if not isinstance(f, relax.Function):
                continue
            uses = _Uses(f)
            new_funcs = []
            for var in uses.order:
                hit = _fxc_call(uses.value[var], mod)
                if hit is None or var not in uses.in_dataflow:
                    continue
                kgv, params, args = hit
                epi, pro = fxc_kernel_parts(mod[kgv])
                if epi.kind != "none" or pro.kind != "none":  # already regenerated with an epilogue / prologue
                    continue
                res = _match_residual(var, uses, params)
                if res is not None:
                    target_var, r = res
                    epi = Epilogue("residual")
                    new_funcs.append((target_var, params, epi, pro, args + [r], kgv.name_hint + epi.name_suffix))
                    continue
                cast_var = _match_float32(var, uses, params)
                if cast_var is not None:
                    epi = Epilogue("float32")
                    new_funcs.append((cast_var, params, epi, pro, args, kgv.name_hint + epi.name_suffix))
                    continue
                out_var = _match_swiglu(var, uses, params)
                if out_var is not None:
                    sargs = _swiglu_args(args, params)
                    if sargs is not None:
                        epi = Epilogue("swiglu")
                        new_funcs.append((out_var, params, epi, pro, sargs, kgv.name_hint + epi.name_suffix))
            new_funcs = [nf for nf in new_funcs if nf[0] in uses.in_dataflow]
            if new_funcs:
                plans[gv] = new_funcs
        return _rewrite_kernel_calls(mod, plans)

    return _pass


def _rewrite_kernel_calls(mod, plans: dict):
    """``mod`` with bindings replaced by calls of regenerated hand-written kernels, then dead code (the chains the
    kernels took over) and the kernels nothing calls any more removed.  ``plans``: Relax function GlobalVar ->
    ``[(binding var, kernel params, Epilogue, Prologue, call args, kernel name)]``; one kernel is made per distinct
    (params, epilogue, prologue)."""
    if not plans:
        return mod
    from tvm import relax

    from .emit import fxc_primfunc

    @relax.expr_functor.mutator
    class _Rewrite(relax.PyExprMutator):
        def __init__(self, mod, plan):
            super().__init__(mod)
            self.plan = plan

        def visit_var_binding_(self, binding):  # noqa: N802 - TVM's visitor name
            entry = self.plan.get(binding.var)
            if entry is None:
                return super().visit_var_binding_(binding)
            gv, args, sinfo = entry
            call = relax.call_tir(gv, relax.Tuple([self.visit_expr(a) for a in args]), sinfo)
            if isinstance(binding.var, relax.DataflowVar):
                new = self.builder_.emit(call, name_hint=binding.var.name)
            else:
                new = self.builder_.emit_output(call, name_hint=binding.var.name)
            self.set_var_remap(binding.var, new)

    out, made = mod, {}  # (params, epilogue, prologue) -> the kernel's GlobalVar
    for fgv, new_funcs in plans.items():
        rw = _Rewrite(out, {})
        for target_var, params, epi, pro, args, name in new_funcs:
            key = (json.dumps(params, sort_keys=True), epi.kind, json.dumps(pro.to_json(), sort_keys=True))
            if key not in made:
                f = fxc_primfunc(params, epi, name, pro)
                made[key] = rw.builder_.add_func(f, name)
                rw.builder_.update_func(made[key], f.with_attr("global_symbol", made[key].name_hint))
            rw.plan[target_var] = (made[key], args, target_var.ty)
        rw.builder_.update_func(fgv, rw.visit_expr(out[fgv]))
        out = rw.builder_.get()
    return _drop_unused_kernels(relax.transform.DeadCodeElimination()(out))


def _drop_unused_kernels(mod):
    """``mod`` without the hand-written kernels no Relax function calls any more (those replaced by an epilogue
    version; they carry a global symbol, so dead-code elimination keeps them, and they would still be compiled)."""
    from tvm import relax

    from .emit import fxc_kernel_params

    called = set()

    @relax.expr_functor.visitor
    class _Refs(relax.PyExprVisitor):
        def visit_global_var_(self, gv):  # noqa: N802
            called.add(gv.name_hint)

    for f in mod.functions.values():
        if isinstance(f, relax.Function):
            _Refs().visit_expr(f)
    for gv, f in list(mod.functions.items()):
        if gv.name_hint not in called and fxc_kernel_params(f) is not None:
            mod = mod.without(gv) if hasattr(mod, "without") else _module_without(mod, gv)
    return mod


def _module_without(mod, gv):
    import tvm

    funcs = {g: f for g, f in mod.functions.items() if not g.same_as(gv)}
    return tvm.IRModule(funcs, attrs=mod.attrs)


def split_to_slices_pass():
    """``parts = split(x, ...); p_i = parts[i]`` with static shapes -> ``p_i = strided_slice(x, ...)``.

    A ``split`` yields a tuple: ``FuseOps`` fuses it with none of its consumers, and it runs as one kernel per part.
    A slice is an injective op that fuses into its consumer (q / k / v of a fused q/k/v linear each into its own
    rotary or transpose kernel).  Values are unchanged (a slice copies the same elements)."""
    from tvm import relax

    @relax.expr_functor.mutator
    class _Rewrite(relax.PyExprMutator):
        def visit_tuple_getitem_(self, item):  # noqa: N802 - TVM's visitor name
            item = self.visit_expr_post_order(item)
            tup = item.tuple_value
            src = self.lookup_binding(tup) if isinstance(tup, relax.Var) else tup
            if not _is_op(src, "relax.split"):
                return item
            x = src.args[0]
            shape, _ = _shape_dtype(x)
            if shape is None:
                return item
            axis = int(src.attrs.axis) % len(shape)
            sec = src.attrs.indices_or_sections
            size = shape[axis]
            if isinstance(sec, int) or hasattr(sec, "value"):
                n = int(sec)
                if size % n:
                    return item
                bounds = [size // n * i for i in range(n + 1)]
            else:
                bounds = [0] + [int(i) for i in sec] + [size]
            i = int(item.index)
            return relax.op.strided_slice(x, axes=[axis], begin=[bounds[i]], end=[bounds[i + 1]])

    return relax_function_pass(_Rewrite, "FxcSplitToSlices")


def _readers(uses, var) -> list:
    return uses.users.get(var, [])


def _read_only_by(uses, var, reader) -> bool:
    """``var`` is read by the binding ``reader`` and nothing else (once or, for ``x * x``, twice)."""
    users = _readers(uses, var)
    return bool(users) and all(u is not None and u.same_as(reader) for u in users)


def _scalar_f32_const(expr) -> float | None:
    import tvm

    if not isinstance(expr, tvm.ir.expr.Constant):
        return None
    a = expr.value.numpy()
    return float(a.reshape(-1)[0]) if a.size == 1 and a.dtype == np.float32 else None


def _match_rms_norm_chain(y, uses):
    """The fp16 RMSNorm chain that ends in ``y`` as the importer emits the LLaMA / Hugging Face RMSNorm:
    ``xf = astype(x, f32); sq = xf * xf; s = mean(sq, axis=-1, keepdims); a = s + eps; r = rsqrt(a);
    nm = xf * r (either order); h = astype(nm, f16); y = g * h (either order)``, ``x`` fp16 of ``y``'s shape, ``g``
    fp16 of shape ``(K,)``, ``eps`` an fp32 scalar constant, every intermediate read only by the next op of the
    chain (``xf`` by ``sq`` and ``nm``) and bound in a dataflow block.  Returns ``(x, g, eps)`` or None.  What
    reads ``y`` is the caller's to check."""
    from tvm import relax

    def bound(v, op):
        val = uses.value.get(v) if isinstance(v, relax.Var) and v in uses.in_dataflow else None
        return val if _is_op(val, op) else None

    mul = bound(y, "relax.multiply")
    yshape, ydt = _shape_dtype(y)
    if mul is None or yshape is None or ydt != "float16" or not yshape:
        return None
    k = yshape[-1]
    for g, h in (mul.args, mul.args[::-1]):
        cast16 = bound(h, "relax.astype")
        if cast16 is not None and str(cast16.attrs.dtype) == "float16" and not g.same_as(h):
            break
    else:
        return None
    if _shape_dtype(g) != ((k,), "float16") or not _read_only_by(uses, h, y):
        return None
    nm = cast16.args[0]
    nmv = bound(nm, "relax.multiply")
    if nmv is None or not _read_only_by(uses, nm, h) or _shape_dtype(nm) != (yshape, "float32"):
        return None
    for xf, r in (nmv.args, nmv.args[::-1]):
        if bound(r, "relax.rsqrt") is not None and bound(xf, "relax.astype") is not None:
            break
    else:
        return None
    cast32 = bound(xf, "relax.astype")
    x = cast32.args[0]
    if str(cast32.attrs.dtype) != "float32" or _shape_dtype(x) != (yshape, "float16"):
        return None
    rs = bound(r, "relax.rsqrt")
    a = rs.args[0]
    if not _read_only_by(uses, r, nm):
        return None
    add = bound(a, "relax.add")
    if add is None or not _read_only_by(uses, a, r):
        return None
    for s_, c in (add.args, add.args[::-1]):
        eps = _scalar_f32_const(c)
        if eps is not None and bound(s_, "relax.mean") is not None:
            break
    else:
        return None
    mean = bound(s_, "relax.mean")
    axes = [int(ax) for ax in mean.attrs.axis] if mean.attrs.axis is not None else None
    if axes not in ([-1], [len(yshape) - 1]) or not bool(mean.attrs.keepdims) or not _read_only_by(uses, s_, a):
        return None
    sq = mean.args[0]
    sqv = bound(sq, "relax.multiply")
    if sqv is None or not (sqv.args[0].same_as(xf) and sqv.args[1].same_as(xf)) or not _read_only_by(uses, sq, s_):
        return None
    xf_users = _readers(uses, xf)  # sq (twice) and nm, nothing else
    if len(xf_users) != 3 or any(u is None for u in xf_users) \
            or sum(u.same_as(sq) for u in xf_users) != 2 or sum(u.same_as(nm) for u in xf_users) != 1:
        return None
    return x, g, eps


def rms_norm_prologue_pass():
    """An RMSNorm whose output only feeds tensor-core quantized-linear kernels -> those kernels with the
    ``"rms_norm"`` prologue (:mod:`.kernels.prologue`): each takes the norm's input and weight and normalizes the
    activations itself; the norm's kernel is gone (``input_layernorm -> fused q/k/v`` and
    ``post_attention_layernorm -> fused gate/up`` in a LLaMA decoder layer: 2 launches per layer).

    Matched: the chain of :func:`_match_rms_norm_chain` whose result ``y`` is read only as the activation input
    (argument 0, and nowhere else in the call) of ``call_tir``s of tensor-core kernels with at most
    :data:`.kernels.prologue.MAX_PROLOGUE_M` rows, ``K`` equal to the norm's width and no prologue yet (the
    epilogue, if any, is kept).  A norm with any other reader (a float linear, a residual, a kernel with more rows)
    stays as it is, and so do look-alikes (another eps placement, a weight of another shape, a reduction over
    another axis, an intermediate read elsewhere).  Runs after :func:`gemv_epilogue_pass`.  On llvm there are no
    hand-written kernels and the pass changes nothing.
    """
    import tvm
    from tvm import relax

    from .emit import fxc_kernel_parts
    from .kernels.prologue import MAX_PROLOGUE_M, Prologue

    @tvm.transform.module_pass(opt_level=0, name="FxcRmsNormPrologue")
    def _pass(mod, _ctx):
        plans = {}
        for fgv, f in mod.functions.items():
            if not isinstance(f, relax.Function):
                continue
            uses = _Uses(f)
            ys = []  # norm outputs read by a kernel, in program order
            for var in uses.order:
                hit = _fxc_call(uses.value[var], mod)
                if hit is not None and isinstance(hit[2][0], relax.Var) and not any(
                        hit[2][0].same_as(v) for v in ys):
                    ys.append(hit[2][0])
            new_funcs = []
            for y in ys:
                chain = _match_rms_norm_chain(y, uses)
                if chain is None:
                    continue
                x, g, eps = chain
                k = _shape_dtype(y)[0][-1]
                calls = []
                for u in _readers(uses, y):
                    hit = _fxc_call(uses.value.get(u), mod) if u is not None and u in uses.in_dataflow else None
                    if hit is None:
                        break
                    kgv, params, args = hit
                    epi, pro = fxc_kernel_parts(mod[kgv])
                    if params["kind"] != "fxc_mma" or params["m"] > MAX_PROLOGUE_M or params["k"] != k \
                            or pro.kind != "none" or sum(a.same_as(y) for a in args) != 1 or not args[0].same_as(y):
                        break
                    calls.append((u, kgv, params, args, epi))
                else:
                    pro = Prologue("rms_norm", eps)
                    for u, kgv, params, args, epi in calls:
                        name = kgv.name_hint
                        suffix = epi.name_suffix
                        if suffix and name.endswith(suffix):
                            name = name[:-len(suffix)]
                        new_funcs.append((u, params, epi, pro, [x, *args[1:], g], name + "_rms" + suffix))
            if new_funcs:
                plans[fgv] = new_funcs
        return _rewrite_kernel_calls(mod, plans)

    return _pass


def _rms_norm_patterns():
    """DPL patterns of the RMSNorm chain as PyTorch exports it (with / without the fp32 cast and the weight)."""
    from tvm.relax.dpl import is_op, wildcard

    def mul(a, b):
        return is_op("relax.multiply")(a, b) | is_op("relax.multiply")(b, a)

    out = []
    for lead in (True, False):  # the fp32 cast before (may be a linear kernel's float32 epilogue) and after
        for trail in (True, False):
            x = wildcard()
            xf = is_op("relax.astype")(x) if lead else x
            sq = is_op("relax.multiply")(xf, xf)
            r = is_op("relax.rsqrt")(is_op("relax.add")(is_op("relax.mean")(sq), wildcard()))
            normed = mul(xf, r)
            back = is_op("relax.astype")(normed) if trail else normed
            out.append(mul(wildcard(), back))
            out.append(back)
    return out


def rms_norm_fusion_pass():
    """The RMSNorm chain -> one fused function (``FuseOpsByPattern``; ``FuseTIR`` makes it one PrimFunc, dlight
    schedules it as one reduction kernel).  Matched only where every intermediate value is read inside the chain;
    the ops and their order are unchanged, so the values are too."""
    from tvm import relax

    def check(ctx) -> bool:  # every matched value except the chain's result is read only inside the chain
        inside = ctx.matched_bindings
        for var, expr in inside.items():
            if expr.same_as(ctx.matched_expr):
                continue
            if any(user not in inside for user in ctx.var_usages.get(var, [])):
                return False
        return True

    pats = [(f"fxc.rms_norm{i}", p, {}, check) for i, p in enumerate(_rms_norm_patterns())]
    return relax.transform.FuseOpsByPattern(pats, bind_constants=False, annotate_codegen=False)


def fuse_passes(epilogues: bool = False, norm_prologue: bool = False):
    """The Relax pass list from import to fused TIR.  ``epilogues``: the launch-saving rewrites above
    (``TVMBuildConfig.fuse_epilogues``, on by default there); ``norm_prologue`` (with ``epilogues``): the RMSNorm
    prologue too (``TVMBuildConfig.fuse_norm_prologue``, off by default there)."""
    from tvm import relax

    # no FoldConstant: it would decode the constant packed weights at build time (back to float)
    # DispatchSortScan: cumsum / sort / topk to their TOPI scan kernels (LegalizeOps leaves them, and the VM then
    # fails on e.g. the bool-mask cumsum of Hugging Face position ids), as TVM's default pipelines do
    fewer = [gemv_epilogue_pass(), *([rms_norm_prologue_pass()] if norm_prologue else []), split_to_slices_pass(),
             rms_norm_fusion_pass()] if epilogues else []
    return [small_int_power_pass(), constant_transpose_pass(), *fewer, relax.backend.DispatchSortScan(),
            relax.transform.LegalizeOps(),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.DeadCodeElimination(), relax.transform.FuseOps(), relax.transform.FuseTIR()]
