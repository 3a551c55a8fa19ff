"""Modules that the passes insert into graphs."""
from .quant_linear import QuantConv2d, QuantLinear

__all__ = ["QuantLinear", "QuantConv2d"]
