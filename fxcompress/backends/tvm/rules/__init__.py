"""Schedule rules for CUDA (dlight ``ScheduleRule``s, one per file) and the rule list a build applies."""
from __future__ import annotations

from ..config import TVMBuildConfig
from .small_batch_gemv import SmallBatchGEMV
from .tuned_gemv import gemv_rule

__all__ = ["dlight_pass", "guard", "SmallBatchGEMV", "gemv_rule"]


def dlight_pass(target, config: TVMBuildConfig):
    """dlight's GPU rules, in order, behind fxcompress's small-batch GEMV rule; the first rule that answers wins."""
    from tvm.s_tir import dlight as dl

    rules = [SmallBatchGEMV(config.small_batch_max_m), dl.gpu.Matmul(), gemv_rule(config.gemv_cuda),
             dl.gpu.LowBatchGEMV(),
             dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()]
    for r in rules[:-1]:
        guard(r)
    return dl.ApplyDefaultSchedule(*rules)


def guard(rule):
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
