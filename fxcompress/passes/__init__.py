"""Graph -> graph rewrites, one file per pass."""
from .base import LayerReport, PassResult, Pipeline, Report, as_fx_pass, report
from .rtn import RTNConfig, quantize_rtn

__all__ = ["LayerReport", "PassResult", "Pipeline", "Report", "as_fx_pass", "report", "RTNConfig", "quantize_rtn"]
