"""A dlight schedule rule: GEMV-style schedule for a quantized linear with a static small batch (2..max_m rows)."""
from __future__ import annotations

__all__ = ["SmallBatchGEMV"]


class SmallBatchGEMV:
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
