"""dlight rule for the integer convolutions of :mod:`..kernels.conv_int8` on CUDA: dlight's matmul schedules on the
implicit GEMM (the ``im2col`` gather, the padding, the weight ``dequantize`` and the int8 -> fp16 conversions are
inlined into its shared-memory loads, so the kernel reads the int8 weight constant and the int8 / fp16 activations
from HBM; fused epilogues -- bias, requantize, ReLU, the next layer's ``act_quantize`` -- follow its store).

Tensor cores: dlight's ``MatmulTensorization`` (wmma m16n16k16, fp16 operands, float32 accumulation) -- the int8
x int8 convs present their codes to it as exact fp16 values (:func:`..kernels.conv_int8.int8_conv2d_te`, ``mma=
"float16"``), because dlight's ``MatmulInt8Tensorization`` builds a module that TVM 0.27 fails to lower
(``InternalError: Check failed: (it != fragment_info_.end())``, even for a plain 256x256 int8 matmul).  With
apache-tvm-ffi 0.1.15 any ``Tensorize`` segfaults (``tvm::ffi::ToJSONGraph``), so there tensor cores are off and
the rule takes dlight's SIMT Matmul (``dlight.do_not_tensorize``), whose int8 / fp16 products sum in registers."""
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
    """Schedules only the implicit-GEMM convs; declines every other function.  ``tensor_cores``: try dlight's fp16
    tensor-core schedule first (None: where TIR serialization works, i.e. :func:`..meta_schedule.meta_schedule_usable`
    -- tensorization goes through the same ``ToJSONGraph`` that segfaults with apache-tvm-ffi 0.1.15)."""

    def __init__(self, tensor_cores: bool | None = None):
        from tvm.s_tir import dlight as dl

        from tvm.s_tir.dlight.gpu.matmul import MatmulTensorization

        from ..meta_schedule import meta_schedule_usable

        self.tensor_cores = tensor_cores if tensor_cores is not None else meta_schedule_usable()[0]
        self._tc = MatmulTensorization()
        self._matmul, self._fallback = dl.gpu.Matmul(), dl.gpu.Fallback()

    def apply(self, func, target, tunable):
        """fp16 tensor cores (wmma, float32 accumulation) where allowed and the GEMM takes them; else dlight's SIMT
        Matmul; else dlight's Fallback -- never the later rules, whose Matmul would try the int8 tensorization."""
        from tvm import tirx

        if not isinstance(func, tirx.PrimFunc) or not is_conv_gemm(func):
            return None
        sch = None
        if self.tensor_cores:
            try:
                sch = self._tc.apply(func, target, tunable)
            except Exception:  # noqa: BLE001 - the tensorization does not fit this GEMM
                sch = None
        if sch is not None:
            return sch
        func = func.with_attr("dlight.do_not_tensorize", True)
        try:
            sch = self._matmul.apply(func, target, tunable)
        except Exception:  # noqa: BLE001 - an assert inside the rule: it does not fit
            sch = None
        return sch if sch is not None else self._fallback.apply(func, target, tunable)

    def is_target_available(self, target) -> bool:
        return target.kind.name == "cuda"


def conv_gemm_pass(tensor_cores: bool | None = None):
    """An ``ApplyDefaultSchedule`` of :class:`ConvGEMM` (functions it schedules are skipped by later dlight passes)."""
    from tvm.s_tir import dlight as dl

    return dl.ApplyDefaultSchedule(ConvGEMM(tensor_cores))
