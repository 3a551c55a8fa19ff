"""Graph -> graph rewrites, one file per pass.

Every pass has a pass form ``<name>_pass(gm, config) -> PassResult(gm, report, modified)`` and a verb that
returns the model; both take a GraphModule or a ``torch.export.ExportedProgram`` (and give the same back).
"""
from .base import LayerReport, NothingToCompressError, PassResult, Pipeline, Report, as_fx_pass, record, report
from .convert import convert_l4q, convert_pass
from .l4q import L4QConfig, l4q_param_groups, l4q_pass, l4q_trainable_parameters, prepare_l4q
from .program import materialize_quant_modules
from .rtn import RTNConfig, quantize_rtn, rtn_pass

__all__ = ["LayerReport", "NothingToCompressError", "PassResult", "Pipeline", "Report", "as_fx_pass", "record",
           "report", "RTNConfig", "rtn_pass", "quantize_rtn", "L4QConfig", "prepare_l4q", "l4q_pass",
           "l4q_trainable_parameters", "l4q_param_groups", "convert_l4q", "convert_pass",
           "materialize_quant_modules"]
