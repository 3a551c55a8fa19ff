"""dlight rule for the integer convolutions of :mod:`..kernels.conv_int8` on CUDA: dlight's Matmul schedule on the
implicit GEMM (the ``im2col`` gather, the padding and the weight ``dequantize`` are inlined into its shared-memory
loads, so the kernel reads the int8 weight constant and the activations once from HBM; fused epilogues -- bias,
requantize, ReLU, the next layer's ``act_quantize`` -- are inlined into its store).

Tensor cores are NOT used: dlight's ``MatmulTensorization`` / ``MatmulInt8Tensorization`` (wmma) crash the process
in ``tvm::s_tir::Tensorize`` (a segfault in ``ToJSONGraph``) with TVM 0.27 / apache-tvm-ffi 0.1.14.post0, even for a
plain 256x256 fp16 or int8 matmul, so this rule marks the function ``dlight.do_not_tensorize`` first (Matmul then
takes its SIMT path: int8 products accumulate in int32 registers)."""
from __future__ import annotations

__all__ = ["ConvGEMM", "conv_gemm_pass", "is_conv_gemm"]

CONV_BLOCK = "conv_gemm"  # the reduction block name of kernels/conv_int8.py


def is_conv_gemm(func) -> bool:
    """Whether a PrimFunc holds the implicit-GEMM conv block of :mod:`..kernels.conv_int8`."""
    from tvm import s_tir

    try:
        s_tir.Schedule(func).get_sblock(CONV_BLOCK)
    except Exception:  # noqa: BLE001 - not found (or not one block of that name)
        return False
    return True


class ConvGEMM:
    """Schedules only the implicit-GEMM convs (dlight's SIMT Matmul); declines every other function."""

    def __init__(self):
        from tvm.s_tir import dlight as dl

        self._matmul, self._fallback = dl.gpu.Matmul(), dl.gpu.Fallback()

    def apply(self, func, target, tunable):
        """dlight's SIMT Matmul schedule, or (if it declines) dlight's Fallback: never the later rules, whose Matmul
        would try the crashing tensorization."""
        from tvm import tirx

        if not isinstance(func, tirx.PrimFunc) or not is_conv_gemm(func):
            return None
        func = func.with_attr("dlight.do_not_tensorize", True)
        try:
            sch = self._matmul.apply(func, target, tunable)
        except Exception:  # noqa: BLE001 - an assert inside the rule: it does not fit
            sch = None
        return sch if sch is not None else self._fallback.apply(func, target, tunable)

    def is_target_available(self, target) -> bool:
        return target.kind.name == "cuda"


def conv_gemm_pass():
    """An ``ApplyDefaultSchedule`` of :class:`ConvGEMM` (functions it schedules are skipped by later dlight passes)."""
    from tvm.s_tir import dlight as dl

    return dl.ApplyDefaultSchedule(ConvGEMM())
