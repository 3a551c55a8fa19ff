"""Graph -> graph rewrites, one file per pass."""
from .base import LayerReport, PassResult, Pipeline, Report, as_fx_pass, report
from .convert import convert_l4q, convert_pass
from .l4q import L4QConfig, l4q_param_groups, l4q_pass, l4q_trainable_parameters, prepare_l4q
from .rtn import RTNConfig, quantize_rtn

__all__ = ["LayerReport", "PassResult", "Pipeline", "Report", "as_fx_pass", "report", "RTNConfig", "quantize_rtn",
           "L4QConfig", "prepare_l4q", "l4q_pass", "l4q_trainable_parameters", "l4q_param_groups", "convert_l4q", "convert_pass"]
