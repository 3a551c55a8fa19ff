"""dlight's batch-1 GEMV rule with its CUDA tile parameters taken from ``TVMBuildConfig.gemv_cuda``."""
from __future__ import annotations

__all__ = ["gemv_rule"]


def gemv_rule(gemv_cuda=None):
    """dlight's GEMV rule; with ``gemv_cuda`` (``TVMBuildConfig.gemv_cuda``) set, its CUDA inner-reduction
    parameters overridden."""
    from tvm.s_tir.dlight import gpu as dlgpu

    cfg = dict(gemv_cuda or {})
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
